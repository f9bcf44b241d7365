"""The methods a run compares, one registered entry each: TWA, the baselines a user would
pick instead (DESIGN.md 5c) and the soup job's soups.

The pipelines (what to average, what summary.json lists), the results table
(``console``), the plots and report.html all read ``METHODS``; no other module lists
method names or labels. A ``Method`` says:

    name        summary.json's key (test_acc, test_loss, trained_on)
    label       its name in the results table, report.html and the plot legends
    jobs        the jobs whose pipeline makes it: "main" (jobs/cifar_twa.py), "soup" (jobs/soup_twa.py)
    style       its colour, its point on accuracy.png (marker, legend position), its line on soups.png
    trained_on  summary.json's ``trained_on``: the data its weights saw
    selected_on summary.json's ``selected_on``: the split that chose it (None: nothing chose it)
    cost        the results table's epochs, compute seconds (of which stages) and data
    members     main job: the stored candidates it averages (None: its weights come from a stage)
    soup        soup job: the soup it selects on the val split (None: not a soup)
    produced    False while no pipeline makes it yet: it is then listed only where a summary has it

Order: ``METHODS``' order is summary.json's (and so the results table's); accuracy.png's
legend lists its points by ``Style.legend``. A new baseline is one entry here plus its
function (its members rule, or the stage that makes its weights).

This module imports no torch (the console and ``twa-ray show`` stay light): the rules
import ``core`` when they run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

if TYPE_CHECKING:
    from ..config import Config
    from ..core.soups import Score, Soup

MAIN, SOUP = "main", "soup"  # the jobs

Candidates = Sequence[tuple[int, Mapping]]  # (store index, info) of every stored candidate, by index


# ---------------------------------------------------------------- what a method costs


class Cost(NamedTuple):
    """A method's row in the results table, read from its job's summary.json (None: unknown)."""

    epochs: float | None  # epochs of training behind the model
    compute_s: float | None  # compute seconds of the stages it needed
    trained_on: str | None  # the data it saw, in words


def number(value: Any) -> float | None:
    """``value`` as a float when it is a number (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _compute(stage: Any) -> float | None:
    """A stage's seconds: a number, or the ``compute`` of a {"startup", "compute"} record."""
    return number(stage.get("compute")) if isinstance(stage, Mapping) else number(stage)


def stage_seconds(summary: Mapping[str, Any], *stages: str) -> float | None:
    """Sum of the compute seconds of the ``stages`` present in ``summary["time_s"]`` (None when none is)."""
    times = summary.get("time_s") or {}
    present = [_compute(times.get(k)) for k in stages]
    present = [t for t in present if t is not None]
    return sum(present) if present else None


def job_of(summary: Mapping[str, Any]) -> str:
    """The job that wrote ``summary``: the soup job's names its fine-tuned models' count."""
    return SOUP if "num_models" in summary else MAIN


def _base_data(summary: Mapping[str, Any]) -> str:
    dataset = summary.get("dataset")
    return f"{dataset} train" if dataset else "train"


def _models(summary: Mapping[str, Any]) -> str:
    n = summary.get("num_models")
    return f"{n} fine-tuned models" if n is not None else "fine-tuned models"


def _twa_epochs(summary: Mapping[str, Any]) -> float | None:
    """TWA's epochs over all its rounds (``epochs.twa``; else one round's ``twa_epochs``)."""
    total = number((summary.get("epochs") or {}).get("twa"))
    return total if total is not None else number(summary.get("twa_epochs"))


def _plus(a: float | None, b: float | None) -> float | None:
    return a + b if a is not None and b is not None else None


def at_base_end(summary: Mapping[str, Any]) -> Cost:
    """Made from base training's weights (main job): its epochs and its compute, nothing more."""
    return Cost(number(summary.get("base_epochs")), stage_seconds(summary, "base_train"), _base_data(summary))


def after_twa(summary: Mapping[str, Any]) -> Cost:
    """TWA: the candidates' cost (base training; in the soup job pretraining and fine-tuning,
    whose epochs the summary does not count) plus TWA's epochs and compute."""
    twa_data = summary.get("twa_data")
    if job_of(summary) == SOUP:
        models = _models(summary)
        on = f"{models}; TWA on {twa_data}" if twa_data else models
        return Cost(number(summary.get("twa_epochs")), stage_seconds(summary, "pretrain", "finetune", "twa"), on)
    train = _base_data(summary)
    on = f"{train}; TWA on {twa_data}" if twa_data else train
    return Cost(_plus(number(summary.get("base_epochs")), _twa_epochs(summary)),
                stage_seconds(summary, "base_train", "twa"), on)


def to_budget_end(summary: Mapping[str, Any]) -> Cost:
    """The full budget: the budget's epochs; a continuation of base training costs base
    training too (``full_budget_continued``), a run from the start its own compute alone."""
    stages = ("base_train", "full_budget") if summary.get("full_budget_continued") else ("full_budget",)
    return Cost(number(summary.get("budget_epochs")), stage_seconds(summary, *stages), _base_data(summary))


def same_compute_as_twa(summary: Mapping[str, Any]) -> Cost:
    """SGD at equal compute: base training continued for TWA's epochs (its stage in
    ``time_s``: "sgd_same_compute"), so base training's cost plus its own."""
    return Cost(_plus(number(summary.get("base_epochs")), _twa_epochs(summary)),
                stage_seconds(summary, "base_train", "sgd_same_compute"), _base_data(summary))


def soup_selection(summary: Mapping[str, Any]) -> Cost:
    """A soup: the fine-tuned models' compute plus the selection on val; no epochs of its own."""
    return Cost(None, stage_seconds(summary, "pretrain", "finetune", "soups"), f"{_models(summary)}, chosen on val")


def by_job(summary: Mapping[str, Any]) -> Cost:
    """A method this registry does not know: as its job's baselines (base training's end, or a soup)."""
    return soup_selection(summary) if job_of(summary) == SOUP else at_base_end(summary)


# ---------------------------------------------------------------- what the main job averages


def last_candidate(candidates: Candidates, cfg: Config) -> list[int]:
    """The last candidate taken after training began (the last stored one when there is none)."""
    from ..core.baselines import after_start

    return [max(after_start(candidates) or [index for index, _ in candidates])]


def swa_members(candidates: Candidates, cfg: Config) -> list[int]:
    """SWA: every candidate taken after training began (never the random initial weights)."""
    from ..core.baselines import after_start

    return after_start(candidates)


def best_k_members(candidates: Candidates, cfg: Config) -> list[int]:
    """best-k: the ``baselines.best_k`` candidates with the best val metric of the task
    (image classification: val accuracy; timm avg_checkpoints)."""
    from ..core.baselines import best_k
    from ..tasks import task_from_config

    task = task_from_config(cfg)
    return best_k(candidates, cfg.baselines.best_k, f"val_{task.metric}", task.higher_is_better)


def base_training_data(cfg: Config) -> str:
    """summary.json's ``trained_on`` of a model made from base training alone."""
    return "train"


def twa_data_seen(cfg: Config) -> str:
    """TWA's ``trained_on``: base training's split, and the val split too when TWA learns on it (TWA-v)."""
    return "train" if cfg.twa.data == "train" else "train+val"


# ---------------------------------------------------------------- what the soup job selects


def best_individual_soup(candidates, score: Score, scores: list[float]) -> Soup:
    """The model with the best val accuracy."""
    from ..core.soups import best_individual

    return best_individual(candidates, scores=scores)


def uniform_soup_of_all(candidates, score: Score, scores: list[float]) -> Soup:
    """The uniform average of every model."""
    from ..core.soups import uniform_soup

    return uniform_soup(candidates, score)


def greedy_soup_by_val(candidates, score: Score, scores: list[float]) -> Soup:
    """Models added best first while the soup's val accuracy does not drop."""
    from ..core.soups import greedy_soup

    return greedy_soup(candidates, score, scores=scores)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Style:
    """How the plots draw a method: ``color`` (matplotlib), ``marker`` its point on
    accuracy.png (None: no point there), ``legend`` that point's place in the legend
    (lowest first; ties in ``METHODS``' order), ``line`` its line on soups.png."""

    color: str = "black"
    marker: str | None = None
    legend: int = 100
    line: str = ":"


@dataclass(frozen=True)
class Method:
    """One method a run compares (the module docstring says what each field is for)."""

    name: str
    label: str
    jobs: tuple[str, ...] = (MAIN,)
    style: Style = field(default_factory=Style)
    trained_on: Callable[[Config], str] = base_training_data
    selected_on: str | None = None
    cost: Callable[[Mapping[str, Any]], Cost] = by_job
    members: Callable[[Candidates, Config], list[int]] | None = None
    soup: Callable[[Any, Score, list[float]], Soup] | None = None
    produced: bool = True


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("last", "last", style=Style("tab:gray", "v", 0), cost=at_base_end, members=last_candidate),
    Method("swa", "SWA", style=Style("tab:orange", "s", 1), cost=at_base_end, members=swa_members),
    # the EMA of the weights kept at every base-training step (timm ModelEmaV3): base training makes it
    Method("ema", "EMA", style=Style("tab:purple", "D", 2), cost=at_base_end),
    Method("best_k", "best-k", style=Style("tab:brown", "P", 3), selected_on="val", cost=at_base_end,
           members=best_k_members),
    # base training continued from its last checkpoint to the end of its schedule: its own stage
    Method("full_budget", "full budget", style=Style("tab:red", "X", 6), cost=to_budget_end),
    # base training continued from its last checkpoint for TWA's epochs, the rest of its schedule
    # compressed into them (core.schedules.compressed_factor): its own stage, in every run with the full budget
    Method("sgd_same_compute", "SGD, same compute", style=Style("tab:pink", "h", 5), cost=same_compute_as_twa),
    Method("best_individual", "best individual", jobs=(SOUP,), style=Style("tab:blue", line=":"),
           cost=soup_selection, soup=best_individual_soup),
    Method("uniform_soup", "uniform soup", jobs=(SOUP,), style=Style("tab:orange", line="--"),
           cost=soup_selection, soup=uniform_soup_of_all),
    Method("greedy_soup", "greedy soup", jobs=(SOUP,), style=Style("tab:red", line="-."),
           cost=soup_selection, soup=greedy_soup_by_val),
    Method("twa", "TWA", jobs=(MAIN, SOUP), style=Style("tab:green", "*", 4, "-"), trained_on=twa_data_seen,
           cost=after_twa),
)}


def method(name: str) -> Method:
    """The registered method ``name``; a name the registry lacks (an older or foreign
    summary's) gets a plain entry: its name with spaces as label, its job's cost, no point."""
    found = METHODS.get(name)
    return found if found is not None else Method(name, name.replace("_", " "), jobs=())


def job_methods(job: str) -> list[Method]:
    """The methods ``job``'s pipeline makes (``produced``), in ``METHODS``' order: its summary's keys."""
    return [m for m in METHODS.values() if job in m.jobs and m.produced]


def legend_order(names: Sequence[str]) -> list[str]:
    """``names`` as accuracy.png's legend lists their points (``Style.legend``, then ``METHODS``' order)."""
    position = {name: i for i, name in enumerate(METHODS)}
    return sorted(names, key=lambda n: (method(n).style.legend, position.get(n, len(position))))


__all__ = ["METHODS", "Method", "Style", "Cost", "method", "job_methods", "legend_order", "MAIN", "SOUP"]
