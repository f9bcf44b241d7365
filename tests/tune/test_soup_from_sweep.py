"""`twa-ray soup --from DIR` over a real Ray Tune fine-tuning sweep: each trial fine-tunes the
same start with its own lr and reports its model as a checkpoint; the soup job learns TWA-v over
the trials' final models and compares it with the best trial, the uniform and the greedy soup.
The task is the tests' own (tests/tasks/tiny_tasks.py: regression, mse, lower is better)."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT
from twa_ray.cli import main

pytestmark = pytest.mark.ray

TASK = "tests.tasks.tiny_tasks:Regression"
LRS = (0.003, 0.03, 0.1)


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    """A Tune experiment folder: one trial per lr, each reporting its fine-tuned model (model.pt)
    after each of 2 epochs."""
    import ray.tune

    storage = tmp_path_factory.mktemp("sweep")

    def finetune(config):
        import tempfile
        from pathlib import Path

        import ray.tune
        import torch

        from tests.tasks.tiny_tasks import Regression

        task = Regression()
        torch.manual_seed(0)  # the same start for every trial
        model = task.build_model()
        train = task.datasets().train
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
        for epoch in range(2):
            for i in range(0, len(train), 16):
                optimizer.zero_grad()
                (task.loss(model, train[i:i + 16]) / 16).backward()
                optimizer.step()
            with tempfile.TemporaryDirectory() as folder:
                torch.save(model.state_dict(), Path(folder) / "model.pt")
                ray.tune.report({"epoch": epoch}, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    tuner = ray.tune.Tuner(ray.tune.with_resources(finetune, {"cpu": 0.5}),
                           param_space={"lr": ray.tune.grid_search(list(LRS))},
                           run_config=ray.tune.RunConfig(name="finetune", storage_path=str(storage)))
    grid = tuner.fit()
    assert not grid.errors
    return storage / "finetune"


def test_soup_from_a_tune_sweep_averages_the_trials_final_models(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "soup.yaml"
    config.write_text(f"task: {TASK}\noutput_dir: {tmp_path / 'run'}\ndata: {{batch_size: 16}}\n"
                      "twa: {data: val, bits: 8, epochs: 3, lr: 0.3, select_ratio: 0.5}\n")
    assert main(["soup", "--config", str(config), "--from", str(sweep)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["checkpoints_dir"] == str(sweep) and summary["num_models"] == len(LRS)
    assert (summary["metric"], summary["higher_is_better"]) == ("mse", False)
    assert list(summary["test_mse"]) == ["best_individual", "uniform_soup", "greedy_soup", "twa"]
    # the best trial is the one with the lowest val mse, and the soups knew lower is better
    val = [m["val_mse"] for m in summary["models"]]
    assert summary["best_individual"] == summary["models"][val.index(min(val))]["candidate"]
    assert summary["val_mse"]["best_individual"] == min(val)
    assert summary["val_mse"]["greedy_soup"] <= min(val)
    assert "test mse" in capsys.readouterr().out
    # --from and checkpoints_dir= together: refused before anything starts
    assert main(["soup", "--config", str(config), "--from", str(sweep), f"checkpoints_dir={sweep}"]) == 2
