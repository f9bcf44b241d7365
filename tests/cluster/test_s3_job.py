"""The main job with its run folder, candidate store and Ray storage on S3 (moto's server on
the loopback standing for the bucket): end to end, then a rerun that finds the finished run."""
import json
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from conftest import ROOT, S3_ENV, ray_subprocess_env, s3_bucket
from twa_ray.config import load_config
from twa_ray.data.from_config import splits_from_config
from twa_ray.output.export import load_model
from twa_ray.parallel.evaluate import evaluate
from twa_ray.store import CandidateStore
from twa_ray.store import fs as store_fs
from twa_ray.tasks import ImageClassification

pytestmark = pytest.mark.ray

TINY = """\
output_dir: "{out}"
seed: 2
data: {{name: synthetic, val_ratio: 0.2, batch_size: 32,
        synthetic: {{num_train: 160, num_test: 64, num_classes: 3, channels: 1, image_size: 4}}}}
model: {{name: mlp, kwargs: {{hidden: [16]}}}}
train: {{epochs: 2, lr: 0.1}}
twa: {{epochs: 1, bits: 8, lr: 0.2, workers: 1}}
"""


def run_job(config, cwd):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "cifar_twa.py"), "--config", str(config)],
                          cwd=cwd, env=ray_subprocess_env(**S3_ENV), capture_output=True, text=True, timeout=300)


def objects(uri: str) -> dict[str, pafs.FileInfo]:
    """Every object under ``uri``, by its key relative to it."""
    loc = store_fs.resolve(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return {i.path[len(loc.path) + 1:]: i for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def finished(s3_endpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for key, value in S3_ENV.items():
            env.setenv(key, value)
        run = store_fs.join(s3_bucket(s3_endpoint), "run")
        cwd = tmp_path_factory.mktemp("job")  # the job's working dir: nothing may land here
        config = cwd / "tiny.yaml"
        config.write_text(TINY.format(out=run))
        proc = run_job(config, cwd)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        yield config, run, cwd, proc


def test_the_job_leaves_everything_on_s3(finished):
    config, run, cwd, proc = finished
    assert f"run folder: {run}" in proc.stdout
    found = objects(run)
    for name in ["summary.json", "config.json", "metrics.parquet", "coefficients.parquet", "model.pt",
                 "plots/accuracy.png", "plots/mixing.png", "report.html", "candidates/store.json"]:
        assert name in found, name
    assert any(k.startswith("ray/") and k.endswith("state.pt") for k in found)  # Ray Train's checkpoints
    assert not [k for k in found if store_fs.TEMP_MARKER in k]
    assert sorted(p.name for p in cwd.iterdir()) == ["tiny.yaml"]  # no local runs/ or "s3:" folder

    summary = json.loads(store_fs.read_file(store_fs.join(run, "summary.json")))
    assert summary["store"] == store_fs.join(run, "candidates")
    assert len(CandidateStore.open(summary["store"])) == 3  # initial weights + 2 epochs
    assert summary["test_acc"]["ema"] is not None  # read from base training's last checkpoint, on S3
    model = load_model(run)  # read back from the bucket
    splits = splits_from_config(load_config(config), include_test=True)
    assert evaluate(model, splits.test, ImageClassification()).accuracy == pytest.approx(summary["test_acc"]["twa"], abs=1e-9)


def test_a_rerun_finds_the_finished_run_on_s3(finished):
    config, run, cwd, _ = finished
    before = objects(run)
    proc = run_job(config, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {run} (already complete" in proc.stdout
    after = objects(run)
    assert {k: i.mtime for k, i in after.items()} == {k: i.mtime for k, i in before.items()}
