"""Row ranges: FSDP2's dim-0 shard rule, and the store reading only a rank's rows (local and ranged)."""
from __future__ import annotations

import copy
import io
import math

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from twa_ray.models import build_model
from twa_ray.store import CandidateStore, fsdp_element_ranges, fsdp_padded_numel, fsdp_row_range
from twa_ray.store.candidate_file import locate_values

# ----------------------------------------------------------------------------- the rule


def _torch_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's own cut: torch.chunk on dim 0, padded with empty chunks (_chunk_with_empty)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    chunk = _chunk_with_empty(torch.arange(rows), world, dim=0)[rank]
    return (int(chunk[0]), int(chunk[-1]) + 1) if chunk.numel() else None


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_row_range_is_torch_chunk_with_empty(world):
    for rows in range(1, 3 * world + 3):
        covered = []
        for rank in range(world):
            start, end = fsdp_row_range((rows, 3), rank, world)
            expected = _torch_rows(rows, rank, world)
            if expected is None:
                assert start == end, (rows, rank, world)
            else:
                assert (start, end) == expected, (rows, rank, world)
            covered += range(start, end)
        assert covered == list(range(rows))  # every row once, in rank order
        assert fsdp_padded_numel((rows, 3), world) == 3 * math.ceil(rows / world)


def test_row_range_examples_and_errors():
    assert [fsdp_row_range((5,), r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [fsdp_row_range((1, 7), r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert fsdp_element_ranges([(5, 2, 3), (3,)], 1, 2) == [(18, 30), (2, 3)]
    with pytest.raises(ValueError, match="0-d"):
        fsdp_row_range((), 0, 2)
    with pytest.raises(ValueError, match="rank"):
        fsdp_row_range((4,), 2, 2)
    with pytest.raises(ValueError, match="world"):
        fsdp_padded_numel((4,), 0)


def _fake_group(rank: int, world: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rule_and_padding_equal_real_fsdp2_shards(world):
    """fully_shard (a fake process group of ``world`` ranks, one rank at a time): each parameter's
    local shard is exactly rows fsdp_row_range of the full tensor, stored in fsdp_padded_numel."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Conv1d(3, 7, 2))
    reference = {n: p.detach().clone() for n, p in full.named_parameters()}
    for rank in range(world):
        _fake_group(rank, world)
        try:
            net = copy.deepcopy(full)
            fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
            for name, p in net.named_parameters():
                start, end = fsdp_row_range(reference[name].shape, rank, world)
                local = p.to_local()
                torch.testing.assert_close(local, reference[name][start:end], rtol=0, atol=0)
                assert local.untyped_storage().nbytes() == 4 * fsdp_padded_numel(reference[name].shape, world)
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the store

SHAPES = {"emb": (7, 3), "conv": (3, 2, 2, 2), "bias": (5,), "one_row": (1, 4), "tiny": (2,)}


def _filled_store(path, n: int = 3):
    store = CandidateStore.create(path, list(SHAPES), list(SHAPES.values()))
    torch.manual_seed(1)
    flats = torch.randn(n, store.num_params)
    for v in flats:
        store.append_flat(v, info={"note": "x" * 37})  # info of some length shifts the record batch
    return store, flats


class _CountingFile(io.RawIOBase):
    """A local file that counts the bytes it hands out."""

    def __init__(self, path: str, counter: list[int]):
        self._f = open(path, "rb")  # noqa: SIM115 - closed with this object
        self._counter = counter

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def read(self, size=-1):
        data = self._f.read(size)
        self._counter[0] += len(data)
        return data

    def close(self):
        self._f.close()
        super().close()


class _CountingHandler(pafs.FileSystemHandler):
    """A read-only, non-local view of the local disk that counts the bytes read from files (the
    store then takes its ranged-read path, as on S3)."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.counter = [0]

    def get_type_name(self):
        return "counting"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(path, self.counter), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def _read_only(self, *args, **kwargs):
        raise OSError("read-only test filesystem")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def _remote(store: CandidateStore) -> tuple[CandidateStore, _CountingHandler]:
    handler = _CountingHandler()
    return CandidateStore.open(store.path, filesystem=pafs.PyFileSystem(handler)), handler


@pytest.mark.parametrize("where", ["local", "ranged"])
def test_read_fsdp_shard_equals_the_rows_of_full_reads(tmp_path, where):
    store, flats = _filled_store(tmp_path / "s")
    if where == "ranged":
        store, _ = _remote(store)
        assert not store.is_local
    offsets = store.offsets
    for world in (1, 2, 3, 4, 8):
        parts = [store.read_fsdp_shard(rank, world) for rank in range(world)]
        for t, shape in enumerate(store.shapes):
            pieces = []
            at = [sum(b - a for a, b in store.fsdp_ranges(r, world)[:t]) for r in range(world)]
            for rank in range(world):
                start, end = store.fsdp_ranges(rank, world)[t]
                rows = fsdp_row_range(shape, rank, world)
                assert (start, end) == (rows[0] * math.prod(shape[1:]), rows[1] * math.prod(shape[1:]))
                pieces.append(parts[rank][:, at[rank]:at[rank] + end - start])
            # the ranks' pieces, in rank order, are the whole tensor
            torch.testing.assert_close(torch.cat(pieces, 1), flats[:, offsets[t]:offsets[t + 1]], rtol=0, atol=0)
    one = store.read_fsdp_shard(1, 2, candidates=[2, 0])  # candidate subset, in the order given
    torch.testing.assert_close(one, store.read_fsdp_shard(1, 2)[[2, 0]], rtol=0, atol=0)
    out = store.read_ranges([(1, 4), (0, 0), (5, 5), (0, 4), (1, 2)])  # arbitrary ranges, some empty
    torch.testing.assert_close(
        out, torch.cat([flats[:, 1:4], flats[:, offsets[3]:offsets[3] + 4], flats[:, offsets[4] + 1:offsets[4] + 2]], 1),
        rtol=0, atol=0)
    out[0, 0] = 1.0  # writable


def test_value_offsets_are_pyarrows_own(tmp_path):
    """locate_values finds each column's values where pyarrow's zero-copy reader maps them."""
    store, _ = _filled_store(tmp_path / "s", n=1)
    path = store.list_candidates()[0].path
    with pa.memory_map(path) as source:
        offsets, header_bytes = locate_values(source, path, store.numels)
        source.seek(0)
        base = source.read_buffer(source.size()).address  # the map's start
        batch = pa.ipc.open_file(source).get_batch(0)
        for j, offset in enumerate(offsets):
            assert batch.column(j).values.buffers()[1].address - base == offset
    assert header_bytes < 24 + 100 + 80 * len(SHAPES)


def test_errors_name_the_problem(tmp_path):
    store, _ = _filled_store(tmp_path / "s", n=2)
    with pytest.raises(ValueError, match="5 tensors"):
        store.read_ranges([(0, 1)])
    with pytest.raises(ValueError, match="'bias' of 5 elements"):
        store.read_ranges([(0, 0), (0, 0), (2, 6), (0, 0), (0, 0)])
    with pytest.raises(IndexError, match="no candidate 7"):
        store.read_fsdp_shard(0, 2, candidates=[7])
    path = store.list_candidates()[1].path
    data = open(path, "rb").read()
    open(path, "wb").write(data[:40])  # truncated inside the record batch's metadata
    with pytest.raises(ValueError, match="cand-000001"):
        store.read_fsdp_shard(0, 2, candidates=[1])
    open(path, "wb").write(b"PARQUET" + data[7:])
    with pytest.raises(ValueError, match="magic"):
        store.read_fsdp_shard(0, 2, candidates=[1])


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_read_per_rank_are_its_share(tmp_path, world):
    """A rank reads its rows of every tensor and the files' small headers, nothing else: bytes
    counted by the filesystem under the store (ranged reads, the S3 path)."""
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, 28, widths=(32, 64, 128))
    local = CandidateStore.create_for_model(tmp_path / "cnn", net)
    n = 3
    for _ in range(n):
        local.append({k: v + 0.1 * torch.randn_like(v) for k, v in net.named_parameters()})
    store, handler = _remote(local)
    indices = store.candidate_indices()
    file_bytes = sum(c.size for c in pafs.LocalFileSystem().get_file_info([c.path for c in store.list_candidates()]))
    handler.counter[0] = 0
    full = store.read(candidates=indices)  # Arrow's reader, for comparison: whole columns
    full_bytes = handler.counter[0]
    assert full_bytes >= 4 * n * store.num_params

    payload, read = [], []
    for rank in range(world):
        handler.counter[0], store.bytes_read = 0, 0
        shard = store.read_fsdp_shard(rank, world, candidates=indices)
        read.append(handler.counter[0])
        payload.append(store.bytes_read)
        assert store.bytes_read == 4 * shard.numel() == 4 * n * sum(b - a for a, b in store.fsdp_ranges(rank, world))
        headers = read[-1] - payload[-1]
        assert 0 < headers <= n * (24 + 100 + 80 * len(store.names))  # magic, prefixes, batch metadata
    assert sum(payload) == 4 * n * store.num_params  # every value read once, by one rank
    padded = sum(fsdp_padded_numel(s, world) for s in store.shapes)
    even = file_bytes / world
    ratios = [r / even for r in read]
    # the largest rank owns ceil(rows/k) rows of every tensor: FSDP2's padding is the only excess
    assert max(payload) <= 4 * n * padded
    assert max(ratios) <= world * padded / store.num_params + 0.02, ratios
    print(f"k={world}: bytes read per rank / (file bytes / k) = {[round(r, 4) for r in ratios]}; "
          f"padding bound {world * padded / store.num_params:.4f}; one whole read {full_bytes / file_bytes:.4f}")
    assert full.shape == (n, store.num_params)
