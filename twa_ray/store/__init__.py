"""Candidate store: candidate weight vectors as Arrow columns (no Ray import).

A store is a folder on any pyarrow filesystem (local path, ``file://``, ``s3://``...)
with ``store.json`` and one Arrow IPC file per candidate, one column per parameter
tensor. Workers read only the columns of their shard (column projection), or with FSDP2
only their part of every tensor (element ranges, ``CandidateStore.read_fsdp_shard``).
"""

from .candidate_store import CandidateInfo, CandidateStore, candidate_file_name, parameter_mismatch
from .exporters import export_state_dict, save_state_dict, state_dict_from_vector
from .fs import ResolvedLocation, resolve
from .importers import CheckpointError, UnsafeCheckpointError, find_checkpoints, import_checkpoints, load_state_dict
from .rows import FsdpShard, fsdp_element_ranges, fsdp_padded_numel, fsdp_row_range, fsdp_shard, fsdp_shard_dim

__all__ = ["CandidateStore", "CandidateInfo", "candidate_file_name", "parameter_mismatch", "ResolvedLocation", "resolve",
           "CheckpointError", "UnsafeCheckpointError", "find_checkpoints", "import_checkpoints", "load_state_dict",
           "export_state_dict", "save_state_dict", "state_dict_from_vector",
           "fsdp_row_range", "fsdp_element_ranges", "fsdp_padded_numel", "FsdpShard", "fsdp_shard",
           "fsdp_shard_dim"]
