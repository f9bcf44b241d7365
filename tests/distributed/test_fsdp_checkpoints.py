"""Sharded checkpoints of ``sharding: fsdp`` (torch.distributed.checkpoint) without Ray: two
gloo ranks each save their shards into their own folder, the folders are merged as Ray
Train merges the ranks' reported folders, and three ranks resume from them (DCP reshards);
one process reads the full tensors back. Loading runs no pickled code."""
import os
import pickle
import shutil

import pytest
import torch
from torch import nn

from conftest import UnevenNet
from twa_ray.core.params import ParamLayout
from twa_ray.distributed.base_fsdp import checkpoint_shards, load_checkpoint_shards, loss_scale
from twa_ray.distributed.checkpoints import _dcp_load, is_sharded, load_sharded, read_sharded, save_sharded
from twa_ray.distributed.fsdp import fsdp_wrap, local_shard
from twa_ray.distributed.local_ranks import spawn_ranks
from twa_ray.distributed.twa_fsdp import RowLayout, center_shards, gather_rows, own_rows

SAVED_BY, RESUMED_BY = 2, 3


def _steps(model, optimizer, first, last, rank=0, world=1):
    """SGD steps first..last-1 on fixed global batches of 12; each rank its share of the mean loss."""
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(last)]
    for x, y in batches[first:last]:
        part = slice(rank * 12 // world, (rank + 1) * 12 // world)
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum") * loss_scale("fsdp", world, 12)).backward()
        optimizer.step()


def _vector():
    """A (D,) vector of UnevenNet's size: TWA's center."""
    return torch.arange(ParamLayout.from_model(UnevenNet()).num_params, dtype=torch.float32) / 7.0


def _save_main(rank: int, world: int, out: str) -> None:
    model = fsdp_wrap(UnevenNet(), world, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _steps(model, optimizer, 0, 3, rank, world)
    ema = [local_shard(p).detach() * 0.5 for p in model.parameters()]
    sharded, groups = checkpoint_shards(model, optimizer, ema)
    sharded["center"] = center_shards(model, RowLayout(ParamLayout.from_model(model), world).take(_vector(), rank))
    save_sharded(f"{out}/rank{rank}", sharded)  # its own folder, as each Ray Train worker reports one
    if rank == 0:
        torch.save(groups, f"{out}/groups.pt")


def _resume_main(rank: int, world: int, out: str) -> None:
    model = fsdp_wrap(UnevenNet(seed=1), world, torch.device("cpu"))  # other weights until loaded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    groups = torch.load(f"{out}/groups.pt", weights_only=True)
    ema = load_checkpoint_shards(f"{out}/merged", model, optimizer, groups)
    sharded = {"center": center_shards(model)}
    load_sharded(f"{out}/merged", sharded)
    own = own_rows(sharded["center"].values())
    full_center = gather_rows(model, own, rank, world)
    _steps(model, optimizer, 3, 5, rank, world)  # lr 0.1 again: the checkpoint's param groups
    torch.save({"ema": ema, "own": own, "center": full_center, "lr": optimizer.param_groups[0]["lr"],
                "weights": [p.full_tensor().detach() for p in model.parameters()],
                "local": [local_shard(p).numel() for p in model.parameters()]}, f"{out}/resumed{rank}.pt")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    spawn_ranks(_save_main, SAVED_BY, str(out))
    os.makedirs(out / "merged")
    for rank in range(SAVED_BY):  # what Ray Train does with the folders the ranks report
        for name in os.listdir(out / f"rank{rank}"):
            shutil.copy(out / f"rank{rank}" / name, out / "merged" / name)
    return out


def test_every_rank_saves_its_own_shards_and_one_process_reads_them_whole(merged):
    assert sorted(os.listdir(merged / "rank0")) == [".metadata", "__0_0.distcp"]
    assert sorted(os.listdir(merged / "rank1")) == ["__1_0.distcp"]  # rank 1's shards only
    assert is_sharded(merged / "merged") and not is_sharded(merged / "rank1")
    ref = UnevenNet()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _steps(ref, opt, 0, 3)
    shapes = {name: p.shape for name, p in ref.named_parameters()}
    model, ema = read_sharded(merged / "merged", "model", shapes), read_sharded(merged / "merged", "ema", shapes)
    momentum = read_sharded(merged / "merged", "optimizer", {f"{n}.momentum_buffer": s for n, s in shapes.items()})
    center = read_sharded(merged / "merged", "center", shapes)
    assert set(model) == set(ema) == set(center) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(model[name], p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema[name], 0.5 * p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(momentum[f"{name}.momentum_buffer"], opt.state[p]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    layout = ParamLayout.from_model(ref)
    torch.testing.assert_close(torch.cat([center[n].reshape(-1) for n in layout.names]), _vector(), rtol=0, atol=0)


def test_three_ranks_resume_from_two_ranks_shards_exactly(merged):
    """DCP reshards: each of 3 ranks loads its part of the 2-rank checkpoint and 2 more steps
    end where the uninterrupted single process does."""
    spawn_ranks(_resume_main, RESUMED_BY, str(merged))
    got = [torch.load(merged / f"resumed{r}.pt", weights_only=True) for r in range(RESUMED_BY)]
    ref = UnevenNet()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _steps(ref, opt, 0, 3)
    at_checkpoint = [p.detach().clone() for p in ref.parameters()]
    _steps(ref, opt, 3, 5)
    rows = RowLayout(ParamLayout.from_model(ref), RESUMED_BY)
    for rank, g in enumerate(got):
        assert g["lr"] == 0.1
        assert g["local"] == rows.numels(rank)  # its part only
        for p, w in zip(ref.parameters(), g["weights"]):
            torch.testing.assert_close(w, p.detach(), rtol=1e-5, atol=1e-6)
        full_ema = torch.cat([0.5 * p.reshape(-1) for p in at_checkpoint])
        torch.testing.assert_close(torch.cat([e.reshape(-1) for e in g["ema"]]), rows.take(full_ema, rank),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["own"], rows.take(_vector(), rank), rtol=0, atol=0)
        if rank == 0:  # gathered on rank 0 only
            torch.testing.assert_close(g["center"], _vector(), rtol=0, atol=0)
        else:
            assert g["center"] is None


def test_a_missing_key_or_shape_is_named(merged):
    with pytest.raises(ValueError, match=r"holds no sharded state \(no .metadata\): it was not made with sharding: fsdp"):
        load_sharded(merged / "rank1", {"model": {"hidden.weight": torch.zeros(5, 6)}})
    with pytest.raises(ValueError, match=r"holds no tensor 'model.extra.weight'"):
        load_sharded(merged / "merged", {"model": {"extra.weight": torch.zeros(2)}})
    with pytest.raises(ValueError, match=r"'model.hidden.weight' has shape \[5, 6\], expected \[6, 5\]"):
        load_sharded(merged / "merged", {"model": {"hidden.weight": torch.zeros(6, 5)}})


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_loading_runs_no_pickled_code(merged, tmp_path):
    """DCP unpickles .metadata with plain pickle and non-tensor values with weights_only=False:
    here .metadata may build DCP's classes only, and non-tensor values are neither saved nor loaded."""
    bad = tmp_path / "bad"
    shutil.copytree(merged / "merged", bad)
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(pickle.UnpicklingError, match=r"refers to posix.getcwd: not DCP metadata"):
        read_sharded(bad, "model", {})
    with pytest.raises(TypeError, match=r"holds only tensors; not: \['step'\]"):
        save_sharded(tmp_path / "never", {"step": 3})
    import torch.distributed.checkpoint as dcp

    dcp.save({"note": {"x": "a pickled string"}, "t": torch.ones(2)}, checkpoint_id=str(tmp_path / "objects"),
             no_dist=True)
    with pytest.raises(ValueError, match=r"holds no tensor 'note.x'"):  # refused before DCP plans a read
        load_sharded(tmp_path / "objects", {"note": {"x": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"holds 'note.x' as a pickled object, not a tensor: refused"):
        _dcp_load(tmp_path / "objects", {"note": {"x": torch.zeros(1)}}, no_dist=True)  # the planner's load_bytes
    assert read_sharded(tmp_path / "objects", "note", {"x": (1,)}) == {}  # only tensors are read
