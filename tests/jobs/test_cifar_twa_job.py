"""The main job end to end on a tiny synthetic config (its own local Ray in a subprocess),
started by the README quickstart's own command line."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT, ray_subprocess_env
from readme_commands import quickstart_command
from twa_ray.config import load_config
from twa_ray.data.from_config import splits_from_config
from twa_ray.models.from_config import model_from_config
from twa_ray.parallel.evaluate import evaluate
from twa_ray.tasks import ImageClassification

pytestmark = pytest.mark.ray

TINY = """\
# run: python jobs/cifar_twa.py --config {path}
output_dir: {out}
seed: 1
compare_full_budget: true
data: {{name: synthetic, val_ratio: 0.2, batch_size: 32,
        synthetic: {{num_train: 200, num_test: 100, num_classes: 3, channels: 1, image_size: 8}}}}
model: {{name: small_cnn, kwargs: {{widths: [4, 8, 8]}}}}
train: {{epochs: 2, budget_epochs: 4, lr: 0.05, schedule: cosine}}
twa: {{epochs: 2, bits: 4, lr: 0.3, workers: 1}}
"""


# configs/quickstart.yaml's candidate settings back to the defaults the assertions below count on
# (the initial weights and one candidate per epoch, all of them chosen)
QUICKSTART_TO_TINY = ["train.save_initial=true", "train.save_every_steps=null", "twa.candidates=all"]


def overrides(mapping: dict, prefix: str = "") -> list[str]:
    """``a.b=value`` overrides that set every leaf of ``mapping``."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def tiny_quickstart(run) -> list[str]:
    """The quickstart made tiny: TINY's settings (output in ``run``) as overrides."""
    return overrides(yaml.safe_load(TINY.format(path="-", out=run))) + QUICKSTART_TO_TINY


def run_job(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "cifar_twa.py"), *args],
        cwd=cwd, env=ray_subprocess_env(), capture_output=True, text=True, timeout=600,
    )


def run_quickstart(*args):
    """The README quickstart's exact command line, ``args`` appended as its extra arguments."""
    return subprocess.run(
        ["bash", "-c", quickstart_command(), "quickstart.sh", *args],
        cwd=ROOT, env=ray_subprocess_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("job") / "run"
    args = tiny_quickstart(run)
    proc = run_quickstart(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_config(ROOT / "configs" / "quickstart.yaml", args), run, proc


def test_job_writes_every_file(finished):
    _, run, proc = finished
    assert f"run folder: {run}" in proc.stdout
    for name in ["summary.json", "metrics.parquet", "coefficients.parquet", "model.pt",
                 "plots/accuracy.png", "plots/mixing.png", "config.json"]:
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ["dataset", "model", "num_candidates", "bits", "granularity", "basis", "twa_data", "workers",
                "test_acc", "time_s", "projection_bytes_per_worker"]:
        assert key in summary, key
    assert summary["num_candidates"] == 3 and summary["bits"] == 4 and summary["twa_data"] == "train"
    assert list(summary["test_acc"]) == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute", "twa"]
    assert all(0 <= summary["test_acc"][k] <= 100 for k in summary["test_acc"])  # every baseline ran
    assert set(summary["test_loss"]) == set(summary["test_acc"])
    # SWA: the two epoch candidates, never the random initial weights; TWA took all three
    assert summary["swa_candidates"] == 2 and summary["twa_includes_initial"] is True
    assert summary["best_k_candidates"] == [1, 2] and summary["selected_on"] == {"best_k": "val"}
    assert set(summary["trained_on"]) == set(summary["test_acc"]) and summary["trained_on"]["twa"] == "train"
    assert summary["epochs"] == {"base": 2, "twa": 2, "full_budget": 4, "sgd_same_compute": 4}
    assert summary["full_budget_continued"] is True
    assert set(summary["time_s"]) == {"base_train", "twa", "full_budget", "sgd_same_compute", "evaluation"}
    t = summary["time_s"]
    assert all(set(t[k]) == {"startup", "compute"} and t[k]["compute"] > 0 and t[k]["startup"] >= 0 for k in t)
    # the full budget continued base training: it costs base training plus its own two epochs
    assert summary["cost_ratio"] == pytest.approx((t["base_train"]["compute"] + t["twa"]["compute"])
                                                  / (t["base_train"]["compute"] + t["full_budget"]["compute"]))
    wall = {k: v["startup"] + v["compute"] for k, v in t.items()}
    assert summary["wall_ratio"] == pytest.approx((wall["base_train"] + wall["twa"])
                                                  / (wall["base_train"] + wall["full_budget"]))
    assert summary["twa_epoch_vs_sgd_epoch"] > 0
    assert len(summary["projection_bytes_per_worker"]) == 1 and summary["projection_bytes_per_worker"][0] > 0
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert {m["stage"] for m in metrics} == {"base_train", "twa", "full_budget", "sgd_same_compute"}
    assert len([m for m in metrics if m["stage"] == "twa"]) == 2
    assert [m["epoch"] for m in metrics if m["stage"] == "full_budget"] == [3, 4]  # only the epochs it added
    # SGD at equal compute: base training continued for TWA's 2 epochs (cosine annealed to 0 over them)
    same = [m for m in metrics if m["stage"] == "sgd_same_compute"]
    assert [m["epoch"] for m in same] == [3, 4] and same[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "SGD, same compute" in proc.stdout and "SGD, same compute" in (run / "report.html").read_text()
    assert not (run / "full_budget_candidates").exists()  # and no second candidate store
    coefs = pq.read_table(run / "coefficients.parquet").to_pylist()
    assert [c["candidate"] for c in coefs] == [0, 1, 2]
    assert (run / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_model_pt_reproduces_the_reported_accuracy(finished):
    cfg, run, _ = finished
    splits = splits_from_config(cfg, include_test=True)
    model = model_from_config(cfg, splits)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    acc = evaluate(model, splits.test, ImageClassification()).accuracy
    summary = json.loads((run / "summary.json").read_text())
    assert acc == pytest.approx(summary["test_acc"]["twa"], abs=1e-9)


def test_parallel_evaluation_equals_one_process(finished):
    """The job evaluated its models in parallel Ray tasks; here the same models, in one
    process, in another order, give the same numbers (BatchNorm recalibrated alike)."""
    from twa_ray.runtime.evaluation import evaluate_sources

    cfg, run, _ = finished
    summary = json.loads((run / "summary.json").read_text())
    torch.set_num_threads(1)  # as in a task
    serial = evaluate_sources(cfg, {"best_k": summary["best_k_candidates"], "last": 2, "swa": [1, 2]},
                              summary["store"])
    for name, result in serial.items():
        assert (result.accuracy, result.loss) == (summary["test_acc"][name], pytest.approx(summary["test_loss"][name],
                                                                                          abs=1e-9)), name


def test_rerun_reuses_the_finished_run(finished):
    _, run, _ = finished
    before = (run / "summary.json").stat().st_mtime_ns
    proc = run_quickstart(*tiny_quickstart(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" in proc.stdout
    assert (run / "summary.json").stat().st_mtime_ns == before


def test_bad_config_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("twa: {bits: 3}\n")
    proc = run_job("--config", str(config))
    assert proc.returncode == 2
    assert "twa.bits: 3 is not one of" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_and_empty_val_split_are_named(tmp_path):
    config = tmp_path / "cifar.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{name: cifar10, root: {tmp_path / 'nowhere'}}}\n")
    proc = run_job("--config", str(config))
    assert proc.returncode == 1
    assert str(tmp_path / "nowhere") in proc.stderr and "Traceback" not in proc.stderr
    config.write_text(TINY.format(path=config, out=tmp_path / "run2") + "\n")
    proc = run_job("--config", str(config), "data.val_ratio=0.001")
    assert proc.returncode == 1 and "data.val_ratio" in proc.stderr and "Traceback" not in proc.stderr
