"""report.tensorboard: event files per stage and per sweep trial, read back with TensorBoard's own reader."""
import pytest

from twa_ray.output.atomic import write_rows
from twa_ray.output.run_folder import stage_rows
from twa_ray.output.tensorboard import EVENTS_DIR, row_steps, write_run_events, write_sweep_events

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(folder):
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(s.step, pytest.approx(s.value)) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_row_steps_are_epochs_or_positions():
    assert row_steps([{"epoch": 3}, {"epoch": 4}, {"epoch": 5.0}]) == [3, 4, 5]
    assert row_steps([{"round": 0, "epoch": 1}, {"round": 0, "epoch": 2}, {"round": 1, "epoch": 1}]) == [1, 2, 3]
    assert row_steps([{"loss": 1.0}, {"loss": 0.5}]) == [1, 2]
    assert row_steps([{"epoch": 1.5}, {"epoch": 2}]) == [1, 2]


def test_every_stage_of_the_metrics_file_becomes_a_run(tmp_path):
    base = [{"epoch": e, "step": 30 * e, "train_loss": 1.0 / e, "val_acc": 50.0 + e, "lr": 0.1, "train_examples": 90}
            for e in (1, 2, 3)]
    twa = [{"round": r, "epoch": e, "step": 7 * e, "train_loss": 0.4 - 0.1 * r, "select_acc": 60.0 + r + e}
           for r in (0, 1) for e in (1, 2)]
    full = [{"epoch": e, "train_loss": 0.2, "val_acc": 55.0 + e} for e in (4, 5)]
    write_rows(tmp_path / "metrics.parquet",
               stage_rows("base_train", base) + stage_rows("twa", twa) + stage_rows("full_budget", full))
    (tmp_path / EVENTS_DIR / "stale").mkdir(parents=True)  # an earlier writing's leftovers go

    out = write_run_events(tmp_path)

    assert out == tmp_path / EVENTS_DIR
    assert sorted(p.name for p in out.iterdir()) == ["base_train", "full_budget", "twa"]
    scalars, _ = read_events(out / "base_train")
    assert sorted(scalars) == ["lr", "train_loss", "val_acc"]  # no epoch/step/round/stage/example-count scalars
    assert scalars["val_acc"] == [(1, 51.0), (2, 52.0), (3, 53.0)]
    scalars, _ = read_events(out / "twa")
    assert scalars["select_acc"] == [(1, 61.0), (2, 62.0), (3, 62.0), (4, 63.0)]  # two rounds, counted on
    scalars, _ = read_events(out / "full_budget")
    assert scalars["val_acc"] == [(4, 59.0), (5, 60.0)]  # continues base training's epochs


def test_sweep_trials_with_history_and_parameters(tmp_path):
    trials = [
        {"trial_id": "a_001", "twa.lr": 0.1, "twa.candidates": "all", "final_select_acc": 70.0, "epochs_run": 2},
        {"trial_id": "b_002", "twa.lr": 0.5, "twa.candidates": "last:3", "final_select_acc": 65.0, "epochs_run": 1},
        {"trial_id": "c_003", "twa.lr": 0.9, "twa.candidates": "all", "final_select_acc": None, "epochs_run": 0},
    ]
    histories = {"a_001": [{"round": 0, "epoch": 1, "select_acc": 68.0, "train_loss": 0.5},
                           {"round": 0, "epoch": 2, "select_acc": 70.0, "train_loss": 0.4}]}

    out = write_sweep_events(tmp_path, trials, histories, ["twa.lr", "twa.candidates"], "final_select_acc")

    assert sorted(p.name for p in out.iterdir()) == ["trial_a_001", "trial_b_002", "trial_c_003"]
    scalars, acc = read_events(out / "trial_a_001")
    assert scalars["select_acc"] == [(1, 68.0), (2, 70.0)] and scalars["train_loss"][1] == (2, 0.4)
    assert scalars["hparam/final_select_acc"][0][1] == 70.0
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    scalars, _ = read_events(out / "trial_b_002")  # stopped early: no record, its final value only
    assert scalars["select_acc"] == [(1, 65.0)]
    scalars, acc = read_events(out / "trial_c_003")  # errored: nothing to chart
    assert scalars == {}
    with pytest.raises(KeyError):
        acc.PluginTagToContent("hparams")
