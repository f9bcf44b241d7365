"""Sharding modes: how the workers of a stage share the model (``train.sharding``,
``twa.sharding``), one class per mode behind ``SHARDING_MODES``.

    mode.py         ShardingMode: the contract both Ray Train loops call; ShardSetup
    blocks.py       BlocksMode: DDP replicas; TWA sharded by balanced ranges over an exchange
    fsdp.py         FSDPMode: FSDP2 row shards of everything; sharded checkpoints
    fsdp_tensors.py FSDP2 wrapping and the layout of its local shards
    fsdp_rows.py    TWA over a rank's rows (its projection, its shard of the center)
    candidates.py   base training's candidate writer (rank 0 decides); fsdp_candidates.py:
                    every rank writes its rows
"""
from __future__ import annotations

from .blocks import BlocksMode
from .fsdp import FSDPMode
from .mode import ShardingMode, ShardSetup

# the sharding value -> its mode's class
SHARDING_MODES: dict[str, type[ShardingMode]] = {cls.name: cls for cls in (BlocksMode, FSDPMode)}


def sharding_mode(name: str, key: str = "twa.sharding") -> ShardingMode:
    """The mode called ``name`` in the config key ``key`` (``twa.sharding``, ``train.sharding``);
    raises ValueError naming the key and the valid values for an unknown one."""
    if name not in SHARDING_MODES:
        raise ValueError(f"{key}: {name!r} is not one of {list(SHARDING_MODES)}")
    return SHARDING_MODES[name]()


__all__ = ["SHARDING_MODES", "ShardSetup", "ShardingMode", "sharding_mode"]
