"""Candidates of an FSDP2 model in base training (``train.sharding: fsdp``): every rank writes
its rows.

Every rank writes its rows of every parameter into one pending candidate file at the same time
(``CandidateStore.begin_candidate`` on rank 0, ``write_rows`` on every rank); after an
all-reduce, which also tells every rank whether all rows were written, rank 0 commits it under
the next index. No reader sees a pending file, and the committed one holds the full vector a
``blocks`` run would write. Each checkpoint's info records the bytes every rank has written
(``candidate_bytes_written``, by rank, since the worker group started). Before the commit each
rank reads back the next rank's rows and compares them with the checksum that rank computed of
what it wrote (``store.rows_checksum``): a path every node sees may be a filesystem that
keeps one writer's copy of a file (a FUSE mount of an object store, such as gcsfuse or s3fs,
uploads the whole file on close: the last to close wins, the others' rows stay zeros). Then
that candidate, and every later one, is gathered on rank 0 and appended whole, with one
warning. An object store cannot write into a file at all: there rank 0 gathers the weights (no
other rank holds them: ``fsdp_tensors.gather_on_rank0``) and appends.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from ...core.fsdp_rows import fsdp_element_ranges
from ...core.params import trainable_parameters
from ...store import CandidateStore, rows_checksum
from ..process_group import all_reduce_sum, broadcast_object
from .candidates import CandidateWriter
from .fsdp_tensors import gather_on_rank0, local_shard

log = logging.getLogger(__name__)

_GATHER = "gather"  # RowCandidateWriter's broadcast: the store cannot be written in pieces


class RowCandidateWriter:
    """Every rank's part in saving candidates of an FSDP2 model: each writes its rows.

    ``save`` is base training's candidate writer's, called by every rank at the same point
    (a collective); rank 0's ``CandidateWriter`` decides what is saved and with what info.
    ``in_pieces``: whether candidates are written in pieces (a local or network filesystem
    whose shared files keep every rank's rows so far), else gathered on rank 0 and appended.
    """

    def __init__(self, writer: CandidateWriter | None, store_uri: str, rank: int, world: int,
                 device: torch.device) -> None:
        self.writer = writer  # rank 0's; None on the others
        self.store = writer.store if writer is not None else CandidateStore.open(store_uri)
        self.rank, self.world, self.device = rank, world, device
        self.in_pieces = self.store.is_local

    @torch.no_grad()
    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict,
             weights: Sequence[torch.Tensor] | None = None) -> None:
        """``weights``: this rank's rows of each trainable parameter to save instead of the
        model's (the EMA's, ``train.candidates_from: ema``)."""
        info = self.writer.info_for(kind=kind, step=step, lr=lr, metrics=metrics) if self.writer is not None else None
        pending = None
        if info is not None:
            pending = self.store.begin_candidate(info) if self.in_pieces else _GATHER
        pending = broadcast_object(pending)
        if pending is None:  # nothing due at this step
            return
        params = trainable_parameters(net)
        local = [local_shard(p) for p in params] if weights is None else list(weights)  # this rank's rows
        if pending != _GATHER and self._write_rows(pending, local, step):
            if self.writer is not None:
                self.writer.saved(self.store.commit_candidate(pending), info)
            return
        full = gather_on_rank0(local, [p.shape for p in params], self.rank, self.world)
        if self.writer is not None:  # rank 0: (D,) on CPU
            self.writer.saved(self.store.append_flat(full, info), info)

    def _write_rows(self, pending: str, local: list[torch.Tensor], step: int) -> bool:
        """Every rank writes its rows into the candidate file ``pending``, then reads back the
        next rank's rows and compares them with that rank's checksum (a collective). True when
        every rank's rows arrived. False when some did not: ``pending`` is discarded, rank 0
        warns, and the writer gathers candidates from now on (``in_pieces`` off on every rank).

        Raises:
            RuntimeError: a rank could not write its rows (``pending`` is discarded).
        """
        sums = torch.zeros(1 + self.world, dtype=torch.float64)  # ranks that failed, then each rank's checksum
        try:
            own = torch.cat([w.detach().reshape(-1) for w in local])  # this rank's rows, store order
            self.store.write_rows(pending, fsdp_element_ranges(self.store.shapes, self.rank, self.world), own)
            sums[1 + self.rank] = rows_checksum(own)
        except (ValueError, OSError) as exc:
            log.error("rank %d could not write its rows of the candidate at step %d: %s", self.rank, step, exc)
            sums[0] = 1.0
        sums = all_reduce_sum(sums, self.device)  # a barrier too: every rank has written and closed the file
        failed = int(sums[0])
        if failed:
            if self.writer is not None:
                self.store.discard_candidate(pending)
            raise RuntimeError(f"the candidate at step {step} was not saved: {failed} of {self.world} ranks could "
                               "not write their rows (their errors are logged)")
        if self.world == 1:  # one writer: nothing to lose
            return True
        peer = (self.rank + 1) % self.world  # no rank checks its own rows: it may see its own copy of the file
        lost = torch.zeros(self.world, dtype=torch.float64)
        try:
            back = self.store.read_rows(pending, fsdp_element_ranges(self.store.shapes, peer, self.world))
            lost[peer] = float(rows_checksum(back) != int(sums[1 + peer]))
        except (ValueError, OSError) as exc:
            log.debug("rank %d could not read back rank %d's rows of %s: %s", self.rank, peer, pending, exc)
            lost[peer] = 1.0
        lost = all_reduce_sum(lost, self.device)
        if not lost.any():
            return True
        self.in_pieces = False
        if self.writer is not None:
            self.store.discard_candidate(pending)
            log.warning("candidate store %s: the rows of rank(s) %s of the candidate at step %d did not arrive in the "
                        "file that every rank wrote into: its filesystem, %s, does not support concurrent writers "
                        "to one file (a FUSE mount of an object store, such as gcsfuse or s3fs?). This candidate "
                        "and the next ones are gathered on rank 0 and written whole.", self.store.uri,
                        [r for r in range(self.world) if lost[r]], step, self.store.mount())
        return False

    def checkpoint_info(self) -> dict:
        """What each checkpoint's info records of the writes: the bytes by rank (a collective)."""
        return {"candidate_bytes_written": self.bytes_by_rank()}

    def bytes_by_rank(self) -> list[int]:
        """Bytes each rank has written into the store so far, indexed by rank (a collective)."""
        counts = torch.zeros(self.world, dtype=torch.float64)
        counts[self.rank] = self.store.bytes_written
        return [int(c) for c in all_reduce_sum(counts, self.device).tolist()]
