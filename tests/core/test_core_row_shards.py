"""Row shards (FSDP2's layout): every rank's Q rows, center and partial kernels against the
one-process projection, with k ranks simulated by threads and exact in-process all-reduces."""
import threading
from math import prod

import pytest
import torch

from twa_ray.core.blocks import make_blocks
from twa_ray.core.projection import build_projection
from twa_ray.core.row_shards import ROW_BASES, build_row_projection, row_block_sizes

# odd row counts (uneven shards), a tensor of one row (empty on every rank but the first),
# a zero direction in the last tensor
SHAPES = [(5, 3), (5,), (7, 5), (7,), (1, 7), (1,)]


def _rows(shape, rank, world):
    """FSDP2's rows of ``rank``: torch.chunk of dim 0, empty past the end."""
    idx = torch.arange(shape[0]).chunk(world)
    return (int(idx[rank][0]), int(idx[rank][-1]) + 1) if rank < len(idx) else (shape[0], shape[0])


def _columns(rank, world):
    """Flat coordinates of ``rank``'s rows of every tensor, in layout order."""
    cols, offset = [], 0
    for shape in SHAPES:
        a, b = _rows(shape, rank, world)
        per = prod(shape[1:])
        cols.append(torch.arange(offset + a * per, offset + b * per))
        offset += prod(shape)
    return torch.cat(cols)


class _ThreadGroup:
    """All-reduces between ``world`` threads: every rank hands in a tensor, all get the reduction."""

    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def reduce(self, rank, t, op):
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = op(torch.stack(self.slots))
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return out


def _row_projections(w, granularity, basis, bits, world, center=None):
    """Every rank's row projection, built concurrently as the ranks of a group would."""
    blocks = make_blocks([prod(s) for s in SHAPES], granularity)
    group, out, errors = _ThreadGroup(world), [None] * world, []

    def run(rank):
        try:
            cols = _columns(rank, world)
            numels = [(b - a) * prod(s[1:]) for s in SHAPES for a, b in [_rows(s, rank, world)]]
            out[rank] = build_row_projection(
                w[:, cols].clone(), row_block_sizes(blocks, numels), basis, bits,
                lambda t: group.reduce(rank, t, lambda s: s.sum(0)), lambda t: group.reduce(rank, t, lambda s: s.amax(0)),
                center=None if center is None else center[cols],
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return blocks, out


def _candidates(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = sum(prod(s) for s in SHAPES)
    w = torch.randn(d, generator=gen) + 0.3 * torch.randn(n, d, generator=gen)
    w[:, -1] = 0.25  # the last tensor: the same value in every candidate (a zero direction)
    return w


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("bits", [1, 4, 8, 32])
@pytest.mark.parametrize("basis", ROW_BASES)
@pytest.mark.parametrize("granularity", ["tensor", "model", "size:40"])
def test_every_ranks_rows_equal_the_one_process_projection(world, bits, basis, granularity):
    w = _candidates()
    blocks, ranks = _row_projections(w, granularity, basis, bits, world)
    whole = build_projection(w.clone(), blocks.sizes, basis, bits)
    q = whole.dequantized()  # (n, D)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(w.shape[1], generator=gen)
    x = torch.randn(w.shape[0], len(blocks), generator=gen)
    grad = torch.zeros_like(x)
    for rank, proj in enumerate(ranks):
        cols = _columns(rank, world)
        assert proj.num_blocks == len(blocks)
        torch.testing.assert_close(proj.center, whole.center[cols], rtol=0, atol=0)
        torch.testing.assert_close(proj.dequantized(), q[:, cols], rtol=0, atol=1e-6)
        if bits < 32:  # the same quantisation ranges on every rank
            torch.testing.assert_close(proj.scale, whole.scale, rtol=0, atol=0)
            torch.testing.assert_close(proj.offset, whole.offset, rtol=0, atol=0)
        torch.testing.assert_close(proj.reconstruct(x), whole.reconstruct(x)[cols], rtol=1e-6, atol=1e-6)
        grad += proj.coef_grad(g[cols])
    torch.testing.assert_close(grad, whole.coef_grad(g), rtol=1e-5, atol=1e-5)


def test_a_given_center_is_the_origin():
    w = _candidates()
    center = w.mean(dim=0) + 0.1
    blocks, ranks = _row_projections(w, "tensor", "normalized", 8, 2, center=center)
    whole = build_projection(w.clone(), blocks.sizes, "normalized", 8, center=center)
    for rank, proj in enumerate(ranks):
        cols = _columns(rank, 2)
        torch.testing.assert_close(proj.center, center[cols], rtol=0, atol=0)
        torch.testing.assert_close(proj.dequantized(), whole.dequantized()[:, cols], rtol=0, atol=1e-6)


def test_checkpoints_basis_is_refused():
    with pytest.raises(ValueError, match="basis 'checkpoints' cannot be built on row shards"):
        build_row_projection(torch.zeros(2, 3), [3], "checkpoints", 8, lambda t: t, lambda t: t)
