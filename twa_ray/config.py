"""One typed config for every job: dataclasses loaded from YAML, with ``a.b=value`` overrides.

    cfg = load_config("configs/quickstart.yaml", ["twa.bits=4", "train.epochs=3"])

Unknown keys, wrong types and invalid values are collected and raised together as one
``ConfigError`` naming the file (or override) and the dotted key of each problem. A float
setting takes every notation ``float()`` reads (``1e-4``, which YAML 1.1 reads as a string,
``5E-4``, ``.5``, ``1_000``); an int setting takes integers only. ``name`` is a plain name
(``is_plain_name``): it makes the default run folder runs/<name>.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .core.blocks import parse_granularity
from .core.collectives import EXCHANGES
from .core.quant import BITS
from .core.row_shards import ROW_BASES
from .core.schedules import OPTIMIZERS, SCHEDULES
from .core.projection import KERNELS
from .core.subspace import BASES, RAW_BASES, check_start


SHARDINGS = ("blocks", "fsdp")  # twa.sharding, train.sharding


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""


@dataclass
class SyntheticConfig:
    """Generated data for tests: class-dependent patterns plus noise."""

    num_train: int = 512
    num_test: int = 256
    num_classes: int = 4
    channels: int = 1
    image_size: int = 8


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str = "data"  # where datasets are read from (or downloaded to, with download)
    val_ratio: float = 0.1  # part of the training set held out: TWA-v trains on it
    augment: bool = True
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 512
    loader_workers: int = 0
    limit_train: int | None = None  # first K training examples only (quick runs)
    limit_val: int | None = None
    limit_test: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    kwargs: dict = field(default_factory=dict)  # extra arguments of the model builder
    sync_bn: bool = False  # SyncBatchNorm across workers (TWA and base training)


@dataclass
class TrainConfig:
    """Base training, which saves the candidates."""

    epochs: int = 10  # epochs actually run
    budget_epochs: int | None = None  # the full budget the schedule is laid out for (default: epochs)
    workers: int = 1
    # how the workers share the model: "blocks" (DDP: each holds the whole model) or "fsdp"
    # (FSDP2: each holds its dim-0 rows of every parameter, of its gradient, optimizer state
    # and EMA, and writes those rows of each candidate into the store, in parallel with the
    # others; buffers such as BatchNorm's statistics are replicated, rank 0's broadcast
    # before every forward pass as DDP does). The candidates are the same either way.
    sharding: str = "blocks"
    cpus_per_worker: float | None = None  # None: a single node's CPUs shared by the workers
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    warmup: float = 0.0  # fraction of the budget
    # step schedule: fractions of the budget, or None: the paper's epochs int(0.5 * E) and
    # int(0.75 * E + 0.9) of the E = schedule_epochs budget
    milestones: list[float] | None = None
    gamma: float = 0.1
    final_lr_factor: float = 0.0  # cosine/linear end, or swa_lr / lr for the swa schedule
    swa_start: float = 1.0  # swa schedule: fraction of the budget where the constant tail starts
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    save_initial: bool = True  # the initial weights are candidate 0
    save_every_steps: int | None = None  # extra candidates every k steps (besides each epoch)
    save_from_epoch: int = 0  # keep candidates from this epoch on (tail stage)

    @property
    def schedule_epochs(self) -> int:
        return self.budget_epochs or self.epochs


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups


@dataclass
class TWAConfig:
    workers: int = 1
    # how the workers share the work: "blocks" (each holds the whole model and the projection
    # of a run of whole blocks) or "fsdp" (FSDP2: each holds its dim-0 rows of every tensor,
    # of the model, its gradient and the projection; journal bases only, no select_eval)
    sharding: str = "blocks"
    use_gpu: bool | None = None
    bits: int = 8
    granularity: str = "tensor"
    # normalized, orthonormal, orthonormal-global: the journal algorithm (centred, X = 0 is SWA);
    # checkpoints: the ICLR'23 one (the raw candidates' span, weight decay on the weights)
    basis: str = "normalized"
    # checkpoints basis: where X starts: "mean", "last" or K, an index into the chosen
    # candidates (into the first round's with candidates_per_round)
    start: str | int = "mean"
    data: str = "train"  # "train" (TWA-t) or "val" (TWA-v)
    # share of the val split held back to select on (Tune): TWA-v trains on the rest;
    # 0: TWA-t selects on all of val, TWA-v has no selection data
    select_ratio: float = 0.0
    # score the selection data after each TWA epoch (BatchNorm recalibration + evaluation):
    # Tune sweeps always do (it is their metric); elsewhere it only adds a curve to the
    # history, and its time counts in TWA's compute
    select_eval: bool = False
    epochs: int = 2
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "cosine"
    warmup: float = 0.0
    batch_size: int | None = None  # default: data.batch_size
    candidates: str = "all"  # "all", or comma-separated first:N, last:N, stride:K
    candidates_per_round: int | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # shuffled batches (of data.eval_batch_size) BatchNorm is recalibrated on (None: all); 50 halves
    # the spread of test accuracy over calibration draws that 20 leaves, at half the cost of all
    bn_batches: int | None = 50
    max_chunk_bytes: int = 8 << 20  # temporary memory of the projection kernels
    # projection kernels: auto (native C++ on CPU where it builds, else eager), eager, native
    # or triton (CUDA; opt-in until measured on a GPU); twa_ray.core.projection says more
    kernel: str = "auto"
    # how twa.sharding: blocks exchanges the gradient and the weights each step: auto (ring on
    # gloo, sharded elsewhere), sharded (reduce-scatter + all-gather), all_reduce or ring;
    # twa_ray.distributed.collectives says why
    exchange: str = "auto"
    checkpoint_every_steps: int | None = None  # besides each epoch
    cpus_per_worker: float | None = None  # None: as train.cpus_per_worker (Tune sweeps: 1)
    # how Ray places the workers (its placement group strategy): PACK fills a node first;
    # STRICT_SPREAD puts each worker on a different node, SPREAD does so where it can
    placement_strategy: str = "PACK"
    max_failures: int = 2  # worker-group restarts from the latest checkpoint


@dataclass
class BaselinesConfig:
    """The fixed-weight baselines every main-job run reports beside TWA."""

    # EMA of the weights, updated after every base-training optimizer step (timm ModelEmaV3):
    # decay_t = min(ema_decay, 1 - (1 + t) ** (-2/3)) after t earlier updates with ema_warmup,
    # so the default (timm train.py's) also suits runs of a few hundred steps
    ema_decay: float = 0.9998
    ema_warmup: bool = True
    best_k: int = 3  # best-k: the uniform average of the k candidates with the best val accuracy


@dataclass
class EvalConfig:
    """Test-split evaluation of the main job."""

    candidates: bool = False  # also evaluate every stored candidate (the plot's test-accuracy curve)
    workers: int | None = None  # parallel evaluation tasks (None: as many as the CPUs, or GPUs, allow)


@dataclass
class ReportConfig:
    """What the run folder holds beside its fixed files."""

    # TensorBoard event files under <run_dir>/tensorboard: one run per stage (and per sweep trial)
    tensorboard: bool = False


@dataclass
class DebugConfig:
    fail_at_step: int | None = None  # one TWA worker fails once at this step (drills, tests)
    fail_at_epoch: int | None = None  # same for base training
    nan_at_step: int | None = None  # the TWA loss becomes NaN at this step (drills, tests)
    pause_at_step: int | None = None  # one TWA worker stalls once at this step, up to 10 min (interruption drills)


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1  # epochs before a trial may be stopped
    reduction_factor: int = 2


@dataclass
class TuneConfig:
    """A Ray Tune sweep over TWA settings (jobs/tune_twa.py).

    ``space`` maps dotted config keys (e.g. ``twa.lr``, ``twa.candidates``) to one of
    ``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [low, high]}``,
    ``{uniform: [low, high]}``.
    """

    space: dict = field(default_factory=dict)
    num_samples: int = 1  # samples of the random keys (each grid point runs this often)
    metric: str = "select_acc"  # reported each TWA epoch on data that trained nothing
    mode: str = "max"
    max_concurrent_trials: int | None = None  # None: as many as the CPUs (or GPUs) allow
    trial_cpus: float = 0.1  # the trial's driver function; its TWA workers take twa.cpus_per_worker
    asha: AshaConfig = field(default_factory=AshaConfig)


@dataclass
class FinetuneConfig:
    """Make fine-tuned models for a soup: pretrain once, fine-tune N copies (jobs/soup_twa.py)."""

    pretrain_epochs: int = 2
    pretrain_classes: list[int] | None = None  # pretrain on these classes only (None: all)
    num_models: int = 8
    epochs: int = 2
    lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 5e-4])
    augment: list[bool] = field(default_factory=lambda: [True, False])
    label_smoothing: list[float] = field(default_factory=lambda: [0.0, 0.1])
    max_concurrent: int | None = None  # fine-tuning runs at a time (None: what the CPUs allow)


@dataclass
class Config:
    name: str = "run"
    output_dir: str | None = None  # default runs/<name>
    # where relative output_dir and store resolve (an absolute path or a URI such as s3://bucket/prefix);
    # default: the environment variable TWA_RAY_STORAGE_ROOT; on a Ray cluster one of them is needed
    storage_root: str | None = None
    seed: int = 0
    store: str | None = None  # candidate store uri; default <output_dir>/candidates
    compare_full_budget: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    twa: TWAConfig = field(default_factory=TWAConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    checkpoints_dir: str | None = None  # soups: a folder of fine-tuned checkpoints
    finetune: FinetuneConfig | None = None  # soups: make the fine-tuned models first

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.name}"

    @property
    def store_uri(self) -> str:
        if self.store:
            return self.store
        if "://" in self.run_dir:  # a URI: Path would fold its "//"; join keeps a query at the end
            from .store.fs import join

            return join(self.run_dir, "candidates")
        return str(Path(self.run_dir) / "candidates")


# ---------------------------------------------------------------- where a job's results go

STORAGE_ROOT_ENV = "TWA_RAY_STORAGE_ROOT"


def on_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """True when the job joins a Ray cluster: ``RAY_ADDRESS`` is set (``ray job submit`` sets
    it for every driver it starts, and ``distributed.ray_env.init_ray`` then joins it)."""
    return bool((os.environ if environ is None else environ).get("RAY_ADDRESS"))


def is_absolute_location(location: str) -> bool:
    """A URI (``s3://...``, ``file://...``) or an absolute local path (``~`` expanded)."""
    return "://" in location or os.path.isabs(os.path.expanduser(location))


def _under(root: str, relative: str) -> str:
    relative = posixpath.normpath(relative.replace(os.sep, "/"))
    if "://" in root:
        from .store import fs as store_fs  # a URI root may end in ?query (an S3 endpoint): join keeps it last

        return store_fs.join(root, relative)
    return os.path.join(os.path.expanduser(root), relative)


def resolve_storage(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``cfg`` with ``output_dir`` and ``store`` settled where the job writes them; call it
    once, in the driver (job commands do, in ``cli.common.load_job_config``).

    - A storage root: ``storage_root``, else the environment variable TWA_RAY_STORAGE_ROOT
      (an absolute path or a URI). A relative ``output_dir`` (the default ``runs/<name>``
      too) and a relative ``store`` resolve against it, as if it were the working directory.
    - No root, on a Ray cluster (``on_cluster``): a relative one raises ConfigError naming
      storage_root, TWA_RAY_STORAGE_ROOT and the key. ``ray job submit --working-dir`` runs
      the driver in Ray's unpacked copy of the working dir on whichever node it picked:
      results under a relative path would land there, not where the user looks.
    - No root, not on a cluster: ``cfg`` unchanged (relative to the working directory).

    Absolute paths and URIs are used as given.
    """
    environ = os.environ if environ is None else environ
    root, source = cfg.storage_root, "storage_root"
    if not root:
        root, source = environ.get(STORAGE_ROOT_ENV) or None, STORAGE_ROOT_ENV
    if root is not None and not is_absolute_location(root):
        raise ConfigError(f"{source}: {root!r} is not an absolute path or a URI "
                          "(e.g. /shared/twa or s3://bucket/prefix)")
    relative = {}
    if cfg.output_dir is None or not is_absolute_location(cfg.output_dir):
        relative["output_dir"] = cfg.run_dir
    if cfg.store is not None and not is_absolute_location(cfg.store):
        relative["store"] = cfg.store
    if not relative or (root is None and not on_cluster(environ)):
        return cfg
    if root is None:
        default = " (the default runs/<name>)" if cfg.output_dir is None else ""
        named = ", ".join(f"{key} {path!r}" + (default if key == "output_dir" else "") for key, path in relative.items())
        raise ConfigError(
            f"{named} {'is' if len(relative) == 1 else 'are'} relative, and this job runs on a Ray cluster "
            "(RAY_ADDRESS is set): it would land in Ray's copy of the working dir on whichever node ran the driver. "
            "Set a storage root once, an absolute "
            f"path every node shares or a URI such as s3://bucket/prefix: the config key storage_root (or the "
            f"override storage_root=...) or the environment variable {STORAGE_ROOT_ENV}; or give an absolute "
            "output_dir."
        )
    return dataclasses.replace(cfg, **{key: _under(root, path) for key, path in relative.items()})


# ---------------------------------------------------------------- candidate windows


def parse_candidates(spec: str) -> dict[str, int]:
    """'all' | 'first:N,last:M,stride:K' -> {'first': N, ...}; raises ValueError naming spec."""
    if spec == "all":
        return {}
    out: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition(":")
        if key not in ("first", "last", "stride") or key in out or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"candidates {spec!r}: expected 'all' or comma-separated first:N, last:N, stride:K (N, K >= 1)")
        out[key] = int(value)
    return out


def max_selected(spec: str) -> int | None:
    """The most candidates ``spec`` can select whatever the store holds (None: no bound)."""
    window = parse_candidates(spec)
    bound = min([window[k] for k in ("first", "last") if k in window], default=None)
    return None if bound is None else -(-bound // window.get("stride", 1))


def check_twa_start(twa: "TWAConfig", count: int) -> None:
    """Raise ConfigError naming twa.start when it is no index into the ``count`` chosen
    candidates (the first round's, with twa.candidates_per_round)."""
    first_round = min(count, twa.candidates_per_round or count)
    try:
        check_start(twa.start, first_round)
    except ValueError as exc:
        where = " of the first round (twa.candidates_per_round)" if first_round < count else ""
        raise ConfigError(f"twa.start: {exc}{where}") from None


def select_candidates(spec: str, count: int) -> list[int]:
    """Indices of the candidates ``spec`` keeps out of ``count``: first N, then last M, then every K-th."""
    window = parse_candidates(spec)
    idx = list(range(count))
    if "first" in window:
        idx = idx[: window["first"]]
    if "last" in window:
        idx = idx[-window["last"] :]
    return idx[:: window.get("stride", 1)]


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def as_float(value: Any) -> float | None:
    """``value`` as a float field takes it, else None: an int (not a bool), a float, or a
    string in any notation ``float()`` accepts (``1e-4``, ``5E-4``, ``.5``, ``1_000``). YAML 1.1
    (PyYAML) reads a number without a dot, such as ``1e-4``, as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value: Any, tp: Any, key: str, errors: list[str], where: str) -> Any:
    """``value`` as the type ``tp`` of ``key`` (errors appended, naming the key). A float
    field takes every notation ``float()`` accepts (``as_float``), never a bool; an int
    field takes only integers (YAML already reads ``1_000`` and ``0x10`` as ints), never a
    float or a string."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # X | None: X's own errors name the key inside
            return _convert(value, others[0], key, errors, where)
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _convert(value, arg, key, sub, where)
            if not sub:
                return out
        errors.append(f"{where}: {key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: {key}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, key + ".", errors, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            errors.append(f"{where}: {key}: expected a list, got {value!r}")
            return []
        return [_convert(v, item, f"{key}[{i}]", errors, where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: {key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is Any:
        return value
    if tp is float:
        number = as_float(value)
        if number is None:
            errors.append(f"{where}: {key}: expected float, got {value!r}")
        return number
    if tp is bool and not isinstance(value, bool):
        errors.append(f"{where}: {key}: expected true or false, got {value!r}")
        return None
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        errors.append(f"{where}: {key}: expected an integer, got {value!r}")
        return None
    if not isinstance(value, tp):
        errors.append(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def _build(cls: type, raw: dict, prefix: str, errors: list[str], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            errors.append(f"{where}: unknown key {prefix}{key} (valid: {', '.join(sorted(names))})")
            continue
        kwargs[key] = _convert(value, hints[key], prefix + key, errors, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}")
        return cls()


def _apply_override(raw: dict, override: str, errors: list[str]) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        errors.append(f"override {override!r}: expected KEY=VALUE, e.g. twa.bits=4")
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        errors.append(f"override {override!r}: value is not YAML: {exc}")
        return
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            errors.append(f"override {override!r}: {part} is not a section")
            return
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _start_problems(twa: TWAConfig) -> list[str]:
    """What is wrong with twa.start, as far as the config alone tells (the store may tell more:
    ``check_twa_start``)."""
    try:
        check_start(twa.start)
    except ValueError as exc:
        return [str(exc)]
    if twa.start != "mean" and twa.basis not in RAW_BASES:
        return [f"{twa.start!r} needs twa.basis: checkpoints (the journal bases start at the mean, X = 0)"]
    if isinstance(twa.start, int):  # the most candidates the settings allow, before any store exists
        try:
            window = max_selected(twa.candidates)
        except ValueError:  # reported under twa.candidates
            window = None
        bounds = [b for b in (window, twa.candidates_per_round) if b is not None]
        if bounds and twa.start >= min(bounds):
            return [f"{twa.start} is out of range: twa.candidates={twa.candidates!r} and twa.candidates_per_round="
                    f"{twa.candidates_per_round} leave at most {min(bounds)} candidates (indices 0..{min(bounds) - 1})"]
    return []


def sharding_problems(twa: TWAConfig) -> list[str]:
    """What twa.sharding rules out among the other twa settings."""
    if twa.sharding not in SHARDINGS:
        return [f"{twa.sharding!r} is not one of {list(SHARDINGS)}"]
    if twa.sharding != "fsdp":
        return []
    problems = []
    if twa.basis not in ROW_BASES:
        problems.append(f"'fsdp' does not support twa.basis: {twa.basis} (it supports {list(ROW_BASES)}; "
                        "use twa.sharding: blocks)")
    if twa.select_eval:
        problems.append("'fsdp' does not support twa.select_eval (per-epoch selection scores); "
                        "use twa.sharding: blocks")
    if twa.exchange != "auto":
        problems.append(f"'fsdp' does not support twa.exchange: {twa.exchange} (FSDP2 makes its own "
                        "collectives); use twa.sharding: blocks")
    return problems


NAME_CHARACTERS = "letters, digits and . _ + -"  # what a plain name (``name``) is made of


def is_plain_name(name: str) -> bool:
    """True for a plain folder name: non-empty, only ``NAME_CHARACTERS`` (no path separator,
    no space), and not ``.`` or ``..``. ``name`` makes the default run folder runs/<name>,
    which ``--force`` may remove, and Ray's run names."""
    return bool(re.fullmatch(r"[A-Za-z0-9._+-]+", name)) and name not in (".", "..")


def _validate(cfg: Config, where: str) -> list[str]:
    errors = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{where}: {key}: {message}")

    check(is_plain_name(cfg.name), "name",
          f"{cfg.name!r} is not a plain name ({NAME_CHARACTERS}; not empty, '.' or '..'): "
          "it names the run folder runs/<name>")
    check(cfg.twa.bits in BITS, "twa.bits", f"{cfg.twa.bits} is not one of {list(BITS)}")
    check(cfg.twa.basis in BASES, "twa.basis", f"{cfg.twa.basis!r} is not one of {list(BASES)}")
    check(cfg.twa.kernel in KERNELS, "twa.kernel", f"{cfg.twa.kernel!r} is not one of {list(KERNELS)}")
    check(cfg.twa.exchange in EXCHANGES, "twa.exchange", f"{cfg.twa.exchange!r} is not one of {list(EXCHANGES)}")
    errors += [f"{where}: twa.start: {problem}" for problem in _start_problems(cfg.twa)]
    errors += [f"{where}: twa.sharding: {problem}" for problem in sharding_problems(cfg.twa)]
    try:
        parse_granularity(cfg.twa.granularity)
    except ValueError as exc:
        errors.append(f"{where}: twa.granularity: {exc}")
    try:
        parse_candidates(cfg.twa.candidates)
    except ValueError as exc:
        errors.append(f"{where}: twa.candidates: {exc}")
    check(cfg.twa.data in ("train", "val"), "twa.data", f"{cfg.twa.data!r} is not 'train' or 'val'")
    check(0.0 <= cfg.data.val_ratio < 1.0, "data.val_ratio", f"{cfg.data.val_ratio} is not in [0, 1)")
    check(
        cfg.twa.data != "val" or cfg.data.val_ratio > 0,
        "twa.data", "'val' (TWA-v) needs data.val_ratio > 0",
    )
    for section in ("train", "twa"):
        sub = getattr(cfg, section)
        check(sub.optimizer in OPTIMIZERS, f"{section}.optimizer", f"{sub.optimizer!r} is not one of {list(OPTIMIZERS)}")
        check(sub.schedule in SCHEDULES, f"{section}.schedule", f"{sub.schedule!r} is not one of {list(SCHEDULES)}")
        check(sub.workers >= 1, f"{section}.workers", f"{sub.workers} is not >= 1")
        check(sub.epochs >= 1 if section == "twa" else sub.epochs >= 0, f"{section}.epochs", f"{sub.epochs} is too small")
        check(sub.lr > 0, f"{section}.lr", f"{sub.lr} is not > 0")
        check(0.0 <= sub.warmup < 1.0, f"{section}.warmup", f"{sub.warmup} is not in [0, 1)")
    check(cfg.train.sharding in SHARDINGS, "train.sharding", f"{cfg.train.sharding!r} is not one of {list(SHARDINGS)}")
    check(
        cfg.train.budget_epochs is None or cfg.train.budget_epochs >= cfg.train.epochs,
        "train.budget_epochs", f"{cfg.train.budget_epochs} is less than train.epochs={cfg.train.epochs}",
    )
    check(
        cfg.twa.candidates_per_round is None or cfg.twa.candidates_per_round >= 2,
        "twa.candidates_per_round", f"{cfg.twa.candidates_per_round} is not >= 2 (a subspace needs two candidates)",
    )
    check(0.0 <= cfg.twa.select_ratio < 1.0, "twa.select_ratio", f"{cfg.twa.select_ratio} is not in [0, 1)")
    check(cfg.tune.mode in ("max", "min"), "tune.mode", f"{cfg.tune.mode!r} is not 'max' or 'min'")
    check(cfg.data.batch_size >= 1, "data.batch_size", f"{cfg.data.batch_size} is not >= 1")
    check(0.0 <= cfg.baselines.ema_decay < 1.0, "baselines.ema_decay", f"{cfg.baselines.ema_decay} is not in [0, 1)")
    check(cfg.baselines.best_k >= 1, "baselines.best_k", f"{cfg.baselines.best_k} is not >= 1")
    check(cfg.eval.workers is None or cfg.eval.workers >= 1, "eval.workers", f"{cfg.eval.workers} is not >= 1")
    check(cfg.twa.placement_strategy in PLACEMENT_STRATEGIES, "twa.placement_strategy",
          f"{cfg.twa.placement_strategy!r} is not one of {list(PLACEMENT_STRATEGIES)}")
    check(cfg.storage_root is None or is_absolute_location(cfg.storage_root), "storage_root",
          f"{cfg.storage_root!r} is not an absolute path or a URI (e.g. /shared/twa or s3://bucket/prefix)")
    return errors


def config_from_dict(raw: dict, where: str = "config", overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config from a plain dict (and overrides)."""
    raw = dict(raw or {})
    errors: list[str] = []
    for override in overrides:
        _apply_override(raw, override, errors)
    cfg = _build(Config, raw, "", errors, where)
    if not errors:
        errors += _validate(cfg, where)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config; ``name`` defaults to the file's stem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, str(path), overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def recorded_config(raw: dict) -> dict:
    """A config dict an earlier run recorded (a store's meta, a run folder's config.json),
    with the keys added since at their defaults, so that it compares equal to the same
    settings today (a new key such as ``train.sharding`` must not make every earlier store
    "made with other settings"). A dict that no longer builds (a key since removed) comes
    back as it was: it differs, as it should."""
    errors: list[str] = []
    cfg = _build(Config, dict(raw or {}), "", errors, "recorded config")
    return raw if errors else config_to_dict(cfg)


# ---------------------------------------------------------------- same settings?

_ABSENT = object()


def _as_json(settings: Any) -> Any:
    """``settings`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(settings, sort_keys=True))


def differing_settings(recorded: Any, wanted: Any, keys: Sequence[str] | None = None) -> list[str]:
    """The keys whose values differ between ``recorded`` settings (read back from a file or a
    store's meta) and ``wanted`` ones (e.g. sections of ``config_to_dict(cfg)``), compared as
    JSON; [] means the same settings. ``keys``: those to compare (default: every key of either)."""
    recorded = _as_json(recorded) if isinstance(recorded, dict) else {}
    wanted = _as_json(wanted)
    keys = sorted(set(recorded) | set(wanted)) if keys is None else list(keys)
    return [k for k in keys if recorded.get(k, _ABSENT) != wanted.get(k, _ABSENT)]


def _section_type(tp: Any) -> type | None:
    """The dataclass of a config field's type (``TrainConfig``, ``FinetuneConfig | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def dotted_settings(raw: Mapping[str, Any], cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """A config dict (``config_to_dict``) as {dotted key: value}, one entry per setting:
    sections (``train``, ``tune.asha``) are opened, a mapping setting (``tune.space``,
    ``model.kwargs``) is one value, keys the schema does not know are kept as they are.
    ``differing_settings`` of two of them names the settings that differ (``twa.lr``)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        section = _section_type(hints.get(key))
        if section is not None and isinstance(value, Mapping):
            out.update(dotted_settings(value, section, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def settings_fingerprint(settings: dict) -> str:
    """10 hex digits that change with any of ``settings`` (JSON-able): deterministic run names."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
