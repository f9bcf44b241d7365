"""The FSDP2 mode (``twa.sharding: fsdp``) in the capacity planner: memory per worker (and
collective traffic per step, :func:`planned_fsdp_traffic`).

Every rank's TWA shard is its FSDP2 shard of every parameter (:func:`twa_ray.core.fsdp_rows.fsdp_shard`,
as ``parallel.sharding.fsdp_tensors.fsdp_wrap`` places it): indices of dim 0, or of the first dim
k divides when k does not divide dim 0 (no padding), else dim 0. With k ranks, per worker r (bytes, float32):

- parameters and gradients: FSDP2 allocates the *padded* shard ``ceil(S_t/k) x numel_t / S_t``
  of every tensor t on every rank (S_t = the size of its shard dim; its sharded storage; the
  gradient is a view of the padded reduce-scatter output), 4 x sum_t of it each;
- TWA's flat gradient and weights of the shard: 2 x 4 x |S_r|, |S_r| = the rank's own
  elements of all tensors, unpadded;
- center: 4 x |S_r|;
- projection: n x sum over blocks l of ceil(m_lr * b / 8), m_lr = the rank's elements of
  block l (every block is cut by rows, so every rank holds a part of most blocks);
- scale/offset of the codes: 2 x 4 x n x L, b < 32 (a rank's projection covers all L blocks,
  ``core.row_shards``);
- coefficients X and their optimizer state: 4 x n x L x (1 + states), replicated;
- transient: FSDP's all-gather of the largest unit, 4 x k x its padded shards. A unit's
  backward holds its all-gathered weights, its unsharded gradients and FSDP's reduce-scatter
  input while it prefetches the next unit's weights: the peak is bounded by 4 x that
  all-gather on top of the persistent bytes (activations not counted).

Units (:func:`fsdp_units`), as ``parallel.sharding.fsdp_tensors.fsdp_wrap`` wraps them: one
``fully_shard`` per module that holds parameters of its own, then the root. The even share
is total/k, total = the same state on one worker (k = 1: no padding, nothing replicated).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ..core.blocks import make_blocks
from ..core.quant import packed_bytes
from ..core.fsdp_rows import fsdp_padded_numel, fsdp_shard

FLOAT = 4  # bytes of a float32
TRANSIENT_UNITS = 4  # all-gathered weights + unsharded gradients + reduce-scatter input + the prefetched next unit
ROOT_UNIT = ""


def fsdp_units(names: Sequence[str]) -> dict[str, list[int]]:
    """Group parameters into FSDP units: the unit of each -> tensor indices (layout order).

    A parameter's unit is the outermost module on its path that holds parameters of its own:
    ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3.mlp.up_proj``, but
    ``attn.out_proj.weight`` -> ``attn`` when ``attn`` holds ``attn.in_proj_weight`` (as
    nn.MultiheadAttention does); a parameter of the root module itself -> ``""``.
    ``fully_shard(model.get_submodule(key))`` for every other key, then ``fully_shard(model)``,
    builds these units (``parallel.sharding.fsdp_tensors.fsdp_wrap``).
    """
    holders = {name.rsplit(".", 1)[0] for name in names if "." in name}

    def unit_of(name: str) -> str:
        if "." not in name:
            return ROOT_UNIT
        parts = name.split(".")[:-1]
        return next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in holders)

    units: dict[str, list[int]] = {}
    for t, name in enumerate(names):
        units.setdefault(unit_of(name), []).append(t)
    return units


def fsdp_unit_sizes(names: Sequence[str], shapes: Sequence[Sequence[int]], k: int) -> dict[str, int]:
    """FSDP2's units as ``parallel.sharding.fsdp_tensors.fsdp_wrap`` makes them (:func:`fsdp_units`, in
    forward order; ``""`` = the root), each with the elements of its padded shard on every
    rank: sum over its tensors of ceil(R_t/k) C_t (its all-gather input, 1/k of its reduce-scatter input)."""
    return {key: sum(fsdp_padded_numel(shapes[t], k) for t in ts) for key, ts in fsdp_units(names).items()}


@dataclass
class FsdpPlan:
    """Memory per worker of the FSDP2 mode (bytes; lists are per rank)."""

    workers: int  # k
    coords_per_worker: list[int]  # |S_r|: the rank's part of every tensor, in elements
    padded_coords: int  # what FSDP2 allocates on every rank: sum_t fsdp_padded_numel(shape_t, k)
    parameter_bytes: int  # 4 x padded_coords
    gradient_bytes: int  # 4 x padded_coords
    twa_buffer_bytes: list[int]  # TWA's flat gradient and weights of the shard
    center_bytes: list[int]
    projection_bytes: list[int]
    quant_params_bytes: list[int]
    coefficient_bytes: int  # X and its optimizer state, on every rank
    total_bytes: list[int]  # persistent
    build_bytes: list[int]  # transient: the rank's rows of the candidates as float32
    num_units: int
    largest_unit: str  # its key ("" = the root unit)
    all_gather_bytes: int  # the largest unit's all-gathered (padded) weights
    transient_bytes: int  # bound: TRANSIENT_UNITS x all_gather_bytes
    peak_bytes: list[int]  # total + transient
    single_worker_bytes: int  # the same state on one worker: the even share is this / k
    largest_over_even_share: float  # max_r total_r / (single_worker_bytes / k)
    sharded_imbalance: float  # the same without the replicated coefficients and scale/offset

    def to_dict(self) -> dict:
        return asdict(self)


def _sharded(plan_bytes: dict, r: int) -> int:
    return (plan_bytes["parameter"] + plan_bytes["gradient"] + plan_bytes["twa"][r] + plan_bytes["center"][r]
            + plan_bytes["projection"][r])


def _memory(shapes: Sequence[Sequence[int]], candidates: int, bits: int, workers: int, granularity: str,
            states: int) -> dict:
    """Per-rank byte counts of the FSDP2 mode (see the module docstring)."""
    numels = [math.prod(s) for s in shapes]
    blocks = make_blocks(numels, granularity)
    n, k = candidates, workers
    padded = sum(fsdp_padded_numel(s, k) for s in shapes)
    coords, proj, quant = [], [], []
    for r in range(k):
        local = [fsdp_shard(s, r, k).numel for s in shapes]
        parts = [sum(local[t0:t1]) for t0, t1 in blocks.tensor_ranges]
        coords.append(sum(local))
        proj.append(n * sum(packed_bytes(m, bits) for m in parts))
        quant.append(0 if bits == 32 else 2 * FLOAT * n * len(parts))
    out = {
        "parameter": FLOAT * padded, "gradient": FLOAT * padded, "coords": coords, "padded": padded,
        "twa": [2 * FLOAT * c for c in coords], "center": [FLOAT * c for c in coords], "projection": proj,
        "quant": quant, "coefficient": FLOAT * n * len(blocks) * (1 + states),
    }
    out["total"] = [_sharded(out, r) + quant[r] + out["coefficient"] for r in range(k)]
    return out


def plan_fsdp(
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    candidates: int,
    bits: int,
    workers: int,
    granularity: str = "tensor",
    *,
    optimizer: str = "sgd",
) -> FsdpPlan:
    """The FSDP2 mode's memory per worker for parameters ``names`` of ``shapes`` (layout order).

    Raises:
        ValueError: a parameter is 0-d (FSDP2 cannot shard it), or bad arguments.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for name, shape in zip(names, shapes):
        if len(shape) == 0:
            raise ValueError(f"parameter {name!r} is 0-d: FSDP2 shards along a dim and rejects it")
    states = 2 if optimizer == "adamw" else 1
    mem = _memory(shapes, candidates, bits, workers, granularity, states)
    single = _memory(shapes, candidates, bits, 1, granularity, states)
    k = workers
    units = fsdp_unit_sizes(names, shapes, k)
    unit_bytes = {key: FLOAT * k * m for key, m in units.items()}
    largest = max(unit_bytes, key=lambda key: unit_bytes[key])
    transient = TRANSIENT_UNITS * unit_bytes[largest]
    even = single["total"][0] / k
    even_sharded = _sharded(single, 0) / k
    return FsdpPlan(
        workers=k, coords_per_worker=mem["coords"], padded_coords=mem["padded"],
        parameter_bytes=mem["parameter"], gradient_bytes=mem["gradient"], twa_buffer_bytes=mem["twa"],
        center_bytes=mem["center"], projection_bytes=mem["projection"], quant_params_bytes=mem["quant"],
        coefficient_bytes=mem["coefficient"], total_bytes=mem["total"],
        build_bytes=[FLOAT * candidates * c for c in mem["coords"]], num_units=len(units), largest_unit=largest,
        all_gather_bytes=unit_bytes[largest], transient_bytes=transient,
        peak_bytes=[t + transient for t in mem["total"]], single_worker_bytes=single["total"][0],
        largest_over_even_share=max(mem["total"]) / even,
        sharded_imbalance=max(_sharded(mem, r) for r in range(k)) / even_sharded,
    )


def wire_factor(op: str, k: int) -> float:
    """Bytes one of k ranks sends per byte it hands to ``op``, with ring algorithms: a
    reduce-scatter of an N-byte input sends (k-1)/k N, an all-gather of an N-byte slice
    (k-1) N, an all-reduce 2(k-1)/k N; a (pipelined) broadcast (k-1)/k N on average."""
    return {"reduce_scatter": (k - 1) / k, "all_gather": k - 1, "all_reduce": 2 * (k - 1) / k,
            "broadcast": (k - 1) / k}[op]


def planned_fsdp_traffic(names: Sequence[str], shapes: Sequence[Sequence[int]], candidates: int, bits: int, k: int,
                         granularity: str, grad_clip: bool = False) -> dict:
    """The FSDP2 mode's collective traffic per TWA step and worker, from :func:`plan_fsdp`.

    With P = ``plan_fsdp(...).padded_coords`` (sum_t ceil(R_t/k) C_t, the padded shard every
    rank holds) and P_root the root unit's part of it (0 when the root module holds no
    parameters of its own): all-gathers of 4 (2P - P_root) bytes (every unit in forward, all
    but the root again in backward), reduce-scatters of 4 k P, TWA's all-reduce of 4 n L
    (+ 8, the squared gradient norm as one float64, with ``grad_clip``); n = ``candidates``,
    L = the number of blocks of ``granularity``.

    Returns:
        {"payload": bytes handed to the collectives (int), "wire": bytes sent with ring
        algorithms (float, :func:`wire_factor`), "by_op": {"all_gather", "reduce_scatter",
        "all_reduce"} -> payload bytes, "calls": the same ops -> number of calls,
        "padded_coords": P (elements), "units": the number of FSDP units}.
    """
    plan = plan_fsdp(names, shapes, candidates, bits, k, granularity)
    units = fsdp_unit_sizes(names, shapes, k)
    padded, root = plan.padded_coords, units.get(ROOT_UNIT, 0)
    num_blocks = len(make_blocks([math.prod(s) for s in shapes], granularity))
    by_op = {"all_gather": FLOAT * (2 * padded - root), "reduce_scatter": FLOAT * k * padded,
             "all_reduce": FLOAT * candidates * num_blocks + (8 if grad_clip else 0)}
    calls = {"all_gather": 2 * len(units) - (ROOT_UNIT in units), "reduce_scatter": len(units),
             "all_reduce": 1 + bool(grad_clip)}
    return {"payload": sum(by_op.values()), "wire": sum(wire_factor(op, k) * b for op, b in by_op.items()),
            "by_op": by_op, "calls": calls, "padded_coords": padded, "units": len(units)}


IMBALANCE_WORKERS = (2, 4, 8)


def fsdp_imbalance(
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    candidates: int,
    bits: int,
    granularity: str = "tensor",
    *,
    optimizer: str = "sgd",
    workers: Sequence[int] = IMBALANCE_WORKERS,
) -> dict[int, float]:
    """k -> the largest worker's sharded state (model + gradients + TWA buffers + center +
    projection) over its even share, ``plan_fsdp(...).sharded_imbalance``, for each k of ``workers``."""
    return {k: plan_fsdp(names, shapes, candidates, bits, k, granularity, optimizer=optimizer).sharded_imbalance
            for k in workers}
