"""Reading candidates: whole columns (:meth:`StoreReads.read`, Arrow column projection) or
element ranges of every tensor (:meth:`StoreReads.read_ranges`), memory-mapped when local,
ranged reads on S3 and other filesystems.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from .candidate_file import column_values, open_candidate, open_source, read_value_ranges
from .metadata import StoreMetadata
from .ranges import Ranges

__all__ = ["StoreReads"]


class StoreReads(StoreMetadata):
    """The reading methods of ``CandidateStore``."""

    def read(
        self,
        columns: Iterable[str | int] | None = None,
        candidates: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Read selected columns of selected candidates into one float32 tensor.

        Args:
            columns: parameter names or integer indices into ``names``; the output
                concatenates them in the order given. Default: all, in store order
                (rows are then the flat vectors).
            candidates: candidate indices; rows come in the order given. Default: all
                complete candidates, sorted by index.

        Returns:
            A writable float32 CPU tensor of shape (n_selected, sum of the selected
            columns' numels). Only the selected columns are read from storage (column
            projection; memory-mapped when local), each copied once into its slice.

        Raises:
            IndexError: a requested candidate does not exist.
            ValueError: a candidate file is incomplete or does not match the store.
        """
        col_idx = self.resolve_columns(columns)
        targets = self._targets(candidates)
        sizes = [self._numels[j] for j in col_idx]
        starts = np.cumsum([0] + sizes).tolist()
        out = torch.empty((len(targets), starts[-1]), dtype=torch.float32)
        if not targets or not col_idx:
            return out
        out_np = out.numpy()
        fields = sorted(set(col_idx))
        row_bytes = 4 * sum(self._numels[j] for j in fields)
        for row, (index, path) in enumerate(targets):
            self._read_row(index, path, fields, col_idx, starts, out_np[row])
            self.bytes_read += row_bytes
        return out

    def _targets(self, candidates: Iterable[int] | None) -> list[tuple[int, str]]:
        """(index, path) of the selected candidates; all complete ones, sorted, for None."""
        if candidates is None:
            return [(c.index, c.path) for c in self.list_candidates()]
        if isinstance(candidates, int):
            raise TypeError("candidates must be a list of indices, not a single index")
        return [(i, self._candidate_path(i)) for i in (operator.index(c) for c in candidates)]

    @contextmanager
    def _reading(self, index: int, path: str) -> Iterator[None]:
        """Turn a missing file into IndexError and an unreadable one into ValueError."""
        try:
            yield
        except FileNotFoundError:
            raise IndexError(f"no candidate {index} in store {self.uri} ({path} does not exist)") from None
        except (pa.ArrowInvalid, pa.ArrowIOError) as exc:
            raise ValueError(f"candidate {index} in store {self.uri} is unreadable ({path}): {exc}") from exc

    def _read_row(self, index: int, path: str, fields: list[int], col_idx: list[int],
                  starts: list[int], dest: np.ndarray) -> None:
        with self._reading(index, path):
            with open_candidate(self._loc.fs, path, self._loc.is_local, included_fields=fields) as reader:
                if reader.num_record_batches != 1:
                    raise ValueError(f"candidate file {path}: expected 1 record batch, found {reader.num_record_batches}")
                batch = reader.get_batch(0)
                for k, j in enumerate(col_idx):
                    dest[starts[k]:starts[k + 1]] = column_values(batch, self._names[j], self._numels[j], path)

    def read_ranges(
        self,
        ranges: Ranges,
        candidates: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Read element ranges of every tensor of selected candidates, and nothing else.

        Args:
            ranges: per tensor (store order, length P) a flat element range ``[start, end)``
                within that tensor, ``0 <= start <= end <= numel``, or a list of increasing,
                non-overlapping ones; empty ranges read nothing, adjacent ones are merged.
            candidates: candidate indices; rows come in the order given. Default: all
                complete candidates, sorted by index.

        Returns:
            A writable float32 CPU tensor of shape (n_selected, sum of (end - start)): per
            candidate the ranges' values concatenated in store order. From each file only
            its message headers (about 80 bytes per tensor) and these ranges are read:
            slices of the memory map when local, one ranged read per (merged) range otherwise.

        Raises:
            IndexError: a requested candidate does not exist.
            ValueError: ``ranges`` do not fit the tensors, or a candidate file is
                incomplete or does not match the store.
        """
        ranges, width = self._checked_ranges(ranges)
        targets = self._targets(candidates)
        out = torch.empty((len(targets), width), dtype=torch.float32)
        out_np = out.numpy()
        for row, (index, path) in enumerate(targets):
            with self._reading(index, path):
                with open_source(self._loc.fs, path, self._loc.is_local) as source:
                    read_value_ranges(source, path, self._numels, ranges, out_np[row])
            self.bytes_read += 4 * width
        return out

    def read_flat(self, index: int) -> torch.Tensor:
        """Candidate ``index`` as a flat float32 vector of shape (D,), in ``names`` order."""
        return self.read(candidates=[index])[0]

    def read_candidate(self, index: int) -> dict[str, torch.Tensor]:
        """Candidate ``index`` as a dict name -> float32 tensor with the original shape.

        The tensors are views into one (D,) buffer (no extra copy).
        """
        flat = self.read_flat(index)
        return {
            n: flat[a:b].view(shape)
            for n, a, b, shape in zip(self._names, self._offsets[:-1], self._offsets[1:], self._shapes)
        }
