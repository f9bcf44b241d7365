"""How a sharded TWA step exchanges its two D-sized vectors over torch.distributed: one class
per ``twa.exchange``, behind the ``EXCHANGES`` registry.

Rank r owns coordinates ``ranges[r]``; ranges differ in length, so the vectors that
go through reduce-scatter and all-gather are laid out padded to the longest range.
``bytes_sent`` counts the payload this rank hands to collectives (for benchmarks).

The exchanges, chosen by measurement (``benchmarks/comm.py --time``):
- ``sharded`` (:class:`ShardedExchange`): reduce-scatter of the gradient, all-gather of the
  weights: each moves half the bytes of an all-reduce on the wire. NCCL's collectives are
  built for this.
- ``all_reduce`` (:class:`AllReduceExchange`): an all-reduce of the gradient (this rank keeps
  its slice) and an all-reduce of a zeroed D-vector holding this rank's weights. Twice the
  bytes, but on gloo a reduce-scatter or an all-gather each takes longer than a whole
  all-reduce (``benchmarks/RESULTS.md``).
- ``ring`` (:class:`RingExchange`): the reduce-scatter and the all-gather as rings of
  point-to-point sends: in each of k - 1 steps rank r sends one rank's range to rank r + 1 and
  receives one from rank r - 1 (adding it, in the reduce-scatter). The bytes of the sharded
  exchange, without gloo's slow reduce-scatter and all-gather: on gloo this is the fastest.
``auto`` picks ``ring`` on gloo and ``sharded`` on every other backend (:func:`resolve_exchange`).

Every exchange is a ``core.collectives.Collectives``; one process uses
``core.collectives.LocalCollectives`` instead.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch
import torch.distributed as dist

from ..core.collectives import from_padded, padded_length, to_padded

AUTO = "auto"  # twa.exchange: the backend's best (resolve_exchange)

# the ring sends each message as pieces of at most this many bytes, so that the reduce-scatter
# adds a piece while the next ones are on the way (benchmarks/comm.py --time)
RING_PIECE_BYTES = 2 << 20


class Exchange:
    """The collectives of one rank of a blocks-sharded TWA step (``core.collectives.Collectives``).

    Args:
        ranges: per rank r, the coordinates ``(start, end)`` it owns (``ShardPlan.ranges``).
        rank, world_size: this rank and the number of ranks of ``group``.
        group: the process group (None: the default one).

    A subclass implements :meth:`_reduce_scatter_sum` and :meth:`_all_gather` for 2+ ranks.
    """

    name: ClassVar[str]
    overlaps: ClassVar[bool] = False  # whether all_gather takes an ``in_flight`` callable

    def __init__(self, ranges: Sequence[tuple[int, int]], rank: int, world_size: int, group=None) -> None:
        if len(ranges) != world_size:
            raise ValueError(f"{len(ranges)} ranges for {world_size} ranks")
        self.ranges = list(ranges)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.pad = padded_length(self.ranges)
        self.bytes_sent = 0

    def reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """(D,) local vector -> (end_r - start_r,) its sum over ranks on this rank's range.
        ``flat`` is scratch: an exchange may sum into it in place."""
        if self.world_size == 1:
            start, end = self.ranges[self.rank]
            return flat[start:end]
        return self._reduce_scatter_sum(flat)

    def all_gather(self, own: torch.Tensor, out: torch.Tensor,
                   in_flight: Callable[[], object] | None = None) -> torch.Tensor:
        """Each rank's (end_r - start_r,) slice ``own`` -> the full (D,) vector in ``out``.
        ``in_flight`` (ring only; benchmarks/comm.py times an overlap with it) is called while
        the first ring step's bytes travel: with two ranks, the whole exchange."""
        if in_flight is not None and (not self.overlaps or self.world_size == 1):
            raise ValueError(f"in_flight needs the ring exchange on 2+ ranks, not {self.name!r} on {self.world_size}")
        if self.world_size == 1:
            if own.data_ptr() != out.data_ptr():
                out.copy_(own)
            return out
        return self._all_gather(own, out, in_flight)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks, in place; returns ``t``."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes_sent += t.numel() * t.element_size()
        return t

    def _reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, own: torch.Tensor, out: torch.Tensor, in_flight: Callable[[], object] | None) -> torch.Tensor:
        raise NotImplementedError

    def _range(self, flat: torch.Tensor, r: int) -> torch.Tensor:
        """Rank ``r``'s (mod k) range of the (D,) vector ``flat``, a view."""
        start, end = self.ranges[r % self.world_size]
        return flat[start:end]


class ShardedExchange(Exchange):
    """``twa.exchange: sharded``: ``reduce_scatter_single`` and ``all_gather_single`` of the
    vectors padded to the longest range (in place when the ranges are equal)."""

    name = "sharded"

    def _reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        src = to_padded(flat, self.ranges, self.pad)  # (k * pad,)
        out = torch.empty(self.pad, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_single(out, src, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_sent += src.numel() * src.element_size()
        return out[: end - start]

    def _all_gather(self, own: torch.Tensor, out: torch.Tensor, in_flight: Callable[[], object] | None) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        if all(e - s == self.pad for s, e in self.ranges):  # equal ranges: gather in place
            dist.all_gather_single(out, own.contiguous(), group=self.group)
            self.bytes_sent += own.numel() * own.element_size()
            return out
        src = torch.zeros(self.pad, dtype=own.dtype, device=own.device)
        src[: end - start] = own
        gathered = torch.empty(self.pad * self.world_size, dtype=own.dtype, device=own.device)
        dist.all_gather_single(gathered, src, group=self.group)
        self.bytes_sent += src.numel() * src.element_size()
        return from_padded(gathered, self.ranges, self.pad, out)


class AllReduceExchange(Exchange):
    """``twa.exchange: all_reduce``: both vectors through ``all_reduce``: the gradient (this
    rank keeps its slice), and a zeroed D-vector holding this rank's weights (the other ranks
    add their slices to zeros: exact)."""

    name = "all_reduce"

    def _reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        return self.all_reduce_sum(flat)[start:end]

    def _all_gather(self, own: torch.Tensor, out: torch.Tensor, in_flight: Callable[[], object] | None) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        if own.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            own = own.clone()  # a view of out: zeroing out would erase it
        out.zero_()
        out[start:end] = own
        return self.all_reduce_sum(out)


def _works_by_op(works: Sequence, n_sends: int, n_recvs: int) -> tuple[list, list]:
    """The works ``dist.batch_isend_irecv`` returned for ``n_sends`` sends then ``n_recvs``
    receives, as (a work or None per receive, the works left to wait for after them).

    gloo returns one work per op, in the ops' order: each receive is then waited for alone.
    A backend that coalesces (NCCL) returns one work for the whole batch (torch 2.14
    ``distributed_c10d.batch_isend_irecv``): it is waited for here, before any receive is
    read, since pairing works with ops by index would skip the receives (and their adds)."""
    if len(works) == n_sends + n_recvs:
        return list(works[n_sends:]), list(works[:n_sends])
    if not works:
        raise RuntimeError(f"batch_isend_irecv returned no work for {n_sends + n_recvs} ops")
    for work in works:
        work.wait()
    return [None] * n_recvs, []


class RingExchange(Exchange):
    """``twa.exchange: ring``: the reduce-scatter and the all-gather as k - 1 steps of
    point-to-point sends around the ring of ranks (``batch_isend_irecv``); the reduce-scatter's
    messages go as pieces of at most ``ring_piece_bytes``."""

    name = "ring"
    overlaps = True

    def __init__(self, ranges: Sequence[tuple[int, int]], rank: int, world_size: int, group=None,
                 ring_piece_bytes: int = RING_PIECE_BYTES) -> None:
        super().__init__(ranges, rank, world_size, group)
        self.ring_piece_bytes = ring_piece_bytes
        # this rank's neighbours as ranks of the default group, which point-to-point ops address
        self._next, self._prev = ((self._global_rank((rank + 1) % world_size), self._global_rank((rank - 1) % world_size))
                                  if world_size > 1 else (None, None))
        self._recv = None  # the reduce-scatter's receive buffer (pad,), made on first use

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        if self._recv is None or self._recv.dtype != flat.dtype or self._recv.device != flat.device:
            self._recv = torch.empty(self.pad, dtype=flat.dtype, device=flat.device)
        # step i: send range r-1-i (summed over i ranks so far), add range r-2-i; ends with range r
        for i in range(self.world_size - 1):
            into = self._range(flat, self.rank - 2 - i)
            self._step(self._range(flat, self.rank - 1 - i), self._recv[: into.numel()], add_into=into)
        return flat[start:end]

    def _all_gather(self, own: torch.Tensor, out: torch.Tensor, in_flight: Callable[[], object] | None) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        # step 0 sends own itself and copies it into out while the bytes travel
        mine = out[start:end]

        def first_step() -> None:
            if own.data_ptr() != mine.data_ptr():
                mine.copy_(own)
            if in_flight is not None:
                in_flight()

        for i in range(self.world_size - 1):  # step i: pass range r-i on, receive range r-1-i
            self._step(own.contiguous() if i == 0 else self._range(out, self.rank - i),
                       self._range(out, self.rank - 1 - i), in_flight=first_step if i == 0 else None)
        return out

    def _step(self, send: torch.Tensor, recv: torch.Tensor, add_into: torch.Tensor | None = None,
              in_flight: Callable[[], object] | None = None) -> None:
        """Send ``send`` to the next rank while receiving ``recv`` from the previous one, and
        meanwhile call ``in_flight``. With ``add_into`` (the reduce-scatter), add ``recv`` to it:
        then both messages go as pieces of at most ``ring_piece_bytes`` (cut by the message's own
        size, so sender and receiver cut alike) and the add goes piece by piece as they arrive,
        overlapping the transfer of the pieces behind it."""
        sends, recvs = (self._pieces(send), self._pieces(recv)) if add_into is not None else ((send,), (recv,))
        ops = [dist.P2POp(dist.isend, s, self._next, self.group) for s in sends]
        ops += [dist.P2POp(dist.irecv, r, self._prev, self.group) for r in recvs]
        works = dist.batch_isend_irecv(ops)
        if in_flight is not None:
            in_flight()
        into = add_into.tensor_split(len(recvs)) if add_into is not None else (None,) * len(recvs)
        recv_works, send_works = _works_by_op(works, len(sends), len(recvs))
        for piece, target, work in zip(recvs, into, recv_works):
            if work is not None:
                work.wait()  # this piece has landed: add it while the ones behind it travel
            if target is not None:
                target.add_(piece)
        for work in send_works:
            work.wait()
        self.bytes_sent += send.numel() * send.element_size()

    def _pieces(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.tensor_split(max(1, -(-t.numel() * t.element_size() // self.ring_piece_bytes)))


# twa.exchange -> its class; "auto" (AUTO) is resolved by the backend (resolve_exchange)
EXCHANGES: dict[str, type[Exchange]] = {cls.name: cls for cls in (ShardedExchange, AllReduceExchange, RingExchange)}


def resolve_exchange(exchange: str, backend: str | None) -> str:
    """``twa.exchange`` -> the key of ``EXCHANGES`` it means for a process group of ``backend``
    (``auto``: ``ring`` on gloo, ``sharded`` elsewhere). Raises ValueError naming the key and
    the valid values for an unknown one."""
    if exchange != AUTO and exchange not in EXCHANGES:
        raise ValueError(f"twa.exchange: {exchange!r} is not one of {[AUTO, *EXCHANGES]}")
    if exchange == AUTO:
        return "ring" if backend == "gloo" else "sharded"
    return exchange


def make_exchange(exchange: str, ranges: Sequence[tuple[int, int]], rank: int, world_size: int, *,
                  backend: str | None = None, group=None, **kwargs) -> Exchange:
    """The ``twa.exchange`` ``exchange`` of this rank (``auto`` resolved for ``backend``,
    default: the process group's); ``kwargs`` go to its class (``ring_piece_bytes``)."""
    if exchange == AUTO and backend is None:
        backend = dist.get_backend(group)
    return EXCHANGES[resolve_exchange(exchange, backend)](ranges, rank, world_size, group=group, **kwargs)
