"""Candidates from a real Ray Train run (2 checkpoints) and a real Ray Tune experiment (3
trials, one failing): each run's or trial's last checkpoint, or its best by a metric, read
with Ray's own ``Result.from_path`` and imported through ``twa_ray.tune.ray_results``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from twa_ray.core.params import ParamLayout, flatten_state
from twa_ray.store import CheckpointError
from twa_ray.store import find_checkpoints as store_find_checkpoints
from twa_ray.tune.ray_results import find_checkpoints, import_checkpoints, ray_results_kind

pytestmark = pytest.mark.ray

ACC = (0.9, 0.5)  # reported with checkpoints 1 and 2: the best by acc (max) is the first, not the last


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _state(value: float) -> dict[str, torch.Tensor]:
    """_model()'s parameters, every entry ``value``: tells the checkpoints apart."""
    return {k: torch.full_like(v, value) for k, v in _model().state_dict().items()}


def _row(value: float) -> torch.Tensor:
    return flatten_state(_state(value), ParamLayout.from_model(_model()))


@pytest.fixture(scope="module")
def ray_folders(ray_local, tmp_path_factory):
    """(Train run folder, Tune experiment folder), each written by Ray. The loops are local
    functions, so Ray ships them by value; they import what they need themselves."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = tmp_path_factory.mktemp("ray_results")
    model_state = {k: v.shape for k, v in _model().state_dict().items()}

    def train_loop(config):
        import ray.train
        import torch

        from twa_ray.runtime.checkpoints import ray_checkpoint

        for step, acc in enumerate(config["acc"], start=1):
            state = {"model": {k: torch.full(s, float(step)) for k, s in config["shapes"].items()}}
            with ray_checkpoint(state, {"step": step}) as checkpoint:
                ray.train.report({"acc": acc, "step": step}, checkpoint=checkpoint)

    trainer = TorchTrainer(train_loop, train_loop_config={"acc": ACC, "shapes": model_state},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="train_run", storage_path=str(storage)))
    trainer.fit()

    def trial(config):
        import tempfile

        import ray.tune
        import torch

        from twa_ray.parallel.checkpoint_files import save_checkpoint

        for step, acc in enumerate(ACC, start=1):
            if config["shift"] < 0 and step == 2:
                raise RuntimeError("this trial fails after its first checkpoint")
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(folder, {"model": {k: torch.full(s, config["shift"] * 10 + step)
                                                   for k, s in config["shapes"].items()}}, {"step": step})
                ray.tune.report({"acc": acc, "step": step}, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    tuner = ray.tune.Tuner(ray.tune.with_resources(trial, {"cpu": 0.5}),
                           param_space={"shift": ray.tune.grid_search([1.0, -1.0, 2.0]), "shapes": model_state},
                           run_config=ray.tune.RunConfig(name="tune_experiment", storage_path=str(storage), verbose=0))
    tuner.fit()
    return storage / "train_run", storage / "tune_experiment"


def test_a_ray_train_run_gives_its_last_or_best_checkpoint(ray_folders, tmp_path):
    run, _ = ray_folders
    assert ray_results_kind(run) == "train_run" and ray_results_kind(run.parent) == "train_runs"
    (last,) = find_checkpoints(run)
    (best,) = find_checkpoints(run, metric="acc", mode="max")
    assert last.path.name == best.path.name == "state.pt" and last.entry != best.entry
    store = import_checkpoints(run, tmp_path / "last", _model())
    torch.testing.assert_close(store.read(), _row(2.0)[None], rtol=0, atol=0)
    store = import_checkpoints(run, tmp_path / "best", _model(), metric="acc", mode="max")
    torch.testing.assert_close(store.read(), _row(1.0)[None], rtol=0, atol=0)
    assert store.meta["import"]["entries"] == [best.entry] and best.entry.startswith("checkpoint_")
    assert len(store_find_checkpoints(run)) == 2  # the store alone: every checkpoint of the run
    with pytest.raises(CheckpointError, match=f"{run}: no checkpoint was reported with the metric 'loss'"):
        find_checkpoints(run, metric="loss")


def test_a_tune_experiment_gives_each_trials_last_or_best_checkpoint(ray_folders, tmp_path, caplog):
    _, experiment = ray_folders
    assert ray_results_kind(experiment) == "tune_experiment"
    assert (experiment / "tuner.pkl").exists()  # never read: cloudpickle
    trials = sorted(p.name for p in experiment.iterdir() if p.is_dir())
    assert len(trials) == 3 and sum((experiment / t / "error.pkl").exists() for t in trials) == 1
    with caplog.at_level("WARNING"):
        store = import_checkpoints(experiment, tmp_path / "last", _model())
    assert "skipping the failed trial" in caplog.text
    torch.testing.assert_close(store.read(), torch.stack([_row(12.0), _row(22.0)]), rtol=0, atol=0)  # grid order
    entries = store.meta["import"]["entries"]
    assert [Path(e).parts[0] for e in entries] == [t for t in trials if not (experiment / t / "error.pkl").exists()]
    store = import_checkpoints(experiment, tmp_path / "best", _model(), metric="acc", mode="max")
    torch.testing.assert_close(store.read(), torch.stack([_row(11.0), _row(21.0)]), rtol=0, atol=0)
    store = import_checkpoints(experiment, tmp_path / "min", _model(), metric="acc", mode="min")
    torch.testing.assert_close(store.read(), torch.stack([_row(12.0), _row(22.0)]), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="Ray Tune experiment"):
        store_find_checkpoints(experiment)  # the store points here instead


def test_other_folders_go_to_the_store_and_a_metric_needs_ray_results(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    torch.save(_state(1.0), folder / "0.pt")
    assert ray_results_kind(folder) is None
    assert [c.entry for c in find_checkpoints(folder)] == ["0.pt"]
    with pytest.raises(CheckpointError, match="picks among a run's checkpoints only"):
        find_checkpoints(folder, metric="acc")
    assert os.listdir(folder) == ["0.pt"]
