"""``torch.distributed.checkpoint`` (DCP) folders, as ``dcp.save`` writes them (sharded
trainers, torchtitan, our sharded runs' checkpoints), consolidated to the model's full tensors.

On disk, e.g. torchtitan's ``checkpoint/step-1000/``:

    .metadata          DCP's index (pickled): every key (the nested state's keys joined with
                       dots: "model.layers.0.attention.wq.weight", "optimizer.state..."), its
                       global shape and dtype, and where each shard's bytes are
    __0_0.distcp       the shards each rank wrote (rank 0's, rank 1's, ...)
    __1_0.distcp

The model's keys may sit at the top level (``dcp.save(model.state_dict())``) or under a key
("model", {"app": {"model": ...}}): the prefix is found by matching the model's parameter
names. Only the model's keys are read (an optimizer's state, a data loader's are not), each
whole, in one process, without a process group. Keys the model lacks are ignored.

``.metadata`` is read by the project's restricted reader
(:mod:`twa_ray.parallel.checkpoint_files`): it builds DCP's metadata classes only, checks that
every entry stays inside the folder, and a non-tensor value is refused; DCP's own reader would
unpickle it with plain ``pickle``. That module is imported on first use only.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .common import CheckpointError, CheckpointFile, ModelKeys, UnsafeCheckpointError, find_prefix

METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"


def find_dcp(folder: Path, entry: str) -> CheckpointFile | None:
    """The DCP checkpoint that ``folder`` is (None: it holds no ``.metadata``)."""
    if not (folder / METADATA).is_file():
        return None
    shards = sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX))
    return CheckpointFile(folder, entry, "dcp", (folder / METADATA, *shards))


def read_dcp(folder: Path, keys: ModelKeys) -> dict[str, torch.Tensor]:
    """{model key: full tensor} of the DCP checkpoint ``folder``: the keys under the model's
    prefix that the model has, in the checkpoint's dtypes, on CPU."""
    from torch.distributed.checkpoint.api import CheckpointException

    from ...parallel.checkpoint_files import _dcp_io, load_sharded

    try:
        stored = _dcp_io()[0](folder).read_metadata().state_dict_metadata
    except pickle.UnpicklingError as exc:  # the restricted reader's refusal says what the file "refers to"
        if "refers to" in str(exc):
            raise UnsafeCheckpointError(f"{folder}: refused: its {METADATA} is not plain DCP metadata ({exc}); "
                                        "nothing of it was run") from None
        raise CheckpointError(f"{folder}: cannot read its {METADATA} (unreadable, truncated or corrupt): {exc}") from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{folder}: cannot read it as a torch.distributed.checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    tensors = {key: meta for key, meta in stored.items() if hasattr(meta, "size") and hasattr(meta, "properties")}
    prefix = find_prefix(tensors, keys, str(folder))
    wanted = {prefix + name: torch.empty(tuple(tensors[prefix + name].size), dtype=tensors[prefix + name].properties.dtype)
              for name in keys.shapes if prefix + name in tensors}
    try:
        load_sharded(folder, wanted, no_dist=True)
    except (ValueError, RuntimeError, OSError, CheckpointException) as exc:  # the last: DCP's, a BaseException
        raise CheckpointError(f"{folder}: cannot read the model's tensors: {exc}") from exc
    return {key[len(prefix):]: tensor for key, tensor in wanted.items()}
