"""The main job's evaluation choices and summary.json (``pipelines.main``), without Ray:
the parallel evaluation is replaced by the same evaluation in this process."""
import json
from types import SimpleNamespace

import pytest
import torch

from twa_ray.config import config_from_dict
from twa_ray.core.baselines import swa_vector
from twa_ray.core.params import ParamLayout, flatten_params, flatten_state
from twa_ray.data.from_config import splits_from_config
from twa_ray.models.from_config import model_from_config
from twa_ray.pipelines import main
from twa_ray.runtime.base_train import BaseTrainResult
from twa_ray.runtime.evaluation import EvaluationRun, evaluate_sources
from twa_ray.store import CandidateStore

VAL_ACC = {1: 60.0, 2: 75.0, 3: 70.0}  # per epoch candidate


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A store of four candidates (initial + 3 epochs) of a BatchNorm CNN, a TWA result over all four."""
    cfg = config_from_dict({
        "name": "unit", "output_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 16, "eval_batch_size": 32,
                 "synthetic": {"num_train": 96, "num_test": 48, "num_classes": 3, "channels": 1, "image_size": 8}},
        "model": {"name": "small_cnn", "kwargs": {"widths": [4, 4, 4]}},
        "train": {"epochs": 3, "budget_epochs": 6}, "twa": {"bn_batches": 2}, "baselines": {"best_k": 2},
    })
    net = model_from_config(cfg, splits_from_config(cfg))
    store = CandidateStore.create_for_model(cfg.store_uri, net)
    gen = torch.Generator().manual_seed(0)
    w0 = flatten_params(net)
    store.append_flat(w0, {"kind": "initial", "epoch": 0, "step": 0, "metrics": {}})
    for epoch, acc in VAL_ACC.items():
        store.append_flat(w0 + 0.3 * torch.randn(w0.shape, generator=gen),
                          {"kind": "epoch", "epoch": epoch, "step": 6 * epoch, "metrics": {"val_acc": acc}})
    base = BaseTrainResult(store.uri, 4, [{"epoch": e, "val_acc": a, "time": 2.0, "train_examples": 72}
                                           for e, a in VAL_ACC.items()], 10.0)
    weights = swa_vector(store.read())
    twa = SimpleNamespace(rounds=[[0, 1, 2, 3]], weights=weights, coefficients=[torch.zeros(4, 2)],
                          block_names=["a", "b"], history=[{"epoch": 1, "epoch_time_s": 1.5, "examples": 72}], projection_bytes=[64],
                          wall_time_s=4.0)
    calls = []

    def in_process(cfg, sources, store_uri=None, cwd=None, keep_state=(), max_tasks=None):
        calls.append(dict(sources))
        results = evaluate_sources(cfg, sources, store_uri, cwd, keep_state)
        return EvaluationRun(results, 1, 3.0, sum(r.time_s for r in results.values()))

    monkeypatch.setattr(main, "evaluate_parallel", in_process)
    return cfg, store, base, twa, calls


def test_each_baseline_averages_the_right_candidates_and_is_evaluated_once(run):
    cfg, store, base, twa, calls = run
    evaluation = main.evaluate_run(cfg, base, twa)
    (sources,) = calls
    assert sources["last"] == 3 and sources["swa"] == [1, 2, 3]  # the random initial weights never enter SWA
    assert sources["best_k"] == [2, 3]  # the two best val accuracies
    assert not any(k.startswith("cand:") for k in sources)  # eval.candidates is off by default
    assert "ema" not in sources and "full_budget" not in sources  # no checkpoint to read an EMA from
    assert evaluation.members == {"last": [3], "swa": [1, 2, 3], "best_k": [2, 3], "twa": [0, 1, 2, 3]}
    assert evaluation.initial == [0]
    # SWA is the mean of candidates 1-3: the same evaluation of that vector gives the same numbers
    alone = evaluate_sources(cfg, {"mean": swa_vector(store.read(candidates=[1, 2, 3]))}, store.uri)["mean"]
    assert (evaluation.results["swa"].accuracy, evaluation.results["swa"].loss) == (alone.accuracy, alone.loss)


def test_the_baselines_take_every_stored_candidate_whatever_window_twa_learns_over(run):
    cfg, store, base, twa, calls = run
    twa.rounds = [[0, 1]]  # a window of the first two: TWA's subset would give last 1, SWA [1], best-k [1]
    evaluation = main.evaluate_run(cfg, base, twa)
    (sources,) = calls
    assert sources["last"] == 3 and sources["swa"] == [1, 2, 3] and sources["best_k"] == [2, 3]
    assert evaluation.members["twa"] == [0, 1] and evaluation.members["swa"] == [1, 2, 3]


def test_candidates_are_evaluated_only_when_asked_and_last_is_not_repeated(run):
    cfg, store, base, twa, calls = run
    cfg.eval.candidates = True
    evaluation = main.evaluate_run(cfg, base, twa)
    (sources,) = calls
    assert "last" not in sources and [k for k in sources if k.startswith("cand:")] == ["cand:0", "cand:1", "cand:2", "cand:3"]
    assert evaluation.results["last"] is evaluation.results["cand:3"]
    epochs, accs = main.candidate_curve(store.uri, evaluation.results)
    assert epochs == [0.0, 1.0, 2.0, 3.0] and len(accs) == 4


def test_summary_and_run_folder(run):
    cfg, store, base, twa, _ = run
    evaluation = main.evaluate_run(cfg, base, twa)
    summary = main.write_run(cfg, main.Path(cfg.run_dir), base, twa, None, evaluation)
    assert json.loads((main.Path(cfg.run_dir) / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(summary["test_acc"]) == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute", "twa"]
    assert summary["test_acc"]["ema"] is None and summary["test_acc"]["full_budget"] is None
    assert summary["test_acc"]["sgd_same_compute"] is None and summary["time_s"]["sgd_same_compute"] is None
    assert summary["test_loss"]["swa"] == evaluation.results["swa"].loss
    assert summary["swa_candidates"] == 3 and summary["best_k_candidates"] == [2, 3]
    assert summary["twa_includes_initial"] is True  # twa.candidates "all" takes candidate 0
    assert summary["trained_on"]["twa"] == "train" and summary["selected_on"] == {"best_k": "val"}
    assert summary["epochs"] == {"base": 3, "twa": 2, "full_budget": None, "sgd_same_compute": None}
    assert summary["time_s"]["base_train"] == {"startup": 4.0, "compute": 6.0}  # 10 s wall, 3 epochs of 2 s
    assert summary["time_s"]["twa"] == {"startup": 2.5, "compute": 1.5}
    assert summary["time_s"]["full_budget"] is None and summary["cost_ratio"] is None and summary["wall_ratio"] is None
    # a TWA epoch (1.5 s over the 72 training images) against an SGD epoch (2 s over the same 72)
    assert summary["twa_epoch_vs_sgd_epoch"] == pytest.approx(0.75)
    assert (main.Path(cfg.run_dir) / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_twa_v_says_it_saw_the_val_split(run):
    cfg, store, base, twa, _ = run
    cfg.twa.data = "val"
    cfg.twa.candidates = "last:3"
    twa_v = SimpleNamespace(**{**vars(twa), "rounds": [[1, 2, 3]],
                               "history": [{"epoch": 1, "epoch_time_s": 1.5, "examples": 24}]})
    summary = main.twa_summary(cfg, base, twa_v, None, main.evaluate_run(cfg, base, twa_v))
    assert summary["trained_on"]["twa"] == "train+val" and summary["trained_on"]["swa"] == "train"
    # a TWA-v epoch runs over the 24 val images: per example it costs 3x the SGD epoch's 72
    assert summary["twa_epoch_vs_sgd_epoch"] == pytest.approx(0.75 * 72 / 24)
    assert summary["twa_includes_initial"] is False


def test_the_epoch_cost_ratio_counts_the_examples_the_workers_counted_and_is_none_without_them():
    base = [{"time": 2.0, "train_examples": 100}, {"time": 4.0, "train_examples": 100}]
    assert main.epoch_cost_ratio(base, [{"epoch_time_s": 0.3, "examples": 10}]) == pytest.approx(0.03 / 0.03)
    assert main.epoch_cost_ratio([{"time": 2.0}], [{"epoch_time_s": 0.3, "examples": 10}]) is None  # an older store
    assert main.epoch_cost_ratio(base, [{"epoch_time_s": 0.3}]) is None


def test_cost_ratios_are_compute_and_wall_of_base_plus_twa_over_the_full_budget():
    times = {"base_train": main.stage_time(14.0, 10.0), "twa": main.stage_time(6.0, 3.0),
             "full_budget": main.stage_time(12.0, 10.0)}
    assert times["base_train"] == {"startup": 4.0, "compute": 10.0}
    cost, wall = main.cost_ratios(times)  # the full budget continued base training: it costs base + its own
    assert cost == pytest.approx((10 + 3) / (10 + 10)) and wall == pytest.approx((14 + 6) / (14 + 12))
    cost, wall = main.cost_ratios(times, continued=False)  # trained from the start: its own run alone
    assert cost == pytest.approx(13 / 10) and wall == pytest.approx(20 / 12)
    assert main.cost_ratios({**times, "full_budget": None}) == (None, None)
    assert main.stage_time(0.0, 8.0) == {"startup": 0.0, "compute": 8.0}  # reused: no start-up in this run


def test_swa_and_best_k_read_the_store_one_candidate_at_a_time(run, monkeypatch):
    """The averages stream: n x D candidates are never in memory together."""
    cfg, store, _, _, _ = run
    reference = store.read(candidates=[1, 2, 3]).double().mean(0)
    rows = []
    read = CandidateStore.read

    def spy(self, columns=None, candidates=None):
        out = read(self, columns, candidates)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(CandidateStore, "read", spy)
    results = evaluate_sources(cfg, {"swa": [1, 2, 3], "best_k": [2, 3]}, store.uri, keep_state=("swa",))
    assert rows == [1] * 5  # one candidate per read
    layout = ParamLayout(tuple(store.names), tuple(tuple(s) for s in store.shapes))
    swa = flatten_state(results["swa"].state_dict, layout)
    torch.testing.assert_close(swa.double(), reference, rtol=2.0 ** -24, atol=0)  # float32 rounding only


def test_a_registered_baseline_is_averaged_evaluated_and_summarised_without_other_edits(run, monkeypatch):
    from twa_ray.output import methods

    def median(candidates, cfg):  # the middle candidate taken after training began
        trained = [index for index, info in candidates if info.get("kind") != "initial"]
        return [trained[len(trained) // 2]]

    def first_two(candidates, cfg):
        return [index for index, _ in candidates][:2]

    monkeypatch.setitem(methods.METHODS, "median", methods.Method("median", "median", members=median))
    monkeypatch.setitem(methods.METHODS, "first_two", methods.Method("first_two", "first two", members=first_two))
    cfg, store, base, twa, calls = run
    evaluation = main.evaluate_run(cfg, base, twa)
    (sources,) = calls
    assert sources["median"] == 2 and sources["first_two"] == [0, 1]  # one candidate is that candidate
    assert evaluation.members["median"] == [2]
    summary = main.twa_summary(cfg, base, twa, None, evaluation)
    assert list(summary["test_acc"]) == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute", "twa",
                                         "median", "first_two"]
    assert summary["test_acc"]["median"] == evaluation.results["median"].accuracy
    assert summary["trained_on"]["median"] == "train" and summary["selected_on"] == {"best_k": "val"}
    # with every candidate evaluated, a one-candidate method is that candidate's result, evaluated once
    calls.clear()
    cfg.eval.candidates = True
    evaluation = main.evaluate_run(cfg, base, twa)
    (sources,) = calls
    assert "median" not in sources and evaluation.results["median"] is evaluation.results["cand:2"]


def test_sgd_at_equal_compute_is_evaluated_summarised_and_shown(run, monkeypatch):
    """With the full budget: the full budget's and SGD at equal compute's final weights
    (their stages' checkpoints) evaluated, summary.json's keys in the registry's order, the
    console's table, accuracy.png and report.html list SGD at equal compute."""
    import pyarrow.parquet as pq

    from twa_ray.output.console import method_rows, results_table, row_cells
    from twa_ray.output.report import render_report
    from twa_ray.runtime import base_train

    cfg, store, base, twa, calls = run
    cfg.compare_full_budget = True
    finals = {"full": store.read(candidates=[3])[0] * 1.01, "same": store.read(candidates=[3])[0] * 0.99}
    monkeypatch.setattr(base_train, "read_final", lambda path, layout: (finals[path], None))
    base.checkpoint_path = "base"
    finals["base"] = store.read(candidates=[3])[0]
    full = BaseTrainResult(None, 0, [{"epoch": e, "val_acc": 80.0, "time": 2.5} for e in (4, 5, 6)], 9.0,
                           checkpoint_path="full")
    same = BaseTrainResult(None, 0, [{"epoch": e, "val_acc": 79.0, "time": 2.5} for e in (4, 5)], 8.0,
                           checkpoint_path="same")
    evaluation = main.evaluate_run(cfg, base, twa, full, same)
    (sources,) = calls
    assert torch.equal(sources["sgd_same_compute"], finals["same"])
    assert torch.equal(sources["full_budget"], finals["full"])
    summary = main.write_run(cfg, main.Path(cfg.run_dir), base, twa, full, evaluation, same)
    assert list(summary["test_acc"]) == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute", "twa"]
    assert list(summary["test_loss"]) == list(summary["test_acc"])
    result = evaluation.results["sgd_same_compute"]
    assert (summary["test_acc"]["sgd_same_compute"], summary["test_loss"]["sgd_same_compute"]) == (
        result.accuracy, result.loss)
    assert summary["epochs"] == {"base": 3, "twa": 2, "full_budget": 6, "sgd_same_compute": 5}  # base + TWA's
    assert summary["time_s"]["sgd_same_compute"] == {"startup": 3.0, "compute": 5.0}  # 8 s wall, 2 epochs of 2.5 s
    assert list(summary["time_s"]) == ["base_train", "twa", "full_budget", "sgd_same_compute", "evaluation"]
    written = json.loads((main.Path(cfg.run_dir) / "summary.json").read_text())
    assert written["test_acc"]["sgd_same_compute"] == result.accuracy
    # the results table: base training's 3 epochs + TWA's 2, base training's 6 s + its own 5 s
    cells = {r["key"]: row_cells(r) for r in method_rows(summary)}["sgd_same_compute"]
    assert cells == ["SGD, same compute", f"{result.accuracy:.2f}", f"{result.loss:.4f}", "5", "11.0",
                     "synthetic train"]
    table = results_table(summary)
    assert any(line.split("  ")[0] == "SGD, same compute" for line in table.splitlines())
    assert table.index("full budget") < table.index("SGD, same compute") < table.index("TWA")
    stages = pq.read_table(main.Path(cfg.run_dir) / "metrics.parquet").column("stage").to_pylist()
    assert stages.count("sgd_same_compute") == 2  # its epochs, for accuracy.png's curve
    html = render_report(cfg.run_dir)
    assert "SGD, same compute" in html and f"{result.accuracy:.2f}" in html
