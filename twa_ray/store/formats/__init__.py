"""Checkpoint formats the importer reads (``twa_ray.store.importers``), one module each:

- :mod:`.common`: plain ``torch.save`` files (``.pt``, ``.pth``, ``.bin``) and ``.safetensors``
  files holding a state_dict; what every format shares (errors, matching keys to the model);
- :mod:`.lightning`: Lightning ``.ckpt`` files;
- :mod:`.hf`: Hugging Face ``save_pretrained`` folders and the Trainer's ``checkpoint-*/``;
- :mod:`.dcp`: ``torch.distributed.checkpoint`` folders (sharded trainers, torchtitan).

Ray Train runs and Ray Tune experiments need Ray: :mod:`twa_ray.tune.ray_results`.
None of these imports Lightning, transformers or Ray.
"""
from .common import (CheckpointError, CheckpointFile, ModelKeys, UnsafeCheckpointError, find_prefix, match_model,
                     natural_key, read_safetensors, read_torch, unwrap_state_dict)

__all__ = ["CheckpointError", "CheckpointFile", "ModelKeys", "UnsafeCheckpointError", "find_prefix", "match_model",
           "natural_key", "read_safetensors", "read_torch", "unwrap_state_dict"]
