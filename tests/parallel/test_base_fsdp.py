"""Base training on FSDP2 (``train.sharding: fsdp``): the helpers on two gloo ranks without
Ray (sharded checkpoints, every rank writing its rows of a candidate), and Ray Train runs
against DDP replicas (same candidates, each rank's bytes, DCP checkpoints, exact resume
after a lost worker). More on the checkpoints: ``test_fsdp_checkpoints.py``."""
import functools
import os

import fsspec
import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from conftest import UnevenNet, SavesEveryStep
from twa_ray.config import ConfigError, config_from_dict
from twa_ray.core.fsdp_rows import fsdp_element_ranges
from twa_ray.core.params import ParamLayout
from twa_ray.parallel.checkpoint_files import load_sharded, read_sharded, save_sharded
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.parallel.sharding import sharding_mode
from twa_ray.parallel.sharding.fsdp import checkpoint_shards, load_checkpoint_shards
from twa_ray.parallel.sharding.fsdp_candidates import RowCandidateWriter
from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap, local_rows, local_shard
from twa_ray.store import CandidateStore
from twa_ray.tasks import ImageClassification

WORLD = 2
FSDP = sharding_mode("fsdp")

# --------------------------------------------------------------------- no Ray


def test_train_sharding_is_checked_and_defaults_to_blocks():
    assert config_from_dict({}).train.sharding == "blocks"
    assert config_from_dict({"train": {"sharding": "fsdp"}}).train.sharding == "fsdp"
    with pytest.raises(ConfigError, match=r"train.sharding: 'rows' is not one of \['blocks', 'fsdp'\]"):
        config_from_dict({"train": {"sharding": "rows"}})


def test_loss_scale_gives_the_global_mean_either_way():
    # DDP averages the 4 ranks' gradients, FSDP sums them: both end at sum / 64
    assert sharding_mode("blocks").loss_scale(4, 64) / 4 == FSDP.loss_scale(4, 64) == 1 / 64


def test_a_mode_refuses_the_other_modes_checkpoint_and_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="holds sharded state .* train.sharding: blocks cannot resume from it"):
        sharding_mode("blocks").check_checkpoint({"optimizer_groups": []}, "ckpt")
    with pytest.raises(ValueError, match="holds full tensors .* train.sharding: fsdp resumes from sharded"):
        FSDP.check_checkpoint({"model": {}}, "ckpt")
    with pytest.raises(ValueError, match=r"train.sharding: 'rows' is not one of \['blocks', 'fsdp'\]"):
        sharding_mode("rows", "train.sharding")


def test_lockstep_evaluation_makes_as_many_forward_passes_on_every_rank():
    from torch.utils.data import TensorDataset

    from twa_ray.parallel.evaluate import evaluate, evaluate_across_ranks

    data = TensorDataset(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    model, calls = UnevenNet(gain=False), []
    model.register_forward_hook(lambda *_: calls.append(1))
    plain = evaluate(model, data, ImageClassification(), batch_size=2)
    assert len(calls) == 3
    padded = evaluate(model, data, ImageClassification(), batch_size=2, min_batches=5)  # the last batch twice more, not counted
    assert len(calls) == 3 + 5 and padded == plain
    # rank 1 of 2 holds examples 1 and 3 (one batch of 2), rank 0 three (two batches): rank 1 pads one
    calls.clear()
    evaluate_across_ranks(model, data, ImageClassification(), 1, 2, "cpu", batch_size=2, lockstep=True)
    assert len(calls) == 2
    calls.clear()
    evaluate_across_ranks(model, data, ImageClassification(), 1, 2, "cpu", batch_size=2)
    assert len(calls) == 1
    calls.clear()
    evaluate_across_ranks(model, torch.utils.data.Subset(data, [0]), ImageClassification(), 1, 2, "cpu", batch_size=2, lockstep=True)
    assert len(calls) == 1  # no example of its own: still rank 0's one pass


def test_rows_of_plain_tensors():
    full = torch.arange(15.0).view(5, 3)
    assert torch.equal(local_rows(full, 0, 2), full[:3]) and torch.equal(local_rows(full, 1, 2), full[3:])
    assert local_rows(full, 3, 4).shape == (0, 3)  # 5 rows in chunks of 2: rank 3 holds none


def _steps(model, optimizer, rank=0, world=1, steps=3):
    """SGD steps on fixed batches of 8; each rank takes its half of the global mean loss."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum")
        (loss * FSDP.loss_scale(world, 8)).backward()
        optimizer.step()


def _rank_main(rank: int, world: int, out: str, store_uri: str) -> None:
    model = fsdp_wrap(UnevenNet(gain=False), world, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, optimizer, rank, world)
    ema = [local_shard(p).detach() * 0.5 for p in model.parameters()]
    sharded, groups = checkpoint_shards(model, optimizer, ema)
    save_sharded(f"{out}/checkpoint", sharded)  # both ranks into one folder
    # a fresh sharded optimizer takes the state back: its rows of every momentum buffer
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint_shards(functools.partial(load_sharded, f"{out}/checkpoint"), model, fresh, groups)
    momentum = [local_shard(fresh.state[p]["momentum_buffer"]).clone() for p in model.parameters()]
    store = CandidateStore.open(store_uri)
    writer = RowCandidateWriter(SavesEveryStep(store) if rank == 0 else None, store_uri, rank, world, torch.device("cpu"))
    writer.save(model, kind="epoch", step=3, lr=0.1, metrics={})
    # a store that cannot be written in pieces (not pyarrow's local filesystem): rank 0 gathers
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))
    remote = CandidateStore.open(store.path, filesystem=fs)
    gathering = RowCandidateWriter(SavesEveryStep(remote) if rank == 0 else None, store_uri, rank, world,
                                   torch.device("cpu"))
    gathering.save(model, kind="epoch", step=4, lr=0.1, metrics={})
    torch.save({"momentum": momentum, "bytes": writer.bytes_by_rank(),
                "saved": writer.writer.saved_infos if rank == 0 else None}, f"{out}/rank{rank}.pt")


def test_two_gloo_ranks_checkpoint_their_shards_and_write_their_rows(tmp_path):
    store = CandidateStore.create_for_model(str(tmp_path / "store"), UnevenNet(gain=False))
    spawn_ranks(_rank_main, WORLD, str(tmp_path), store.uri)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    ref = UnevenNet(gain=False)  # the same steps in one process
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _steps(ref, opt)
    shapes = {name: p.shape for name, p in ref.named_parameters()}
    model = read_sharded(tmp_path / "checkpoint", "model", {name: v.shape for name, v in ref.state_dict().items()})
    optimizer = read_sharded(tmp_path / "checkpoint", "optimizer", {f"{n}.momentum_buffer": s for n, s in shapes.items()})
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(model[name], value, rtol=1e-5, atol=1e-6)
    names = [name for name, _ in ref.named_parameters()]
    buffers = [opt.state[p]["momentum_buffer"] for p in ref.parameters()]
    for i, buf in enumerate(buffers):  # the shards make the full buffers, each rank gets its rows back
        torch.testing.assert_close(optimizer[f"{names[i]}.momentum_buffer"], buf, rtol=1e-5, atol=1e-6)
        for rank in range(WORLD):
            torch.testing.assert_close(ranks[rank]["momentum"][i], local_rows(buf, rank, WORLD), rtol=1e-5, atol=1e-6)
    flat = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    ema = read_sharded(tmp_path / "checkpoint", "ema", shapes)
    torch.testing.assert_close(torch.cat([ema[n].reshape(-1) for n in names]), 0.5 * flat, rtol=1e-5, atol=1e-6)

    # the candidate: every rank's rows, committed once, equal to the full weights
    assert ranks[0]["saved"] == [(0, {"kind": "epoch", "step": 3})]
    assert len(store) == 2 and not [f for f in os.listdir(tmp_path / "store" / "candidates") if ".tmp-" in f]
    torch.testing.assert_close(store.read_flat(0), flat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.read_flat(1), flat, rtol=1e-5, atol=1e-6)  # gathered, appended whole
    values = [4 * sum(b - a for spans in fsdp_element_ranges(store.shapes, r, WORLD) for a, b in spans) for r in range(WORLD)]
    assert values[0] != values[1] and sum(values) == 4 * store.num_params  # uneven rows
    written = ranks[0]["bytes"]
    assert written == ranks[1]["bytes"]  # every rank got the counts
    size = os.path.getsize(store.list_candidates()[0].path)
    assert written[1] == values[1] and values[0] < written[0] <= values[0] + size - 4 * store.num_params


def _lossy_rank_main(rank: int, world: int, out: str, store_uri: str) -> None:
    """Two candidates into a local store whose filesystem drops rank 1's writes into the shared
    file (as a FUSE mount of an object store does to all writers but the last to close it)."""
    import logging

    import twa_ray.store.write as store_write

    if rank == 1:  # the row writer reports its bytes and writes nothing
        store_write.write_value_ranges = lambda path, numels, ranges, values: 4 * values.size
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("twa_ray.parallel.sharding.fsdp_candidates").addHandler(handler)
    model = fsdp_wrap(UnevenNet(gain=False), world, torch.device("cpu"))
    store = CandidateStore.open(store_uri)
    writer = RowCandidateWriter(SavesEveryStep(store) if rank == 0 else None, store_uri, rank, world, torch.device("cpu"))
    for step in (1, 2):
        _steps(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, world, steps=1)
        writer.save(model, kind="step", step=step, lr=0.1, metrics={})
        torch.save([p.full_tensor().detach().reshape(-1) for p in model.parameters()], f"{out}/weights{step}.pt")
    torch.save({"warnings": [r.getMessage() for r in warnings],
                "saved": writer.writer.saved_infos if rank == 0 else None}, f"{out}/lossy{rank}.pt")


def test_rows_a_filesystem_lost_are_rewritten_whole_with_one_warning(tmp_path):
    """A shared file that keeps only some ranks' rows must not be committed as a candidate (its
    lost rows would read as zeros): each rank's rows are checked against its checksum and the
    candidate is gathered and appended whole instead, with one warning naming the filesystem."""
    store = CandidateStore.create_for_model(str(tmp_path / "store"), UnevenNet(gain=False))
    spawn_ranks(_lossy_rank_main, WORLD, str(tmp_path), store.uri)
    ranks = [torch.load(tmp_path / f"lossy{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["saved"] == [(0, {"kind": "step", "step": 1}), (1, {"kind": "step", "step": 2})]
    assert len(store) == 2 and not [f for f in os.listdir(tmp_path / "store" / "candidates") if ".tmp-" in f]
    for index, step in enumerate((1, 2)):
        weights = torch.cat(torch.load(tmp_path / f"weights{step}.pt", weights_only=True))
        torch.testing.assert_close(store.read_flat(index), weights, rtol=0, atol=0)
    [warning] = ranks[0]["warnings"]  # once, by rank 0, not again for the second candidate
    assert str(tmp_path / "store") in warning and "concurrent writers" in warning and "FUSE" in warning
    assert ranks[1]["warnings"] == []


# --------------------------------------------------------------------- Ray Train


def _raw(out, **train) -> dict:
    """8x8 synthetic images, an MLP (no BatchNorm) with uneven row shards (15 and 5 rows),
    2 workers, 2 epochs of 4 steps, candidates also every 3 steps."""
    return {
        "name": "tiny", "output_dir": str(out), "seed": 0,
        "data": {"name": "synthetic", "batch_size": 32, "val_ratio": 0.2,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 5, "channels": 1, "image_size": 8}},
        "model": {"name": "mlp", "kwargs": {"hidden": [15]}},
        "train": {"epochs": 2, "budget_epochs": 4, "schedule": "linear", "lr": 0.1, "workers": WORLD,
                  "save_every_steps": 3, "grad_clip": 1.0, **train},
    }


def _final(result, store):
    from twa_ray.runtime.base_train import read_final

    return read_final(result.checkpoint_path, ParamLayout(tuple(store.names), tuple(map(tuple, store.shapes))))


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """{sharding: (result, store)} of the same 2-worker run with DDP replicas and with FSDP."""
    from twa_ray.runtime.base_train import run_base_training

    out = {}
    for sharding in ("blocks", "fsdp"):
        result = run_base_training(config_from_dict(_raw(tmp_path_factory.mktemp(sharding), sharding=sharding)))
        out[sharding] = result, CandidateStore.open(result.store_uri)
    return out


@pytest.mark.ray
def test_fsdp_candidates_equal_ddp_replicas(runs):
    (blocks, replicas), (fsdp, sharded) = runs["blocks"], runs["fsdp"]
    infos = [(c.info["kind"], c.info["step"]) for c in sharded.list_candidates()]
    assert infos == [(c.info["kind"], c.info["step"]) for c in replicas.list_candidates()]
    assert infos == [("initial", 0), ("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8)]
    assert sharded.names == replicas.names and sharded.shapes == replicas.shapes
    w = sharded.read()
    torch.testing.assert_close(w, replicas.read(), rtol=0, atol=1e-5)
    assert (w[-1] - w[0]).abs().max() > 1e-2  # it trained
    # the final weights and EMA agree too (read_final assembles the fsdp checkpoint's shards)
    for a, b in zip(_final(fsdp, sharded), _final(blocks, replicas)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [m["train_loss"] for m in fsdp.metrics] == pytest.approx([m["train_loss"] for m in blocks.metrics], abs=1e-5)
    assert [m["val_acc"] for m in fsdp.metrics] == [m["val_acc"] for m in blocks.metrics]


@pytest.mark.ray
def test_fsdp_checkpoints_hold_each_ranks_shards_not_full_tensors(runs):
    from twa_ray.parallel.checkpoint_files import load_checkpoint

    (blocks, _), (fsdp, store) = runs["blocks"], runs["fsdp"]
    # DCP's files, one per rank (Ray merged the ranks' folders), and rank 0's small state and info
    assert sorted(os.listdir(fsdp.checkpoint_path)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "info.json",
                                                         "state.pt"]
    assert set(load_checkpoint(fsdp.checkpoint_path)) == {"optimizer_groups", "scheduler", "epoch", "step"}
    # every weight, momentum buffer and EMA is saved in 2 chunks, one in each rank's file
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(fsdp.checkpoint_path).read_metadata()
    keys = [f"{part}.{name}{suffix}" for name in store.names
            for part, suffix in (("model", ""), ("optimizer", ".momentum_buffer"), ("ema", ""))]
    for key in keys:
        chunks = meta.state_dict_metadata[key].chunks
        assert len(chunks) == WORLD and sum(c.sizes.numel() for c in chunks) == meta.state_dict_metadata[key].size.numel()
    files = {index.fqn: set() for index in meta.storage_data}
    for index, where in meta.storage_data.items():
        files[index.fqn].add(where.relative_path)
    assert all(files[key] == {"__0_0.distcp", "__1_0.distcp"} for key in keys)
    assert "model" in load_checkpoint(blocks.checkpoint_path)  # blocks mode's format as before


@pytest.mark.ray
def test_each_rank_wrote_only_its_rows(runs):
    from twa_ray.runtime.base_train import checkpoint_info

    result, store = runs["fsdp"]
    written = checkpoint_info(result.checkpoint_path)["candidate_bytes_written"]
    n = len(store)
    values = [4 * n * sum(b - a for spans in fsdp_element_ranges(store.shapes, r, WORLD) for a, b in spans) for r in range(WORLD)]
    assert values[0] != values[1] and sum(values) == 4 * n * store.num_params  # uneven: 8 + 7 and 3 + 2 rows
    assert written[1] == values[1]  # exactly its rows of every candidate
    # rank 0: its rows plus each file's layout (headers and footer), none of rank 1's values
    layout = sum(os.path.getsize(c.path) for c in store.list_candidates()) - 4 * n * store.num_params
    assert values[0] < written[0] <= values[0] + layout


@pytest.mark.ray
def test_fsdp_run_resumed_after_a_lost_worker_ends_the_same(ray_local, runs, tmp_path):
    """The last rank fails once at the start of epoch 2; the restarted group resumes from the
    epoch-1 checkpoint (full state, sharded again) and ends with the same candidates."""
    from twa_ray.runtime.base_train import run_base_training

    result = run_base_training(config_from_dict({**_raw(tmp_path / "run", sharding="fsdp"),
                                                  "debug": {"fail_at_epoch": 2}}))
    assert os.path.exists(os.path.join(result.run_path, "base-failed-at-epoch-2"))
    store = CandidateStore.open(result.store_uri)
    uninterrupted, reference = runs["fsdp"]
    assert [c.info["step"] for c in store.list_candidates()] == [0, 3, 4, 6, 8]  # none twice
    torch.testing.assert_close(store.read(), reference.read(), rtol=0, atol=1e-6)
    for a, b in zip(_final(result, store), _final(uninterrupted, reference)):  # weights and EMA
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
