"""Writing one candidate in pieces (FSDP2 ranks, each its part of every tensor: runs of dim-0 rows,
or one run per outer index of a tensor cut on a dim > 0): the file equals append's, nobody lists
it before the commit, and each writer writes only its piece."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch

from twa_ray.core.fsdp_rows import fsdp_element_ranges, fsdp_shard
from twa_ray.store import CandidateStore, rows_checksum

SHAPES = {"emb": (300, 40), "conv": (3, 2, 2, 2), "bias": (5,), "one_row": (1, 4), "tiny": (2,)}
INFO = {"kind": "epoch", "step": 4, "metrics": {"train_loss": 0.5}}


def _pieces(store: CandidateStore, flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``rank``'s part of every tensor of ``flat`` (D,), as its local shards flattened, in store order."""
    return torch.cat([flat[o + a:o + b] for o, runs in zip(store.offsets, fsdp_element_ranges(store.shapes, rank, world))
                      for a, b in runs])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pieces_of_all_writers_give_appends_file(tmp_path, world):
    store = CandidateStore.create(tmp_path / "s", list(SHAPES), list(SHAPES.values()))
    flat = torch.randn(store.num_params, generator=torch.Generator().manual_seed(world))
    store.append_flat(flat, INFO)  # the reference: candidate 0, written in one go

    pending = store.begin_candidate(INFO)
    header_bytes = store.bytes_written
    writers = [CandidateStore.open(store.uri) for _ in range(world)]  # one instance per rank
    for rank in reversed(range(world)):  # in any order
        assert len(store) == 1  # not listed before the commit
        piece = _pieces(store, flat, rank, world)
        assert writers[rank].write_rows(pending, fsdp_element_ranges(store.shapes, rank, world), piece) == 4 * piece.numel()
    for rank, writer in enumerate(writers):  # each wrote its rows and nothing else
        assert writer.bytes_written == 4 * _pieces(store, flat, rank, world).numel()
    assert store.commit_candidate(pending) == 1 and not os.path.exists(pending)

    if world == 2:  # 'conv' (3, 2, 2, 2) and 'one_row' (1, 4) are cut on dim 1: one run per outer index
        assert [fsdp_shard(s, 0, 2).dim for s in store.shapes] == [0, 1, 0, 1, 0]
        assert fsdp_element_ranges(store.shapes, 1, 2)[1] == [(4, 8), (12, 16), (20, 24)]
    a, b = (c.path for c in store.list_candidates())
    assert open(a, "rb").read() == open(b, "rb").read()  # byte for byte
    assert store.list_candidates()[1].info == INFO
    torch.testing.assert_close(store.read_flat(1), flat, rtol=0, atol=0)
    # the values were holes until written: laying the file out wrote its headers only
    assert 0 < header_bytes <= os.path.getsize(b) - 4 * store.num_params


def test_discard_and_errors_name_the_problem(tmp_path):
    store = CandidateStore.create(tmp_path / "s", list(SHAPES), list(SHAPES.values()))
    pending = store.begin_candidate({})
    ranges = fsdp_element_ranges(store.shapes, 0, 2)
    width = sum(b - a for runs in ranges for a, b in runs)
    with pytest.raises(ValueError, match="values for ranges of"):
        store.write_rows(pending, ranges, torch.zeros(width + 1))
    bad = torch.zeros(width)
    bad[width - 1] = float("nan")  # the last tensor's rows
    with pytest.raises(ValueError, match="'tiny'"):
        store.write_rows(pending, ranges, bad)
    with pytest.raises(ValueError, match="does not fit parameter 'bias'"):
        store.write_rows(pending, [(0, 0), (0, 0), (0, 6), (0, 0), (0, 0)], torch.zeros(6))
    with pytest.raises(ValueError, match="not a candidate begun"):
        store.write_rows(str(tmp_path / "elsewhere.arrow"), ranges, torch.zeros(width))
    store.discard_candidate(pending)
    assert not os.path.exists(pending) and len(store) == 0
    remote = CandidateStore.open(store.path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(_memory_fs())))
    assert not remote.is_local
    with pytest.raises(ValueError, match="object store cannot write into a file"):
        remote.begin_candidate({})


def test_read_rows_shows_what_arrived_and_the_checksum_tells_lost_rows(tmp_path):
    """A pending candidate read back: each writer's rows as written, zeros where a write was lost."""
    store = CandidateStore.create(tmp_path / "s", list(SHAPES), list(SHAPES.values()))
    flat = torch.randn(store.num_params, generator=torch.Generator().manual_seed(0))
    pending = store.begin_candidate(INFO)
    rows = [_pieces(store, flat, rank, 2) for rank in range(2)]
    store.write_rows(pending, fsdp_element_ranges(store.shapes, 0, 2), rows[0])  # rank 1's write never arrives
    back = [store.read_rows(pending, fsdp_element_ranges(store.shapes, rank, 2)) for rank in range(2)]
    torch.testing.assert_close(back[0], rows[0], rtol=0, atol=0)
    assert rows_checksum(back[0]) == rows_checksum(rows[0].double())  # as stored: float32
    assert not back[1].any() and rows_checksum(back[1]) != rows_checksum(rows[1])
    assert store.bytes_read == 4 * store.num_params and rows_checksum(torch.zeros(0)) == 0
    assert str(tmp_path) in store.mount()
    with pytest.raises(ValueError, match="not a candidate begun"):
        store.read_rows(str(tmp_path / "elsewhere.arrow"), fsdp_element_ranges(store.shapes, 0, 2))


def _memory_fs():
    """The local files through fsspec: not pyarrow's LocalFileSystem, so ``is_local`` is False."""
    fsspec = pytest.importorskip("fsspec")
    return fsspec.filesystem("file")
