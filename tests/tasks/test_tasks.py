"""The task protocol (twa_ray.tasks): loading a task by import path, the built-in image
classification, the char-level LM example, and the library's use of a task's metric."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT
from twa_ray.cli import main
from twa_ray.config import Config, TuneConfig, config_from_dict
from twa_ray.core.baselines import best_k
from twa_ray.output.atomic import write_json, write_torch
from twa_ray.output.console import results_table
from twa_ray.output.export import load_model
from twa_ray.parallel.evaluate import evaluate
from twa_ray.pipelines.runs import check_inputs
from twa_ray.tasks import (ImageClassification, TaskData, TaskError, Totals, check_task, missing_members, model_spec,
                           task_data, task_from_config, to_device)
from twa_ray.tune.search_space import settle_objective

HERE = Path(__file__).parent


@pytest.fixture
def in_tests_folder(monkeypatch):
    """The working directory holding tiny_tasks.py, as for `twa-ray run` from the user's folder."""
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != HERE])
    sys.modules.pop("tiny_tasks", None)
    yield
    sys.modules.pop("tiny_tasks", None)


def _cfg(**over) -> Config:
    return config_from_dict({"task": "tiny_tasks:Regression", **over})


@pytest.mark.parametrize("path, says", [
    ("tiny_tasks", "no import path"),
    ("no_such_module_here:Task", "cannot import module 'no_such_module_here'"),
    ("tiny_tasks:Missing", "has no 'Missing'"),
    ("tiny_tasks:torch", "is not a class or function that makes a task"),  # a module
    ("tiny_tasks:NotATask", "lacks metric, higher_is_better, datasets, loss, evaluate, summarize"),
])
def test_a_task_that_cannot_be_used_is_an_error_naming_the_key_and_the_path(in_tests_folder, path, says):
    with pytest.raises(TaskError) as err:
        check_inputs(_cfg(task=path))
    assert str(err.value).startswith("task:") and path in str(err.value) and says in str(err.value)


def test_a_bad_task_fails_in_the_driver_before_ray_starts(in_tests_folder, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"task: tiny_tasks:NotATask\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("task: 'tiny_tasks:NotATask'") and "lacks" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "run").exists()  # before the run folder, too


def test_the_built_in_task_options_are_refused_for_another_task(in_tests_folder):
    with pytest.raises(TaskError, match=r"train.label_smoothing=0.1 applies to task 'image_classification' only"):
        check_task(_cfg(train={"label_smoothing": 0.1}))
    with pytest.raises(TaskError, match=r"task_args: \['n'\] given, but task 'image_classification' takes none"):
        task_from_config(config_from_dict({"task_args": {"n": 3}}))
    with pytest.raises(TaskError, match=r"task: 'tiny_tasks:Regression' with task_args \{'wrong': 1\}"):
        task_from_config(_cfg(task_args={"wrong": 1}))


def test_a_task_from_the_working_directory_gives_data_test_sealed_and_its_model(in_tests_folder):
    task = check_task(_cfg(task_args={"n": 40}))
    data = check_inputs(_cfg(task_args={"n": 40}))
    assert (len(data.train), len(data.val), len(data.test)) == (20, 10, 10)
    with pytest.raises(RuntimeError, match="sealed"):
        data.test[0]
    assert task_data(task, include_test=True).test[0][0].shape == (5,)
    assert data.train_eval is data.train  # no augmentation: BatchNorm would recalibrate on train
    assert model_spec(_cfg(), task) == {"task": "tiny_tasks:Regression", "task_args": {}}


def test_evaluate_sums_a_tasks_metrics_over_batches(in_tests_folder):
    task = check_task(_cfg())
    data = task.datasets()
    torch.manual_seed(0)
    model = task.build_model()
    res = evaluate(model, data.val, task, batch_size=7)  # 24 examples: 4 batches, the last of 3
    x, y = data.val.tensors
    with torch.no_grad():
        mse = float(((model(x).squeeze(1) - y) ** 2).double().mean())
    assert res.count == 24 and res.metric == "mse" and not res.higher_is_better
    assert res.value == pytest.approx(mse, rel=1e-6) and res.loss == pytest.approx(mse, rel=1e-6)
    assert res.score == -res.value  # higher always selects


def test_image_classification_is_one_task_among_others():
    task = ImageClassification()
    assert missing_members(task) == [] and (task.metric, task.higher_is_better) == ("acc", True)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    model = nn.Identity()
    sums = task.evaluate(model, (logits, torch.tensor([0, 0, 0])))
    out = task.summarize({k: (float(s), float(c)) for k, (s, c) in sums.items()})
    assert out["acc"] == pytest.approx(200.0 / 3)
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0]))))
    with pytest.raises(ValueError, match="without a config has no data"):
        task.datasets()


def test_the_char_lm_example_is_a_task_with_perplexity():
    from examples.char_lm import CharLM

    task = CharLM(context=16, max_chars=4000, d_model=16, layers=1, heads=2)
    assert missing_members(task) == [] and (task.metric, task.higher_is_better) == ("ppl", False)
    data = task.datasets()
    assert data.train[0].shape == (17,) and len(data.val) and len(data.test)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.build_model().modules())
    batch = torch.stack([data.val[i] for i in range(len(data.val))])
    totals = Totals()
    totals.add(task.evaluate(task.build_model(), batch))
    out = totals.summarize(task)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))


def test_to_device_moves_every_tensor_and_keeps_the_structure():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), ("text", torch.ones(3, dtype=torch.long))], "c": 3}
    moved = to_device(batch, "meta")
    assert moved["a"].device.type == "meta" and moved["b"][1][1].device.type == "meta"
    assert moved["b"][1][0] == "text" and moved["c"] == 3 and isinstance(moved["b"][1], tuple)


def test_best_k_selects_the_lowest_when_lower_is_better():
    infos = [(i, {"kind": "epoch", "metrics": {"val_ppl": v}}) for i, v in enumerate([5.0, 3.0, 4.0, 9.0])]
    assert best_k(infos, 2, "val_ppl", higher_is_better=False) == [1, 2]
    assert best_k(infos, 2, "val_ppl") == [0, 3]


def test_tune_selects_on_the_tasks_metric_unless_told(in_tests_folder):
    assert (settle_objective(Config()).tune.metric, settle_objective(Config()).tune.mode) == ("select_acc", "max")
    lm = settle_objective(_cfg())
    assert (lm.tune.metric, lm.tune.mode) == ("select_mse", "min")
    told = settle_objective(_cfg(tune={"metric": "select_loss"}))
    assert (told.tune.metric, told.tune.mode) == ("select_loss", "min")


def test_load_model_rebuilds_a_tasks_model_by_its_import_path(in_tests_folder, tmp_path):
    task = check_task(_cfg())
    model = task.build_model()
    write_json(tmp_path / "summary.json", {"model_spec": model_spec(_cfg(), task)})
    write_torch(tmp_path / "model.pt", model.state_dict())
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    write_json(tmp_path / "summary.json", {"model_spec": {"task": "tiny_tasks:NotATask", "task_args": {}}})
    with pytest.raises(TaskError, match="summary.json model_spec.task: 'tiny_tasks:NotATask' makes no task"):
        load_model(tmp_path)


def test_the_results_table_names_the_tasks_metric():
    summary = {"metric": "ppl", "test_ppl": {"last": 5.2, "twa": 4.81}, "test_loss": {"last": 1.65, "twa": 1.57},
               "epochs": {"base": 4, "twa": 1}, "time_s": {}}
    lines = results_table(summary).splitlines()
    assert lines[0].split()[:3] == ["method", "test", "ppl"]
    assert lines[-1].split()[:3] == ["TWA", "4.81", "1.5700"]
