"""The methods registry (``output.methods``): one entry per method, read by the results
table, report.html and the plots; a method registered in a test shows up in all three."""
import html
import re

import pytest

from twa_ray.config import BaselinesConfig, Config
from twa_ray.output import methods, plots
from twa_ray.output.atomic import write_json
from twa_ray.output.console import method_rows, results_table
from twa_ray.output.methods import MAIN, SOUP, Method, Style, job_methods, legend_order, method
from twa_ray.output.report import render_report

from test_plots import METRICS, SUMMARY  # a main job's summary.json and metrics.parquet rows


def median_members(candidates, cfg):
    """A fake baseline: the middle candidate taken after training began."""
    trained = [index for index, info in candidates if info.get("kind") != "initial"]
    return [trained[len(trained) // 2]]


MEDIAN = Method("median", "median candidate", style=Style("tab:olive", "o", 5), cost=methods.at_base_end,
                members=median_members)


@pytest.fixture
def median(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "median", MEDIAN)
    return MEDIAN


def legend_texts(monkeypatch, draw):
    """The legend lines of the figure ``draw()`` saves (``plots._save`` caught)."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    draw()
    (fig,) = figures
    legends = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_each_job_lists_its_methods_in_summary_order():
    assert [m.name for m in job_methods(MAIN)] == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute",
                                                   "twa"]
    assert [m.name for m in job_methods(SOUP)] == ["best_individual", "uniform_soup", "greedy_soup", "twa"]
    assert legend_order([m.name for m in job_methods(MAIN)]) == ["last", "swa", "ema", "best_k", "twa",
                                                                 "sgd_same_compute", "full_budget"]
    assert [m.name for m in job_methods(MAIN) if m.members] == ["last", "swa", "best_k"]
    assert [m.name for m in job_methods(SOUP) if m.soup] == ["best_individual", "uniform_soup", "greedy_soup"]
    assert {m.name: m.label for m in methods.METHODS.values()} == {
        "last": "last", "swa": "SWA", "ema": "EMA", "best_k": "best-k", "full_budget": "full budget",
        "sgd_same_compute": "SGD, same compute", "best_individual": "best individual", "uniform_soup": "uniform soup",
        "greedy_soup": "greedy soup", "twa": "TWA"}


def test_members_rules():
    infos = [(0, {"kind": "initial"}), (1, {"kind": "epoch", "metrics": {"val_acc": 60.0}}),
             (2, {"kind": "epoch", "metrics": {"val_acc": 75.0}}), (3, {"kind": "epoch", "metrics": {"val_acc": 70.0}})]

    Cfg = Config(baselines=BaselinesConfig(best_k=2))  # image classification: best val_acc

    assert method("last").members(infos, Cfg) == [3]
    assert method("swa").members(infos, Cfg) == [1, 2, 3]
    assert method("best_k").members(infos, Cfg) == [2, 3]
    assert method("last").members(infos[:1], Cfg) == [0]  # only the initial weights: they are the last


def test_an_unknown_name_gets_a_plain_entry():
    entry = method("mystery_method")
    assert entry.label == "mystery method" and entry.style.marker is None and entry.members is None
    assert entry.cost({"base_epochs": 3, "time_s": {"base_train": 5.0}}) == (3.0, 5.0, "train")
    assert entry.cost({"num_models": 2, "time_s": {"soups": 1.0}}) == (None, 1.0, "2 fine-tuned models, chosen on val")


def test_a_registered_method_shows_in_the_table_the_report_and_the_plot_legend(median, monkeypatch, tmp_path):
    summary = {**SUMMARY, "test_acc": {**SUMMARY["test_acc"], "median": 83.1},
               "test_loss": {**SUMMARY["test_loss"], "median": 0.47}}
    # the results table: its label, and its cost as its entry reads it (base training's)
    row = {r["key"]: r for r in method_rows(summary)}["median"]
    assert (row["method"], row["epochs"], row["compute_s"], row["trained_on"]) == (
        "median candidate", 4.0, 6.0, "fashion_mnist train")
    line = next(line for line in results_table(summary).splitlines() if line.startswith("median candidate"))
    assert line.split()[2:] == ["83.10", "0.4700", "4", "6.0", "fashion_mnist", "train"]
    # report.html's results table
    write_json(tmp_path / "summary.json", summary)
    cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", render_report(tmp_path))]
    at = cells.index("median candidate")
    assert cells[at:at + 6] == ["median candidate", "83.10", "0.4700", "4", "6.0", "fashion_mnist train"]
    # accuracy.png: a point at base training's end, in its legend place (after TWA, before the full budget)
    marks = plots.accuracy_plot(summary, METRICS).marks
    assert [m.method for m in marks] == ["last", "swa", "ema", "best_k", "twa", "median", "full_budget"]
    legend = legend_texts(monkeypatch, lambda: plots.plot_accuracy(tmp_path / "accuracy.png", summary, METRICS))
    assert "median candidate (test) 83.10%" in legend
    assert legend.index("median candidate (test) 83.10%") == legend.index("TWA (test) 84.00%") + 1


def test_soups_plot_draws_each_method_from_its_entry(median, monkeypatch, tmp_path):
    legend = legend_texts(monkeypatch, lambda: plots.plot_soups(
        tmp_path / "soups.png", [70.0, 71.0], {"greedy_soup": 72.0, "twa": 73.0, "median": 71.5}))
    assert legend == ["greedy soup 72.00%", "TWA 73.00%", "median candidate 71.50%", "fine-tuned models"]


def test_sgd_same_compute_is_produced_by_the_main_job():
    entry = method("sgd_same_compute")
    assert entry.produced and entry.jobs == (MAIN,) and entry.members is None  # its weights come from a stage
    assert "sgd_same_compute" in [m.name for m in job_methods(MAIN)]  # summary.json lists it
    # a summary that has it: base training plus TWA's epochs, base training's compute plus its own stage's
    summary = {**SUMMARY, "epochs": {"base": 4, "twa": 2, "full_budget": 8},
               "test_acc": {**SUMMARY["test_acc"], "sgd_same_compute": 83.5},
               "time_s": {**SUMMARY["time_s"], "sgd_same_compute": {"startup": 1.0, "compute": 3.5}}}
    row = {r["key"]: r for r in method_rows(summary)}["sgd_same_compute"]
    assert (row["method"], row["epochs"], row["compute_s"], row["trained_on"]) == (
        "SGD, same compute", 6.0, 9.5, "fashion_mnist train")
    assert "SGD, same compute" in results_table(summary)
    marks = [m.method for m in plots.accuracy_plot(summary, METRICS).marks]
    assert marks == ["last", "swa", "ema", "best_k", "twa", "sgd_same_compute", "full_budget"]
    assert "sgd_same_compute" not in results_table(SUMMARY)  # listed only where a summary has it
