"""The candidate store: n candidate weight vectors w_1..w_n as Arrow columns.

Layout of a store directory (on any ``pyarrow.fs`` filesystem)::

    store.json                      metadata, written once (temp name + move)
    candidates/cand-000000.arrow    one Arrow IPC file per candidate (one row)
    candidates/cand-000001.arrow
    ...

Each candidate file has one column per trainable parameter tensor, named after the
parameter, of type ``fixed_size_list<float32>[numel]``; the candidate's info dict (epoch,
step, metrics, source, ...) is JSON in the schema metadata (key ``twa_ray.info``).

Throughout, D = sum of numels of all parameters ("flat vector" = the parameters
flattened and concatenated in ``names`` order, shape (D,)); n = number of candidates.
Columns are a shard unit: :meth:`CandidateStore.read` with a subset of columns reads only
those columns' bytes (Arrow column projection, memory-mapped when local). Element ranges
are the other (:mod:`.ranges`): :meth:`CandidateStore.read_ranges` reads only the given
ranges of every tensor (slices of the memory map locally, ranged reads on S3 and other
filesystems). Which columns or ranges a worker owns is its caller's business (e.g.
the row maths of ``twa_ray.core``).

Writes are atomic: a candidate is written under a temporary name and moved to its final
name when complete, so a reader lists and reads whole candidates only. On a local (or
network) filesystem several writers can also fill one candidate in pieces, each its
element ranges: one :meth:`CandidateStore.begin_candidate`, a
:meth:`CandidateStore.write_rows` per writer, then one :meth:`CandidateStore.commit_candidate`
once every writer is done.

The class is composed of its parts, one module each: :mod:`.metadata` (create, open, the
parameters, the list of candidates; :mod:`.schema` for ``store.json``), :mod:`.write`
(append, and the pending protocol for writing in pieces) and :mod:`.read` (columns and
element ranges).
"""

from __future__ import annotations

from .read import StoreReads
from .schema import STORE_FORMAT, STORE_FORMAT_VERSION, CandidateInfo, candidate_file_name, parameter_mismatch
from .write import StoreWrites

__all__ = ["CandidateStore", "CandidateInfo", "STORE_FORMAT", "STORE_FORMAT_VERSION", "candidate_file_name",
           "parameter_mismatch"]


class CandidateStore(StoreReads, StoreWrites):
    """Candidate weight vectors in Arrow IPC files, one column per parameter tensor.

    Create with :meth:`create` or open with :meth:`open`; do not call the constructor
    directly. Instances are picklable (they hold the pyarrow filesystem and metadata),
    so a store can be handed to Ray workers, each reading only its own columns.

    Attributes:
        bytes_read: payload bytes requested by :meth:`read`, :meth:`read_ranges`, :meth:`read_rows`
            (and the methods built on them) on this instance: selected values x candidates x 4.
            Footer and metadata reads are not counted. Reset it by assigning 0.
        bytes_written: bytes written by :meth:`begin_candidate` (headers and footer) and
            :meth:`write_rows` (values) on this instance. Reset it by assigning 0.
    """
