"""The helpers both worker loops share (``runtime/worker.py``, and the collectives and
evaluation they call in ``parallel``), on a real two-process gloo group without Ray, and TWA's
run state through the checkpoint format."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset


from twa_ray.parallel.checkpoint_files import load_checkpoint, load_checkpoint_info, save_checkpoint
from twa_ray.parallel.evaluate import evaluate, evaluate_across_ranks
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.parallel.process_group import all_reduce_sum, gather_from_ranks
from twa_ray.runtime import worker
from twa_ray.runtime.twa_loop import TWARunState
from twa_ray.tasks import ImageClassification

WORLD = 2


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(23, 6, generator=gen), torch.randint(0, 3, (23,), generator=gen))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _rank_main(rank: int, world: int, out: str) -> None:
    cpu = torch.device("cpu")
    model = worker.sync_batchnorm(_model(), True, cpu, rank, world)
    res = evaluate_across_ranks(model, _data(), ImageClassification(), rank, world, cpu, batch_size=4)  # the same model on both
    model.train()
    model(torch.randn(5, 6) + rank)  # under the process group: SyncBatchNorm would reject CPU tensors
    gathered = gather_from_ranks({k: v for k, v in model.state_dict().items() if "running" in k or "batches" in k}, cpu)
    torch.save({
        "eval": [res.accuracy, res.loss, res.count],
        "sum": all_reduce_sum(torch.tensor([1.0, float(rank)]), cpu),
        "gathered": gathered,
        "own": {k: v for k, v in model.state_dict().items() if "running" in k or "batches" in k},
        "sync": any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()),
    }, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_rank_main, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_evaluation_across_ranks_equals_one_process(two_ranks):
    model = _model()
    full = evaluate(model, _data(), ImageClassification(), "cpu", batch_size=4)
    for r in two_ranks:
        accuracy, loss, count = r["eval"]
        assert count == 23
        assert accuracy == pytest.approx(full.accuracy, abs=1e-9)
        assert loss == pytest.approx(full.loss, rel=1e-6)


def test_sum_and_gather_across_ranks(two_ranks):
    for r in two_ranks:
        assert r["sum"].tolist() == [2.0, 1.0]
        assert len(r["gathered"]) == WORLD
        for rank in range(WORLD):
            for name, t in two_ranks[rank]["own"].items():
                assert torch.equal(r["gathered"][rank][name], t) and r["gathered"][rank][name].dtype == t.dtype
    assert not torch.equal(two_ranks[0]["own"]["1.running_mean"], two_ranks[1]["own"]["1.running_mean"])


def test_sync_bn_is_skipped_on_cpu(two_ranks):
    assert not any(r["sync"] for r in two_ranks)
    model = _model()
    assert worker.sync_batchnorm(model, True, torch.device("cpu"), 0, 1) is model  # one rank: nothing to sync


def test_fault_injection_fires_once_on_the_last_rank(tmp_path, monkeypatch):
    worker.inject_fault("twa", "step", 3, 0, WORLD, str(tmp_path), fail_at=3)  # not the last rank
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="injected failure of rank 1 at twa step 3"):
        worker.inject_fault("twa", "step", 3, 1, WORLD, str(tmp_path), fail_at=3)
    worker.inject_fault("twa", "step", 3, 1, WORLD, str(tmp_path), fail_at=3)  # the restarted group passes
    monkeypatch.setattr(worker, "PAUSE_S", 0)
    worker.inject_fault("base", "epoch", 2, 1, WORLD, str(tmp_path / "sub"), pause_at=2)
    assert (tmp_path / "twa-failed-at-step-3").exists() and (tmp_path / "sub" / "base-paused-at-epoch-2").exists()


def test_seeded_step_replays_dropout():
    drop = nn.Dropout(0.5)
    masks = []
    for rank in (0, 0, 1):
        worker.seed_rng(7, 12, rank)
        masks.append(drop(torch.ones(64)))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_twa_run_state_round_trips_through_the_checkpoint_format(tmp_path):
    run = TWARunState(
        round=1, epoch=2, batch=3, twa={"X": torch.randn(3, 4), "num_steps": 9, "optimizer": {"state": {}}},
        center=torch.randn(10), coefficients=[torch.randn(2, 4)],
        buffers=[{"bn.running_mean": torch.randn(4), "bn.num_batches_tracked": torch.tensor(5)} for _ in range(2)],
        history=[{"round": 0, "epoch": 1, "select_acc": math.nan}], projection_bytes=[10, 12], elapsed_s=1.5,
        done=False, data_seed=3,
    )
    save_checkpoint(tmp_path, *run.to_checkpoint())
    back = TWARunState.from_checkpoint(load_checkpoint(tmp_path), load_checkpoint_info(tmp_path))  # weights_only
    assert (back.round, back.epoch, back.batch, back.projection_bytes, back.elapsed_s, back.data_seed) == (1, 2, 3, [10, 12], 1.5, 3)
    assert torch.equal(back.twa["X"], run.twa["X"]) and back.twa["num_steps"] == 9
    assert torch.equal(back.center, run.center) and torch.equal(back.coefficients[0], run.coefficients[0])
    assert all(torch.equal(b["bn.running_mean"], a["bn.running_mean"]) for a, b in zip(run.buffers, back.buffers))
    assert math.isnan(back.history[0]["select_acc"])
