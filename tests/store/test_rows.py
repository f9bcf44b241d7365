"""FSDP2 shards: the placement rule (dim 0, or a dim k divides), its element ranges against real
fully_shard shards (gloo and fake process groups), and the store reading only a rank's
elements (local and ranged)."""
from __future__ import annotations

import copy
import io
import math

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from conftest import fake_process_group
from twa_ray.models import build_model
from twa_ray.core.fsdp_rows import fsdp_element_ranges, fsdp_padded_numel, fsdp_row_range, fsdp_shard, fsdp_shard_dim
from twa_ray.store import CandidateStore
from twa_ray.store.candidate_file import locate_values


def read_fsdp_shard(store: CandidateStore, rank: int, world: int, candidates=None) -> torch.Tensor:
    """``rank``'s FSDP2 shard of the candidates: its element ranges of every tensor."""
    return store.read_ranges(fsdp_element_ranges(store.shapes, rank, world), candidates)

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
        # fsdp_wrap cuts dim 1 instead where world divides 3 and not rows: no padding
        dim1 = rows % world != 0 and 3 % world == 0
        assert fsdp_shard_dim((rows, 3), world) == int(dim1)
        assert fsdp_padded_numel((rows, 3), world) == (3 * rows // world if dim1 else 3 * math.ceil(rows / world))


def test_row_range_examples_and_errors():
    assert [fsdp_row_range((5,), r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [fsdp_row_range((1, 7), r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    # (5, 2, 3) at k = 2: dim 1 (5 is odd), rank 1 holds index 1 of it: elements 3-5 of each of the 5 outer rows
    assert fsdp_element_ranges([(5, 2, 3), (3,), (6, 2, 3)], 1, 2) == [
        [(3, 6), (9, 12), (15, 18), (21, 24), (27, 30)], [(2, 3)], [(18, 36)]]
    assert fsdp_element_ranges([(5, 2, 3), (1,)], 0, 1) == [[(0, 30)], [(0, 1)]]  # one rank: whole tensors
    assert fsdp_element_ranges([(1,)], 1, 2) == [[]]  # nothing
    with pytest.raises(ValueError, match="0-d"):
        fsdp_row_range((), 0, 2)
    with pytest.raises(ValueError, match="rank"):
        fsdp_row_range((4,), 2, 2)
    with pytest.raises(ValueError, match="world"):
        fsdp_padded_numel((4,), 0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rule_and_padding_equal_real_fsdp2_shards(world):
    """fully_shard (a fake process group of ``world`` ranks, one rank at a time): each parameter's
    local shard is exactly rows fsdp_row_range of the full tensor, stored in fsdp_padded_numel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Conv1d(3, 7, 2))
    reference = {n: p.detach().clone() for n, p in full.named_parameters()}
    for rank in range(world):
        with fake_process_group(rank, world):
            net = copy.deepcopy(full)
            fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
            for name, p in net.named_parameters():
                start, end = fsdp_row_range(reference[name].shape, rank, world)
                local = p.to_local()
                torch.testing.assert_close(local, reference[name][start:end], rtol=0, atol=0)
                assert local.untyped_storage().nbytes() == 4 * fsdp_shard(reference[name].shape, 0, world,
                                                                          dim=0).padded_numel


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_placement_rule_and_its_element_ranges(world):
    """dim 0 when world divides it, else the first dim world divides, else dim 0; a rank's part is
    torch.chunk's chunk along that dim, its ranges that chunk's elements of the flat tensor in
    row-major order (``to_local().reshape(-1)``), and the ranks' ranges cover every element once."""
    shapes = [(7,), (8, 3), (10, 4), (1, 65, 192), (3, 5, 2, 2), (5, 3), (1, 1), (12, 6, 3, 3), (0, 4), (2, 0, 3)]
    for shape in shapes:
        full = torch.arange(math.prod(shape)).view(shape)
        divisible = [d for d, size in enumerate(shape) if size % world == 0]
        dim = 0 if 0 in divisible or not divisible or full.numel() == 0 else divisible[0]
        assert fsdp_shard_dim(shape, world) == dim, shape
        chunks = torch.chunk(full, world, dim=dim)
        covered = []
        for rank in range(world):
            part = fsdp_shard(shape, rank, world)
            chunk = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
            assert part.dim == dim and part.local_shape == tuple(chunk.shape), (shape, rank)
            assert part.numel == chunk.numel()
            assert part.padded_numel == chunks[0].numel() == fsdp_padded_numel(shape, world)
            ranges = part.ranges()
            assert all(a < b for a, b in ranges) and all(b < c for (_, b), (c, _) in zip(ranges, ranges[1:]))
            flat = [i for a, b in ranges for i in range(a, b)]
            assert flat == chunk.reshape(-1).tolist(), (shape, rank)
            covered += flat
        assert sorted(covered) == list(range(full.numel()))
    # ViT's position embedding at k = 8: 65 runs of 192 / 8 = 24 values, none padded
    pos = fsdp_shard((1, 65, 192), 3, 8)
    assert (pos.dim, pos.start, pos.end, pos.padded_numel) == (2, 72, 96, 65 * 24)
    assert pos.ranges()[:2] == [(72, 96), (264, 288)] and len(pos.ranges()) == 65
    with pytest.raises(ValueError, match="only evenly"):
        fsdp_shard((4, 5), 0, 2, dim=1)
    with pytest.raises(ValueError, match="not a dim"):
        fsdp_shard((4, 5), 0, 2, dim=2)


class _Shapes(nn.Module):
    """One parameter per shape; forward(x) = x * sum_t <p_t, c_t> with fixed c_t = 0, 1, 2, ..."""

    def __init__(self, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for t, shape in enumerate(shapes):  # the module's own parameters: one FSDP unit
            self.register_parameter(f"p{t}", nn.Parameter(torch.randn(shape, generator=gen)))

    def forward(self, x):
        return x * sum((p * torch.arange(p.numel(), dtype=p.dtype).view(p.shape)).sum() for p in self.parameters())


# (shape, dim) placed explicitly on 2 ranks: uneven dim 0, and dims > 0 of 3-D and 4-D tensors
_GLOO_CASES = [((5, 6), 0), ((5, 6), 1), ((1, 65, 12), 2), ((1, 64, 12), 1), ((3, 4, 2, 2), 1), ((3, 4, 2, 2), 3),
               ((7,), 0), ((4, 6, 3), 1), ((1, 4), 0)]


def _gloo_rank(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap

    mesh = init_device_mesh("cpu", (2,))
    explicit = _Shapes([shape for shape, _ in _GLOO_CASES])
    dims = {id(p): dim for p, (_, dim) in zip(explicit.parameters(), _GLOO_CASES)}
    fully_shard(explicit, mesh=mesh, shard_placement_fn=lambda p: Shard(dims[id(p)]))
    explicit.set_gradient_divide_factor(1.0)  # summed, as fsdp_wrap's
    explicit.set_force_sum_reduction_for_comms(True)
    try:
        fully_shard(_Shapes([(4, 5)]), mesh=mesh, shard_placement_fn=lambda p: Shard(1))
        uneven = "accepted"
    except NotImplementedError as exc:
        uneven = str(exc)
    ruled = fsdp_wrap(_Shapes([shape for shape, _ in _GLOO_CASES]), 2, torch.device("cpu"))
    result = {"uneven": uneven}
    for key, net in (("explicit", explicit), ("ruled", ruled)):
        net(torch.tensor(float(rank + 1))).backward()  # gradients summed over ranks: 3 c_t
        result[key] = [(p.to_local().detach().clone(), p.to_local().untyped_storage().nbytes(),
                        p.grad.to_local().clone(), [pl.dim for pl in p.placements]) for p in net.parameters()]
    torch.save(result, f"{out}/gloo{rank}.pt")


def test_rule_equals_two_gloo_ranks_fully_shard(tmp_path):
    """Two gloo processes: the DTensor local shards (values, shapes, padded storage, gradients) of
    fully_shard with explicit Shard(d) placements equal fsdp_shard(shape, rank, 2, dim=d)'s, and
    fsdp_wrap places every parameter on fsdp_shard_dim; FSDP2 refuses uneven dims > 0."""
    from twa_ray.parallel.local_ranks import spawn_ranks

    spawn_ranks(_gloo_rank, 2, str(tmp_path))
    fulls = list(_Shapes([shape for shape, _ in _GLOO_CASES]).parameters())
    for rank in range(2):
        got = torch.load(tmp_path / f"gloo{rank}.pt", weights_only=True)
        assert "uneven sharding on dim 1" in got["uneven"]
        for key in ("explicit", "ruled"):
            for (shape, dim), full, (local, nbytes, grad, placed) in zip(_GLOO_CASES, fulls, got[key]):
                if key == "ruled":
                    dim = fsdp_shard_dim(shape, 2)
                part = fsdp_shard(shape, rank, 2, dim=dim)
                assert placed == [dim] and tuple(local.shape) == part.local_shape, (key, shape, dim, rank)
                expected = full.detach().narrow(dim, part.start, part.end - part.start)
                torch.testing.assert_close(local, expected, rtol=0, atol=0)
                assert nbytes == 4 * part.padded_numel
                coef = torch.arange(math.prod(shape), dtype=torch.float32)
                own = [i for a, b in part.ranges() for i in range(a, b)]
                torch.testing.assert_close(grad.reshape(-1), 3 * coef[own])


class _ViTStem(nn.Module):
    """A ViT's parameters in small: a (1, 65, 48) position embedding, a patch convolution, a norm, a head."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 65, 48))
        self.patch = nn.Conv2d(3, 48, 4, 4)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 10)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_fsdp_wrap_shards_equal_the_rule(world):
    """fsdp_wrap (a fake process group of ``world`` ranks, one rank at a time) on a ViT-like model:
    each parameter's local shard is ``local_rows`` of the full tensor, its storage fsdp_padded_numel,
    and the ranks' shards of the position embedding are even (no padding)."""

    from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap, local_rows

    torch.manual_seed(0)
    full = _ViTStem()
    reference = {n: p.detach().clone() for n, p in full.named_parameters()}
    for rank in range(world):
        with fake_process_group(rank, world):
            net = fsdp_wrap(copy.deepcopy(full), world, torch.device("cpu"))
            for name, p in net.named_parameters():
                local = p.to_local()
                torch.testing.assert_close(local, local_rows(reference[name], rank, world), rtol=0, atol=0)
                assert local.untyped_storage().nbytes() == 4 * fsdp_padded_numel(reference[name].shape, world)
                assert [pl.dim for pl in p.placements] == [fsdp_shard_dim(reference[name].shape, world)]
    assert fsdp_padded_numel(full.pos_embed.shape, world) * world == full.pos_embed.numel()


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
    cut_on_dim = set()
    for world in (1, 2, 3, 4, 8):
        parts = [read_fsdp_shard(store, rank, world) for rank in range(world)]
        for t, shape in enumerate(store.shapes):
            pieces = []
            at = [sum(fsdp_shard(s, r, world).numel for s in store.shapes[:t]) for r in range(world)]
            for rank in range(world):
                part = fsdp_shard(shape, rank, world)
                assert fsdp_element_ranges(store.shapes, rank, world)[t] == part.ranges()
                cut_on_dim.add(part.dim)
                piece = parts[rank][:, at[rank]:at[rank] + part.numel]
                pieces.append(piece.reshape(len(flats), *part.local_shape))  # as to_local() holds it
            # the ranks' pieces, concatenated along the shard dim in rank order, are the whole tensor
            torch.testing.assert_close(torch.cat(pieces, 1 + part.dim).reshape(len(flats), -1),
                                       flats[:, offsets[t]:offsets[t + 1]], rtol=0, atol=0)
    assert cut_on_dim == {0, 1}  # e.g. 'emb' (7, 3) on dim 1 at k = 3, 'conv' (3, 2, 2, 2) at k = 2
    one = read_fsdp_shard(store, 1, 2, candidates=[2, 0])  # candidate subset, in the order given
    torch.testing.assert_close(one, read_fsdp_shard(store, 1, 2)[[2, 0]], rtol=0, atol=0)
    out = store.read_ranges([(1, 4), (0, 0), (5, 5), (0, 4), (1, 2)])  # arbitrary ranges, some empty
    torch.testing.assert_close(
        out, torch.cat([flats[:, 1:4], flats[:, offsets[3]:offsets[3] + 4], flats[:, offsets[4] + 1:offsets[4] + 2]], 1),
        rtol=0, atol=0)
    out[0, 0] = 1.0  # writable
    # several ranges per tensor, increasing: adjacent ones are merged, empty ones skipped
    out = store.read_ranges([[(0, 2), (2, 3), (5, 7)], [], [(1, 1)], [(0, 1), (3, 4)], (0, 2)])
    torch.testing.assert_close(out, torch.cat([flats[:, 0:3], flats[:, 5:7], flats[:, offsets[3]:offsets[3] + 1],
                                               flats[:, offsets[3] + 3:offsets[3] + 4], flats[:, offsets[4]:]], 1),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="'emb': range \\[1, 2\\) overlaps"):
        store.read_ranges([[(0, 2), (1, 2)], [], [], [], []])


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
        read_fsdp_shard(store, 0, 2, candidates=[7])
    path = store.list_candidates()[1].path
    data = open(path, "rb").read()
    open(path, "wb").write(data[:40])  # truncated inside the record batch's metadata
    with pytest.raises(ValueError, match="cand-000001"):
        read_fsdp_shard(store, 0, 2, candidates=[1])
    open(path, "wb").write(b"PARQUET" + data[7:])
    with pytest.raises(ValueError, match="magic"):
        read_fsdp_shard(store, 0, 2, candidates=[1])


@pytest.mark.parametrize("model, world", [("small_cnn", 2), ("small_cnn", 4), ("small_cnn", 8), ("vit_small", 8)])
def test_bytes_read_per_rank_are_its_share(tmp_path, model, world):
    """A rank reads its part of every tensor and the files' small headers, nothing else: bytes
    counted by the filesystem under the store (ranged reads, the S3 path). Within 1 % of total/k
    for the quickstart CNN and the small ViT (whose position embedding is read in 65 runs)."""
    torch.manual_seed(0)
    if model == "small_cnn":
        net = build_model("small_cnn", 10, 1, 28, widths=(32, 64, 128))
    else:
        net = build_model("vit_small", 10, 3, 32)
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
        shard = read_fsdp_shard(store, rank, world, candidates=indices)
        read.append(handler.counter[0])
        payload.append(store.bytes_read)
        own = fsdp_element_ranges(store.shapes, rank, world)
        assert store.bytes_read == 4 * shard.numel() == 4 * n * sum(b - a for runs in own for a, b in runs)
        headers = read[-1] - payload[-1]
        assert 0 < headers <= n * (24 + 100 + 80 * len(store.names))  # magic, prefixes, batch metadata
    assert sum(payload) == 4 * n * store.num_params  # every value read once, by one rank
    padded = sum(fsdp_padded_numel(s, world) for s in store.shapes)
    even = file_bytes / world
    ratios = [r / even for r in read]
    # the largest rank owns at most FSDP2's padded shard of every tensor: its padding is the only excess
    assert max(payload) <= 4 * n * padded
    assert max(ratios) <= world * padded / store.num_params + 0.02, ratios
    values = [p / (4 * n * store.num_params / world) for p in payload]
    assert max(values) <= 1.01, values
    print(f"{model} k={world}: bytes read per rank / (file bytes / k) = {[round(r, 4) for r in ratios]}; values "
          f"{max(values):.4f} x total/k; padding bound {world * padded / store.num_params:.4f}; one whole read "
          f"{full_bytes / file_bytes:.4f}")
    assert full.shape == (n, store.num_params)
