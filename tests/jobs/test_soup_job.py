"""The soup job end to end on a tiny synthetic config (its own local Ray in a subprocess), and its pieces."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ray_subprocess_env

TINY = """\
# run: python jobs/soup_twa.py --config {path}
output_dir: {out}
seed: 1
data: {{name: synthetic, val_ratio: 0.25, batch_size: 32,
        synthetic: {{num_train: 240, num_test: 120, num_classes: 3, channels: 1, image_size: 8}}}}
model: {{name: small_cnn, kwargs: {{widths: [4, 8, 8]}}}}
train: {{lr: 0.05, schedule: cosine}}
twa: {{data: val, epochs: 2, bits: 4, lr: 0.3, workers: 1}}
finetune: {{pretrain_epochs: 1, pretrain_classes: [0, 1], num_models: 3, epochs: 1,
            lrs: [0.01, 0.05], weight_decays: [0.0, 5.0e-4], augment: [false], label_smoothing: [0.0, 0.1]}}
"""


def run_job(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "soup_twa.py"), *args],
        cwd=cwd, env=ray_subprocess_env(), capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soup")
    config = tmp / "tiny.yaml"
    config.write_text(TINY.format(path=config, out=tmp / "run"))
    proc = run_job("--config", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return config, tmp / "run", proc


@pytest.mark.ray
def test_soup_job_writes_every_file(finished):
    _, run, proc = finished
    assert f"run folder: {run}" in proc.stdout
    for name in ["summary.json", "metrics.parquet", "coefficients.parquet", "model.pt", "config.json",
                 "plots/accuracy.png", "plots/mixing.png", "finetuned/model_0.pt", "finetuned/model_2.pt"]:
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test_acc"]) == {"best_individual", "uniform_soup", "greedy_soup", "twa"}
    assert all(0 <= v <= 100 for v in summary["test_acc"].values())
    assert summary["num_models"] == 3 and summary["source"] == "finetune" and summary["twa_data"] == "val"
    val = summary["val_acc"]
    assert val["greedy_soup"] >= val["best_individual"]  # selected on val: greedy never drops below its start
    assert summary["best_individual"] == summary["greedy_soup_members"][0]
    assert set(summary["greedy_soup_members"]) <= {0, 1, 2}
    models = summary["models"]
    assert [m["entry"] for m in models] == ["model_0.pt", "model_1.pt", "model_2.pt"]
    assert all({"lr", "weight_decay", "augment", "label_smoothing", "seed", "val_acc", "test_acc"} <= set(m) for m in models)
    best = summary["best_individual"]
    assert models[best]["val_acc"] == max(m["val_acc"] for m in models)
    assert models[best]["test_acc"] == summary["test_acc"]["best_individual"]
    assert set(summary["time_s"]) >= {"pretrain", "finetune", "import", "twa", "soups", "evaluate", "total"}
    stages = [m["stage"] for m in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert stages.count("pretrain") == 1 and stages.count("finetune") == 3 and stages.count("twa") == 2
    assert stages.count("soups") == 2  # the greedy soup tried the other two models
    coefs = pq.read_table(run / "coefficients.parquet").to_pylist()
    assert [c["candidate"] for c in coefs] == [0, 1, 2]
    assert (run / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_exports_are_plain_state_dicts(finished):
    _, run, _ = finished
    twa = torch.load(run / "model.pt", weights_only=True)
    for method in ("best_individual", "uniform_soup", "greedy_soup", "twa"):
        pt = torch.load(run / "models" / f"{method}.pt", weights_only=True)
        st = load_file(str(run / "models" / f"{method}.safetensors"))
        assert sorted(pt) == sorted(st)
        for k in pt:
            torch.testing.assert_close(pt[k], st[k], rtol=0, atol=0)
        if method == "twa":
            for k in twa:
                torch.testing.assert_close(pt[k], twa[k], rtol=0, atol=0)


@pytest.mark.ray
def test_rerun_reuses_the_finished_run(finished):
    config, run, _ = finished
    before = (run / "summary.json").stat().st_mtime_ns
    proc = run_job("--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" in proc.stdout
    assert (run / "summary.json").stat().st_mtime_ns == before


def test_a_bad_checkpoints_dir_is_named_before_ray_starts(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(path=config, out=tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    proc = run_job("--config", str(config), f"checkpoints_dir={tmp_path / 'empty'}")
    assert proc.returncode == 1
    assert f"no checkpoints in {tmp_path / 'empty'}" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad").mkdir()
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "bad" / "model_0.pt")
    proc = run_job("--config", str(config), f"checkpoints_dir={tmp_path / 'bad'}", "--force")
    assert proc.returncode == 1
    assert f"{tmp_path / 'bad' / 'model_0.pt'}: none of its keys is a parameter of the model" in proc.stderr
    assert "the file ['0.weight']" in proc.stderr


def test_config_needs_models_and_a_val_split(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: {val_ratio: 0.0}\n")
    proc = run_job("--config", str(config))
    assert proc.returncode == 2
    assert "checkpoints_dir / finetune" in proc.stderr and "data.val_ratio" in proc.stderr
    assert "Traceback" not in proc.stderr
