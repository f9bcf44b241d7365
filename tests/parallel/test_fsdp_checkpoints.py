"""Sharded checkpoints of ``sharding: fsdp`` (torch.distributed.checkpoint) without Ray: two
gloo ranks each save their shards into their own folder, the folders are merged as Ray
Train merges the ranks' reported folders, and three ranks resume from them (DCP reshards),
also from S3 (moto's server), where each reads only the bytes it loads; one process reads
the full tensors back. Loading runs no pickled code."""
import collections
import functools
import os
import pickle
import posixpath
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from conftest import UnevenNet
from twa_ray.core.params import ParamLayout
from twa_ray.parallel.checkpoint_files import _dcp_load, is_sharded, load_sharded, read_sharded, save_sharded
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.parallel.sharding import sharding_mode
from twa_ray.parallel.sharding.fsdp import checkpoint_shards, load_checkpoint_shards
from twa_ray.parallel.sharding.fsdp_rows import RowLayout, center_shards, gather_rows, own_rows
from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap, local_shard
from twa_ray.store import fs as store_fs
from twa_ray.core.fsdp_rows import fsdp_shard

SAVED_BY, RESUMED_BY = 2, 3
FSDP = sharding_mode("fsdp")


def _steps(model, optimizer, first, last, rank=0, world=1):
    """SGD steps first..last-1 on fixed global batches of 12; each rank its share of the mean loss."""
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(last)]
    for x, y in batches[first:last]:
        part = slice(rank * 12 // world, (rank + 1) * 12 // world)
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum") * FSDP.loss_scale(world, 12)).backward()
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
    ema = load_checkpoint_shards(functools.partial(load_sharded, f"{out}/merged"), model, optimizer, groups)
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


class _Counted:
    """A readable file that adds the bytes each read returns to ``add``."""

    def __init__(self, f: pa.NativeFile, add):
        self._f, self._add = f, add

    def read(self, nbytes=None):
        data = self._f.read(nbytes)
        self._add(len(data))
        return data

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def size(self):
        return self._f.size()

    def close(self):
        return self._f.close()

    @property
    def closed(self):
        return self._f.closed

    def readable(self):
        return True

    def seekable(self):
        return self._f.seekable()

    def writable(self):
        return False


class _CountingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem ``fs`` that counts the bytes read from each file: ``read`` {file name: bytes}."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs, self.read = fs, collections.Counter()

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def _counted(self, f, path):
        name = posixpath.basename(path)

        def add(n):
            self.read[name] += n

        return pa.PythonFile(_Counted(f, add), mode="r")

    def open_input_stream(self, path):
        return self._counted(self.fs.open_input_stream(path), path)

    def open_input_file(self, path):
        return self._counted(self.fs.open_input_file(path), path)

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def _s3_resume_main(rank: int, world: int, out: str, uri: str) -> None:
    """Resume base training's shards, then TWA's run state and center, from the checkpoint at
    ``uri`` through a filesystem that counts what this rank reads."""
    from ray.train import Checkpoint

    from twa_ray.config import config_from_dict
    from twa_ray.runtime.checkpoint_reads import load_shards
    from twa_ray.runtime.twa_loop import _resume, _Worker

    loc = store_fs.resolve(uri)
    counting = _CountingHandler(loc.fs)
    checkpoint = Checkpoint(loc.path, filesystem=pafs.PyFileSystem(counting))
    model = fsdp_wrap(UnevenNet(seed=1), world, torch.device("cpu"))  # other weights until loaded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    ema = load_checkpoint_shards(functools.partial(load_shards, checkpoint), model, optimizer,
                                 torch.load(f"{out}/groups.pt", weights_only=True))
    base = dict(counting.read)
    counting.read.clear()
    cfg = config_from_dict({"seed": 0, "twa": {"sharding": "fsdp"}})
    run = _resume(_Worker(cfg, rank, world, torch.device("cpu"), model, None, None, None, [], None, None, None, 1, 1, out), checkpoint)
    torch.save({"base": base, "twa": dict(counting.read), "ema": ema, "center": run.center, "round": run.round,
                "weights": [p.full_tensor().detach() for p in model.parameters()]}, f"{out}/s3_resumed{rank}.pt")


def _needed_bytes(folder, rank: int, world: int, parts: tuple[str, ...]) -> dict[str, int]:
    """{file: bytes} of the stored chunks of ``parts`` (model, optimizer, ema, center) that
    overlap ``rank``'s part (``fsdp_shard``) of their parameter, at ``world`` ranks."""
    from twa_ray.parallel.checkpoint_files import _dcp_io

    meta = _dcp_io()[0](folder).read_metadata()
    shapes = dict(UnevenNet().named_parameters())
    needed = collections.Counter()
    for index, where in meta.storage_data.items():
        part, name = index.fqn.split(".", 1)
        if part not in parts:
            continue
        param = shapes[name.removesuffix(".momentum_buffer")].shape
        cut = fsdp_shard(param, rank, world)
        lo = [cut.start if d == cut.dim else 0 for d in range(len(param))]
        hi = [cut.end if d == cut.dim else param[d] for d in range(len(param))]
        [chunk] = [c for c in meta.state_dict_metadata[index.fqn].chunks if tuple(c.offsets) == tuple(index.offset)]
        if all(max(a, o) < min(b, o + n) for a, b, o, n in zip(lo, hi, chunk.offsets, chunk.sizes)):
            needed[where.relative_path] += where.length
    return dict(needed)


def test_a_resumed_rank_reads_only_what_it_loads_from_s3(merged, s3_uri):
    """Three ranks resume from the two ranks' checkpoint on S3: each reads .metadata and, of the
    .distcp files, only the chunks that overlap its part (a whole file of another rank never),
    once; TWA's resume reads rank 0's state and info and the center's chunks, once."""
    from twa_ray.parallel.checkpoint_files import save_checkpoint
    from twa_ray.runtime.twa_loop import TWARunState

    local = merged / "on_s3"  # the checkpoint as Ray Train keeps it, with a TWA run's state past round 1
    shutil.copytree(merged / "merged", local)
    save_checkpoint(local, *TWARunState(round=1, data_seed=0).to_checkpoint())
    uri = store_fs.join(s3_uri, "ckpt")
    loc = store_fs.resolve(uri)
    pafs.copy_files(str(local), loc.path, destination_filesystem=loc.fs)
    spawn_ranks(_s3_resume_main, RESUMED_BY, str(merged), uri)
    got = [torch.load(merged / f"s3_resumed{r}.pt", weights_only=True) for r in range(RESUMED_BY)]

    ref = UnevenNet()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _steps(ref, opt, 0, 3)
    rows = RowLayout(ParamLayout.from_model(ref), RESUMED_BY)
    size = {name: os.path.getsize(local / name) for name in os.listdir(local)}
    for rank, g in enumerate(got):
        for p, w in zip(ref.parameters(), g["weights"]):
            torch.testing.assert_close(w, p.detach(), rtol=1e-5, atol=1e-6)
        full_ema = torch.cat([0.5 * p.detach().reshape(-1) for p in ref.parameters()])
        torch.testing.assert_close(torch.cat([e.reshape(-1) for e in g["ema"]]), rows.take(full_ema, rank),
                                   rtol=1e-5, atol=1e-6)
        assert g["round"] == 1
        torch.testing.assert_close(g["center"], rows.take(_vector(), rank), rtol=0, atol=0)
        assert g["base"] == {".metadata": size[".metadata"],
                             **_needed_bytes(local, rank, RESUMED_BY, ("model", "optimizer", "ema"))}
        assert g["twa"] == {"info.json": size["info.json"], "state.pt": size["state.pt"],
                            ".metadata": size[".metadata"], **_needed_bytes(local, rank, RESUMED_BY, ("center",))}
    # parts 0 and 2 of every tensor lie in one saved rank's chunks each: the other file is not read
    assert "__1_0.distcp" not in got[0]["base"] and "__0_0.distcp" not in got[2]["base"]

    # one process assembles the full weights (base_train.read_final): every rank's model chunks, nothing else
    from ray.train import Checkpoint

    from twa_ray.runtime.checkpoint_reads import has_shards, read_shards

    counting = _CountingHandler(loc.fs)
    checkpoint = Checkpoint(loc.path, filesystem=pafs.PyFileSystem(counting))
    assert has_shards(checkpoint) and not counting.read
    model = read_shards(checkpoint, "model", {n: p.shape for n, p in ref.named_parameters()})
    for name, p in ref.named_parameters():
        torch.testing.assert_close(model[name], p.detach(), rtol=1e-5, atol=1e-6)
    assert counting.read == {".metadata": size[".metadata"], **_needed_bytes(local, 0, 1, ("model",))}


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
