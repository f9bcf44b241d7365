"""Exact resume of sharded TWA after a lost worker (issue 17): rounds of candidates, dropout
masks, uneven last batches, every rank's own BatchNorm buffers, sync_bn on CPU, and the
checkpoints kept.

The tests check their properties on one shared pair of runs (:func:`resumed`): most of a Ray
Train run goes into starting its worker group, and the run that loses a worker starts two."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import perturbed_store
from twa_ray.config import config_from_dict
from twa_ray.parallel.checkpoint_files import load_checkpoint
from twa_ray.runtime.twa_loop import FINAL_FILE
from twa_ray.runtime.twa_train import TWAResult, run_twa

pytestmark = pytest.mark.ray

# A BatchNorm network with dropout (WRN-10-1) and model.sync_bn on CPU workers (each keeps its
# own statistics; without twa.select_eval no recalibration evens them out). 5 candidates in
# rounds of 3 and 2; 120 training images in batches of 17: 7 batches an epoch, 14 steps a round.
MODEL = {"name": "wrn28_10", "kwargs": {"depth": 10, "width": 1, "dropout": 0.3}, "sync_bn": True}
# A checkpoint every epoch and mid-epoch after 9 steps of a round (few: each report takes time).
TWA = {"batch_size": 17, "candidates_per_round": 3, "checkpoint_every_steps": 9}
# In round 1 (steps 14-27), after its mid-epoch checkpoint (step 23 next): the lost attempt ran
# step 23, the resumed one runs it again, and round 0's coefficients and center come back from
# the checkpoint.
FAIL_AT = 24


def _cfg(out: Path, model: dict, twa: dict, fail_at_step: int | None = None):
    return config_from_dict({
        "name": "resume", "output_dir": str(out), "seed": 4,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 32,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 3, "channels": 1, "image_size": 4}},
        "model": model,
        "twa": {"workers": 2, "bits": 4, "granularity": "tensor", "epochs": 2, "lr": 0.2, **twa},
        "debug": {"fail_at_step": fail_at_step},
    })


@dataclass
class Resumed:
    clean: TWAResult  # an uninterrupted run
    faulty: TWAResult  # the same run, its last worker lost before step FAIL_AT
    marker: Path  # the fault's marker: the worker was lost


@pytest.fixture(scope="module")
def resumed(ray_local, tmp_path_factory) -> Resumed:
    tmp = tmp_path_factory.mktemp("resume")
    store = perturbed_store(_cfg(tmp, MODEL, TWA), str(tmp / "store"))
    clean = run_twa(_cfg(tmp / "clean", MODEL, TWA), store)
    faulty = run_twa(_cfg(tmp / "faulty", MODEL, TWA, FAIL_AT), store)
    return Resumed(clean, faulty, tmp / "faulty" / "debug" / f"twa-failed-at-step-{FAIL_AT}")


def _assert_resumed_exactly(r: Resumed) -> None:
    """A worker was lost, and the resumed run ends with the clean run's coefficients and weights."""
    assert r.marker.exists()
    assert len(r.faulty.coefficients) == len(r.clean.coefficients)
    for a, b in zip(r.clean.coefficients, r.faulty.coefficients):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(r.faulty.weights, r.clean.weights, atol=1e-6, rtol=0)


def test_rounds_and_resume_after_a_lost_worker(resumed):
    assert resumed.clean.rounds == resumed.faulty.rounds == [[0, 1, 2], [3, 4]]
    assert [c.shape[0] for c in resumed.clean.coefficients] == [3, 2]
    _assert_resumed_exactly(resumed)


def test_dropout_and_an_uneven_last_batch_resume_exactly(resumed):
    """120 training images in batches of 17: the last batch of 1 joins the previous one
    (no rank idles); dropout masks are replayed after the lost worker; only the last
    two checkpoints stay, the final one holding the result."""
    clean, faulty = resumed.clean, resumed.faulty
    # 7 batches an epoch: 6 of 17 and one of 18; steps count from 0 in each round
    assert [(h["round"], h["step"]) for h in clean.history] == [(0, 7), (0, 14), (1, 7), (1, 14)]
    _assert_resumed_exactly(resumed)
    assert clean.coefficients[0].abs().sum() > 0
    for result in (clean, faulty):
        kept = [p for p in Path(result.checkpoint_path).parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint")]
        assert len(kept) == 2 and Path(result.checkpoint_path) in kept
        assert torch.equal(load_checkpoint(result.checkpoint_path, name=FINAL_FILE)["weights"], result.weights)


def test_each_rank_resumes_its_own_batchnorm_buffers_with_sync_bn_on_cpu(resumed):
    """model.sync_bn on CPU workers: each rank keeps, checkpoints and resumes its own
    BatchNorm statistics."""
    _assert_resumed_exactly(resumed)
    buffers = [load_checkpoint(r.checkpoint_path)["buffers"] for r in (resumed.clean, resumed.faulty)]
    assert len(buffers[0]) == len(buffers[1]) == 2
    assert not torch.equal(buffers[0][0]["bn.running_mean"], buffers[0][1]["bn.running_mean"])
    for rank in range(2):
        assert buffers[1][rank].keys() == buffers[0][rank].keys()
        for name, value in buffers[0][rank].items():
            torch.testing.assert_close(buffers[1][rank][name], value, atol=1e-6, rtol=0)


def test_a_global_batch_smaller_than_the_workers_is_refused(ray_local, tmp_path):
    cfg = _cfg(tmp_path, {"name": "mlp"}, {"batch_size": 1})
    with pytest.raises(ValueError, match="leaves some of the twa.workers=2 workers without an example"):
        run_twa(cfg, perturbed_store(cfg, str(tmp_path / "store")))
