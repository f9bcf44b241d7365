"""A sweep's run-folder files: tune_results.parquet, best.json, tune.png (metric against each
swept parameter, best trial marked) and the trials' TensorBoard events."""
import json
from types import SimpleNamespace

import pyarrow.parquet as pq

from twa_ray.output import plots
from twa_ray.output.atomic import write_json
from twa_ray.output.tensorboard import EVENTS_DIR
from twa_ray.tune.report import write_sweep_outputs

ROWS = [
    {"trial_id": "t1", "twa.candidates": "all", "twa.lr": 0.01, "subspace_size": 5, "final_select_acc": 61.0,
     "epochs_run": 2, "status": "completed"},
    {"trial_id": "t2", "twa.candidates": "last:3", "twa.lr": 0.01, "subspace_size": 3, "final_select_acc": 64.0,
     "epochs_run": 2, "status": "completed"},
    {"trial_id": "t3", "twa.candidates": "all", "twa.lr": 1.0, "subspace_size": 5, "final_select_acc": 70.0,
     "epochs_run": 2, "status": "completed"},
    {"trial_id": "t4", "twa.candidates": "last:3", "twa.lr": 1.0, "subspace_size": 3, "final_select_acc": None,
     "epochs_run": 0, "status": "error"},
]
BEST = {"trial_id": "t3", "params": {"twa.candidates": "all", "twa.lr": 1.0}, "metric": "select_acc",
        "selection_metric": 70.0, "checkpoint_path": "/somewhere", "test_acc": 68.5}


def test_sweep_outputs_and_the_tune_plot(tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    write_json(tmp_path / "tune_trials" / "t3.json", {"trial_id": "t3", "history": [
        {"round": 0, "epoch": 1, "select_acc": 66.0}, {"round": 0, "epoch": 2, "select_acc": 70.0}]})

    write_sweep_outputs(tmp_path, SimpleNamespace(rows=ROWS, best=dict(BEST)), "select_acc", tensorboard=True)

    assert [r["trial_id"] for r in pq.read_table(tmp_path / "tune_results.parquet").to_pylist()] == ["t1", "t2", "t3", "t4"]
    assert json.loads((tmp_path / "best.json").read_text())["test_acc"] == 68.5
    assert "checkpoint_path" not in json.loads((tmp_path / "best.json").read_text())
    assert (tmp_path / "plots" / "tune.png").read_bytes()[:4] == b"\x89PNG"

    (fig,) = figures
    candidates, lr = [ax for ax in fig.axes if ax.axison]
    assert candidates.get_xlabel() == "twa.candidates" and lr.get_xlabel() == "twa.lr"
    assert [t.get_text() for t in candidates.get_xticklabels()] == ["all (n=5)", "last:3 (n=3)"]
    assert lr.get_xscale() == "log"  # 0.01 .. 1
    for ax, best_x in ((candidates, 0), (lr, 1.0)):
        trials, star = ax.collections  # every trial with a value, then the best one
        assert len(trials.get_offsets()) == 3
        assert star.get_offsets().tolist() == [[best_x, 70.0]]
    assert "1 without a value" in fig._suptitle.get_text()

    events = sorted(p.name for p in (tmp_path / EVENTS_DIR).iterdir())
    assert events == ["trial_t1", "trial_t2", "trial_t3", "trial_t4"]


def test_no_tensorboard_unless_asked(tmp_path):
    write_sweep_outputs(tmp_path, SimpleNamespace(rows=ROWS, best=dict(BEST)), "select_acc")
    assert not (tmp_path / EVENTS_DIR).exists()
