"""The TWA core: plain PyTorch, no Ray.

Public names:
- ``TWA``: trains averaging coefficients in a plain PyTorch loop (state_dict resumable).
- ``build_projection`` / ``Projection``: the packed low-bit projection and its kernels.
- ``build_basis``: center and basis of the candidates' subspace per block.
- ``make_blocks`` / ``shard_blocks``: granularity and the column shards of workers.
- ``quantize`` / ``pack_bits`` / ``unpack_bits``: b-bit quantisation with true packing.
- ``ParamLayout``, ``flatten_params``, ``assign_flat``: the parameter vector.
- ``apply_swa``, ``recalibrate_bn``: the SWA baseline and BatchNorm recalibration.
- ``best_individual``, ``uniform_soup``, ``greedy_soup``, ``weights_scorer``: model-soup baselines.
- ``ScheduleSpec``, ``lr_factor``, ``make_optimizer``: schedules and optimizers.
"""
from .baselines import apply_swa, has_batchnorm, recalibrate_bn, swa_vector
from .blocks import Blocks, ShardPlan, block_bytes, make_blocks, parse_granularity, plan_shards, shard_blocks
from .collectives import Collectives, LocalCollectives
from .params import ParamLayout, assign_flat, flatten_grads, flatten_params, flatten_state, unflatten
from .projection import Projection, build_projection
from .quant import BITS, check_bits, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from .schedules import OPTIMIZERS, SCHEDULES, ScheduleSpec, lr_factor, make_optimizer, make_scheduler
from .soups import Soup, best_individual, greedy_soup, individual_scores, uniform_soup, weights_scorer
from .subspace import BASES, build_basis, check_basis
from .twa import TWA

__all__ = [
    "BASES", "BITS", "Blocks", "Collectives", "LocalCollectives", "OPTIMIZERS", "ParamLayout",
    "Projection", "SCHEDULES", "ScheduleSpec", "ShardPlan", "TWA", "plan_shards", "apply_swa", "assign_flat", "block_bytes",
    "build_basis", "build_projection", "check_basis", "check_bits", "dequantize", "flatten_grads",
    "flatten_params", "flatten_state", "has_batchnorm", "lr_factor", "make_blocks",
    "make_optimizer", "make_scheduler", "pack_bits", "packed_bytes", "parse_granularity",
    "quantize", "recalibrate_bn", "shard_blocks", "swa_vector", "unflatten", "unpack_bits",
    "Soup", "best_individual", "greedy_soup", "individual_scores", "uniform_soup", "weights_scorer",
]
