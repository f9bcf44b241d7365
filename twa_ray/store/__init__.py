"""Candidate store: candidate weight vectors as Arrow columns (no Ray import).

A store is a folder on any pyarrow filesystem (local path, ``file://``, ``s3://``...)
with ``store.json`` and one Arrow IPC file per candidate, one column per parameter
tensor. Workers read only the columns of their shard (column projection), or only their
element ranges of every tensor (``CandidateStore.read_ranges``).
"""

from .candidate_store import CandidateInfo, CandidateStore, candidate_file_name, parameter_mismatch
from .exporters import export_state_dict, save_state_dict, state_dict_from_vector
from .fs import ResolvedLocation, resolve
from .importers import CheckpointError, UnsafeCheckpointError, find_checkpoints, import_checkpoints, load_state_dict
from .write import rows_checksum

__all__ = ["CandidateStore", "CandidateInfo", "candidate_file_name", "parameter_mismatch", "ResolvedLocation", "resolve",
           "CheckpointError", "UnsafeCheckpointError", "find_checkpoints", "import_checkpoints", "load_state_dict",
           "export_state_dict", "save_state_dict", "state_dict_from_vector", "rows_checksum"]
