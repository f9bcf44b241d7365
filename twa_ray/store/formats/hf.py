"""Hugging Face checkpoints: ``save_pretrained`` folders and the Trainer's ``checkpoint-*/``.

On disk (transformers 5.x; 4.x wrote the ``pytorch_model.bin`` forms by default), one of,
in the order transformers itself looks for them:

    model.safetensors                      all weights
    model.safetensors.index.json           sharded: {"metadata": ..., "weight_map": {key: shard
      model-00001-of-0000N.safetensors       file name}} and the shards beside it
    pytorch_model.bin                      torch.save of the state_dict (read weights_only=True)
    pytorch_model.bin.index.json           sharded, the same with pytorch_model-0000k-of-0000N.bin
      pytorch_model-00001-of-0000N.bin

plus ``config.json``, ``generation_config.json`` and, in a Trainer's ``checkpoint-<step>/``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``scaler.pt``, ``training_args.bin``
and ``trainer_state.json``: all ignored. Such a folder is one candidate; the Trainer's
``output_dir`` (``checkpoint-<step>/`` folders) gives one per checkpoint, in step order.

A key stored once for tied parameters (GPT-2's ``lm_head.weight``, tied to
``transformer.wte.weight``, is not written) is filled from its partner by
:func:`~twa_ray.store.formats.common.match_model`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .common import CheckpointError, CheckpointFile, read_safetensors, read_torch, unwrap_state_dict

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)  # transformers' order of preference
TRAINER_CHECKPOINT = "checkpoint-"  # the Trainer's checkpoint-<step> folders


def find_hf(folder: Path, entry: str) -> CheckpointFile | None:
    """The Hugging Face checkpoint that ``folder`` is (None: it holds none of WEIGHT_FILES)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file() or path.is_symlink():  # a dangling link: reading it names the path
            shards = tuple(folder / f for f in sorted(set(_weight_map(path).values()))) if name.endswith(".json") else ()
            return CheckpointFile(path, entry, "huggingface", (path, *shards) if shards else ())
    return None


def is_trainer_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a Trainer ``checkpoint-<step>/`` folder with weights."""
    return folder.name.startswith(TRAINER_CHECKPOINT) and folder.is_dir() and any(
        (folder / name).is_file() for name in WEIGHT_FILES)


def read_hf(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint :func:`find_hf` found (``path``: its weights or index file)."""
    if not path.name.endswith(".json"):
        return _read_weights(path)
    state: dict[str, torch.Tensor] = {}
    weight_map = _weight_map(path)
    for shard in sorted(set(weight_map.values())):
        for key, tensor in _read_weights(path.parent / shard).items():
            if weight_map.get(key) != shard:
                raise CheckpointError(f"{path.parent / shard}: key {key!r} is not listed for this shard in {path.name}"
                                      f" (it names {weight_map.get(key)!r})")
            state[key] = tensor
    missing = [key for key in weight_map if key not in state]
    if missing:
        raise CheckpointError(f"{path.parent / weight_map[missing[0]]}: key {missing[0]!r} is missing (listed there "
                              f"by {path.name})" + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return unwrap_state_dict(read_torch(path), str(path))


def _weight_map(index: Path) -> dict[str, str]:
    """{key: shard file name} of an index file; CheckpointError naming it if malformed, or if
    a shard is not a plain file name of the index's kind in its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: cannot read it as a Hugging Face index (JSON with a weight_map): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: its weight_map is not a non-empty {{key: shard file}} dict")
    suffix = ".safetensors" if index.name == SAFE_INDEX else ".bin"
    for key, shard in weight_map.items():
        if not (isinstance(key, str) and isinstance(shard, str) and shard.endswith(suffix)
                and shard == os.path.basename(shard) and shard not in ("", ".", "..") and "\\" not in shard):
            raise CheckpointError(f"{index}: key {key!r} names the shard {shard!r}: not a {suffix} file beside the "
                                  "index: refused")
    return weight_map
