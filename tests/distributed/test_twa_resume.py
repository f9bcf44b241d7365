"""Exact resume of sharded TWA after a lost worker (issue 17): dropout masks, uneven last
batches, every rank's own BatchNorm buffers, sync_bn on CPU, and the checkpoints kept."""
from pathlib import Path

import pytest
import torch

from conftest import perturbed_store
from twa_ray.config import config_from_dict
from twa_ray.distributed.checkpoints import load_checkpoint
from twa_ray.distributed.twa_train import FINAL_FILE, run_twa

pytestmark = pytest.mark.ray


def _cfg(out: Path, model: dict, twa: dict, fail_at_step: int | None = None):
    return config_from_dict({
        "name": "resume", "output_dir": str(out), "seed": 4,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 32,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 3, "channels": 1, "image_size": 4}},
        "model": model,
        "twa": {"workers": 2, "bits": 4, "granularity": "tensor", "epochs": 2, "lr": 0.2, **twa},
        "debug": {"fail_at_step": fail_at_step},
    })


def _clean_and_faulty(tmp_path: Path, model: dict, twa: dict, fail_at_step: int):
    store = perturbed_store(_cfg(tmp_path, model, twa), str(tmp_path / "store"))
    clean = run_twa(_cfg(tmp_path / "clean", model, twa), store)
    faulty = run_twa(_cfg(tmp_path / "faulty", model, twa, fail_at_step), store)
    assert (tmp_path / "faulty" / "debug" / f"twa-failed-at-step-{fail_at_step}").exists()
    return clean, faulty


def test_dropout_and_an_uneven_last_batch_resume_exactly(ray_local, tmp_path):
    """120 training images in batches of 17: the last batch of 1 joins the previous one
    (no rank idles); dropout masks are replayed after the lost worker; only the last
    two checkpoints stay, the final one holding the result."""
    mlp = {"name": "mlp", "kwargs": {"hidden": [16, 16], "dropout": 0.3}}
    clean, faulty = _clean_and_faulty(tmp_path, mlp, {"batch_size": 17, "checkpoint_every_steps": 3}, fail_at_step=10)
    assert [h["step"] for h in clean.history] == [7, 14]  # 7 batches an epoch: 6 of 17 and one of 18
    for a, b in zip(clean.coefficients, faulty.coefficients):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(faulty.weights, clean.weights, atol=1e-6, rtol=0)
    assert clean.coefficients[0].abs().sum() > 0
    for result in (clean, faulty):
        kept = [p for p in Path(result.checkpoint_path).parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint")]
        assert len(kept) == 2 and Path(result.checkpoint_path) in kept
        assert torch.equal(load_checkpoint(result.checkpoint_path, name=FINAL_FILE)["weights"], result.weights)


def test_each_rank_resumes_its_own_batchnorm_buffers_with_sync_bn_on_cpu(ray_local, tmp_path):
    """A BatchNorm CNN with model.sync_bn on CPU workers (each keeps its own statistics),
    trained on the 40 val images (nothing to select on: no recalibration evens the
    buffers out) in batches of 13 (the last of 1 joins the previous one)."""
    cnn = {"name": "small_cnn", "kwargs": {"widths": [4, 8]}, "sync_bn": True}
    clean, faulty = _clean_and_faulty(tmp_path, cnn, {"data": "val", "batch_size": 13, "checkpoint_every_steps": 1},
                                      fail_at_step=4)
    torch.testing.assert_close(faulty.coefficients[0], clean.coefficients[0], atol=1e-6, rtol=0)
    buffers = [load_checkpoint(r.checkpoint_path)["buffers"] for r in (clean, faulty)]
    assert len(buffers[0]) == 2 and not torch.equal(buffers[0][0]["features.1.running_mean"],
                                                    buffers[0][1]["features.1.running_mean"])
    for rank in range(2):
        for name, value in buffers[0][rank].items():
            torch.testing.assert_close(buffers[1][rank][name], value, atol=1e-6, rtol=0)


def test_a_global_batch_smaller_than_the_workers_is_refused(ray_local, tmp_path):
    cfg = _cfg(tmp_path, {"name": "mlp"}, {"batch_size": 1})
    with pytest.raises(ValueError, match="leaves some of the twa.workers=2 workers without an example"):
        run_twa(cfg, perturbed_store(cfg, str(tmp_path / "store")))
