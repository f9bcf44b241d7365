"""Capacity planner: memory per worker and traffic per step of sharded TWA, before launching.

    python -m twa_ray plan --model resnet18 --candidates 20 --bits 4 --workers 2
    python -m twa_ray plan --model shapes.json --candidates 50 --bits 2 --workers 64

Two modes side by side: ``blocks`` (below: a full model replica per worker, a balanced range
of the flat vector per worker for the projection, cut through blocks) and ``fsdp`` (``twa_ray.planner.fsdp``: everything cut by FSDP2's
shards of every tensor, about total/k per worker plus FSDP's transient all-gather of one unit;
its imbalance is printed for k = 2, 4 and 8 too).

Numbers come from the model's real parameter shapes (built on the meta device: no
memory, no weights; or read from a JSON file ``{name: shape}``) and the functions the runtime uses: ``make_blocks`` and
``plan_ranges(...).shard_bytes`` for the projection, the padded ranges of the exchanges
(``parallel.exchanges``) for traffic. ``tests/planner/test_planner.py`` checks both against a run.

Memory per worker (bytes):
- projection: n x sum over its (parts of) blocks of ceil(m_l * b / 8) (b-bit codes, truly packed);
- scale/offset of the codes: 2 x n x L_r float32 (b < 32), L_r the blocks it holds a part of;
- center: its coordinates |S_r| x 4;
- model: the full replica's parameters D x 4, their gradients D x 4, and TWA's flat
  gradient and weight vectors 2 x D x 4 (activations and BatchNorm buffers not counted);
- building the shard reads its columns of the candidates once: n x |S_r| x 4 (transient).

Traffic per step and worker, two ways:
- payload: bytes handed to collectives (what an exchange's ``bytes_sent`` counts, ``sharded``):
  reduce-scatter of the padded gradient k x pad x 4, all-reduce of the n x L coefficient
  gradient, all-gather of the padded own slice pad x 4 (pad = the longest range);
- wire: bytes each worker sends with bandwidth-optimal (ring) algorithms: reduce-scatter
  and all-gather of N bytes send (k-1)/k N each, an all-reduce 2(k-1)/k N.
Both are compared with one all-reduce of D float32 values and with the paper's scheme
(a data-parallel gradient all-reduce plus a full parameter all-reduce: two of them).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..core.blocks import make_blocks, plan_ranges
from ..core.quant import check_bits, packed_bytes
from .fsdp import FsdpPlan, fsdp_imbalance, plan_fsdp, wire_factor
from .shapes import is_shapes_file, load_shapes

# dataset -> (num_classes, in_channels, image_size) as the data loaders produce them
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (10, 1, 28),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
}
FLOAT = 4  # bytes of a float32


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} TiB"  # unreachable


def dataset_shape(name: str) -> tuple[int, int, int]:
    if name not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASET_SHAPES))}")
    return DATASET_SHAPES[name]


def model_shapes(model: str, dataset: str = "cifar10", **kwargs) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names and shapes of the trainable parameters of ``model`` (layout order).

    ``model`` is a ``twa_ray.models`` name or ``tv:<torchvision name>``, built on the meta
    device (shapes only, no memory and no weights), or a JSON file ``{name: shape}``
    (``twa_ray.planner.shapes.load_shapes``; ``dataset`` and ``kwargs`` then do not apply).
    """
    if is_shapes_file(model):
        return load_shapes(model)
    import torch

    from ..core.params import ParamLayout
    from ..models import build_model

    num_classes, in_channels, image_size = dataset_shape(dataset)
    with torch.device("meta"):
        net = build_model(model, num_classes, in_channels, image_size, **kwargs)
    layout = ParamLayout.from_model(net)
    return list(layout.names), [tuple(s) for s in layout.shapes]


def model_numels(model: str, dataset: str = "cifar10", **kwargs) -> tuple[list[str], list[int]]:
    """Names and element counts of the trainable parameters of ``model`` (layout order)."""
    names, shapes = model_shapes(model, dataset, **kwargs)
    return names, [math.prod(s) for s in shapes]


@dataclass
class CapacityPlan:
    """Memory per worker and traffic per step for one setting (all sizes in bytes)."""

    model: str | None
    dataset: str | None
    num_params: int  # D
    num_tensors: int
    granularity: str
    num_blocks: int  # L
    candidates: int  # n
    bits: int
    workers: int  # k
    grad_clip: bool
    # per worker
    blocks_per_worker: list[tuple[int, int]]
    coords_per_worker: list[int]
    projection_bytes: list[int]
    quant_params_bytes: list[int]
    center_bytes: list[int]
    model_bytes: int  # the full replica's parameters
    gradient_bytes: int  # the parameters' .grad
    twa_buffer_bytes: int  # TWA's flat gradient and weights
    coefficient_bytes: int  # X and its optimizer state (SGD momentum / AdamW: 2 moments)
    total_bytes: list[int]
    build_bytes: list[int]  # transient: the shard's candidate columns as float32
    # projection against its ideal and the paper's storage
    projection_total_bytes: int
    ideal_projection_bytes: float  # n * D * b / 8
    paper_projection_bytes: int  # one byte per value for b < 32 (4 for b = 32)
    max_over_even_share: float  # max_r projection_r / (total / k)
    # traffic per step and worker
    padded_length: int
    payload: dict = field(default_factory=dict)
    wire: dict = field(default_factory=dict)
    # the whole state on one worker (mode-independent); the even share is this / k
    single_worker_bytes: int = 0
    largest_over_even_share: float = 0.0  # max_r total_r / (single_worker_bytes / k)
    fsdp: FsdpPlan | None = None  # the FSDP2 mode; None without parameter shapes or when impossible
    fsdp_unavailable: str | None = None  # why ``fsdp`` is None
    fsdp_imbalance: dict = field(default_factory=dict)  # k -> the fsdp sharded state's largest / (total/k), k = 2, 4, 8

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format(self) -> str:
        """A human-readable report."""
        mb = human_bytes
        head = (self.model + (f" on {self.dataset}" if self.dataset else "")) if self.model else "parameter layout"
        lines = [
            f"TWA capacity plan: {head}",
            f"  parameters D = {self.num_params:,} in {self.num_tensors} tensors; granularity {self.granularity!r} "
            f"-> L = {self.num_blocks} blocks",
            f"  n = {self.candidates} candidates, {self.bits} bits, k = {self.workers} worker(s)",
            "",
            "memory per worker (twa.sharding: blocks):",
            f"  {'worker':>6}  {'blocks':>9}  {'coords':>12}  {'projection':>12}  {'scale/off':>10}  {'center':>10}  "
            f"{'model+grads':>12}  {'total':>12}  {'build (transient)':>17}",
        ]
        model_part = self.model_bytes + self.gradient_bytes + self.twa_buffer_bytes + self.coefficient_bytes
        for r in range(self.workers):
            l0, l1 = self.blocks_per_worker[r]
            lines.append(
                f"  {r:>6}  {f'{l0}-{l1 - 1}':>9}  {self.coords_per_worker[r]:>12,}  {mb(self.projection_bytes[r]):>12}  "
                f"{mb(self.quant_params_bytes[r]):>10}  {mb(self.center_bytes[r]):>10}  {mb(model_part):>12}  "
                f"{mb(self.total_bytes[r]):>12}  {mb(self.build_bytes[r]):>17}"
            )
        lines += [
            f"  model+grads = parameters {mb(self.model_bytes)} + gradients {mb(self.gradient_bytes)} + TWA flat "
            f"gradient/weights {mb(self.twa_buffer_bytes)} + coefficients {mb(self.coefficient_bytes)} "
            "(activations not included)",
            f"  projection: {mb(self.projection_total_bytes)} in all = {self.projection_total_bytes / self.ideal_projection_bytes:.4f}"
            f" x n*D*b/8, {self.projection_total_bytes / self.paper_projection_bytes:.3f} x the paper's one byte per value; "
            f"largest worker {self.max_over_even_share:.3f} x total/k",
            "",
            "traffic per step and worker (twa.exchange: sharded, NCCL's default; gloo's default, ring, sends "
            "the same ranges unpadded; all_reduce sends two all-reduces of D):",
        ]
        if self.workers == 1:
            lines.append("  none (one worker: the collectives are identities)")
        else:
            p, w = self.payload, self.wire
            lines += [
                f"  payload handed to collectives: reduce-scatter {mb(p['reduce_scatter'])} + all-reduce of X's gradient "
                f"{mb(p['coef_all_reduce'])} + all-gather {mb(p['all_gather'])}"
                + (f" + clip norm {p['clip_norm']} B" if self.grad_clip else "")
                + f" = {mb(p['total'])}",
                f"    = {p['ratio_to_all_reduce']:.3f} x one all-reduce of D floats ({mb(p['one_all_reduce'])}); "
                f"the paper's scheme: {mb(p['paper'])} = {p['paper_ratio_to_all_reduce']:.3f} x",
                f"  sent on the wire (ring algorithms): {mb(w['total'])} = {w['ratio_to_all_reduce']:.3f} x one all-reduce "
                f"of D ({mb(w['one_all_reduce'])}); the paper's scheme {w['paper_ratio_to_all_reduce']:.3f} x",
                f"  padding: every worker's slice is padded to {self.padded_length:,} coordinates "
                f"({self.workers * self.padded_length / self.num_params:.3f} x D in the reduce-scatter/all-gather)",
            ]
        lines += ["", *self._format_modes()]
        return "\n".join(lines)

    def _format_modes(self) -> list[str]:
        """The two modes side by side: the largest worker's bytes, part by part."""
        mb = human_bytes
        head = f"twa.sharding: blocks vs fsdp, per worker (the largest; k = {self.workers}):"
        if self.fsdp is None:
            return [head, f"  fsdp: {self.fsdp_unavailable}"]
        f = self.fsdp
        model_part = self.model_bytes + self.gradient_bytes
        rows = [
            ("parameters + gradients", mb(model_part), mb(f.parameter_bytes + f.gradient_bytes)),
            ("TWA flat gradient/weights", mb(self.twa_buffer_bytes), mb(max(f.twa_buffer_bytes))),
            ("center", mb(max(self.center_bytes)), mb(max(f.center_bytes))),
            ("projection", mb(max(self.projection_bytes)), mb(max(f.projection_bytes))),
            ("scale/offset", mb(max(self.quant_params_bytes)), mb(max(f.quant_params_bytes))),
            ("coefficients + optimizer", mb(self.coefficient_bytes), mb(f.coefficient_bytes)),
            ("persistent", mb(max(self.total_bytes)), mb(max(f.total_bytes))),
            ("  / (total/k)", f"{self.largest_over_even_share:.4f}", f"{f.largest_over_even_share:.4f}"),
            ("transient (bound)", "0 B", mb(f.transient_bytes)),
            ("peak", mb(max(self.total_bytes)), mb(max(f.peak_bytes))),
            ("build (transient read)", mb(max(self.build_bytes)), mb(max(f.build_bytes))),
        ]
        lines = [head, f"  {'':<26}  {'blocks':>12}  {'fsdp':>12}"]
        lines += [f"  {name:<26}  {a:>12}  {b:>12}" for name, a, b in rows]
        unit = repr(f.largest_unit) if f.largest_unit else "the root unit"
        lines += [
            f"  total = the same state on one worker: {mb(self.single_worker_bytes)}; total/k = "
            f"{mb(self.single_worker_bytes / self.workers)}",
            f"  fsdp: sharded state (all but the replicated coefficients and scale/offset) "
            f"{f.sharded_imbalance:.4f} x its even share; FSDP2 pads a tensor only where k divides none of its "
            f"dims ({f.padded_coords:,} coordinates allocated per rank, the largest rank owns "
            f"{max(f.coords_per_worker):,})",
            "  fsdp: sharded state's largest / (total/k) at "
            + ", ".join(f"k = {k}: {v:.4f}" for k, v in self.fsdp_imbalance.items()),
            f"  fsdp transient: all-gather of the largest of {f.num_units} units ({unit}) = {mb(f.all_gather_bytes)}; "
            f"bound {mb(f.transient_bytes)} = 4 x (its weights, unsharded gradients, reduce-scatter input, "
            "the prefetched next unit); activations not included",
        ]
        return lines


def plan_capacity(
    numels: Sequence[int],
    candidates: int,
    bits: int,
    workers: int,
    granularity: str = "tensor",
    *,
    grad_clip: bool = False,
    optimizer: str = "sgd",
    model: str | None = None,
    dataset: str | None = None,
    names: Sequence[str] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> CapacityPlan:
    """The plan for parameter tensors of sizes ``numels`` (layout order).

    With ``shapes`` (and ``names``, for FSDP's units) the FSDP2 mode is planned too.
    """
    check_bits(bits)
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    blocks = make_blocks(numels, granularity)
    plan = plan_ranges(blocks, bits, workers)  # raises ValueError naming the fix when k > D
    d, n, k, nblocks = sum(numels), candidates, workers, len(blocks)
    coords = [e - s for s, e in plan.ranges]
    proj = plan.shard_bytes(blocks, bits, n)
    quant = [0 if bits == 32 else 2 * FLOAT * n * (l1 - l0) for l0, l1 in plan.block_runs]
    center = [FLOAT * c for c in coords]
    model_bytes = gradient_bytes = FLOAT * d
    twa_buffers = 2 * FLOAT * d
    states = 2 if optimizer == "adamw" else 1
    coefficient_bytes = FLOAT * n * nblocks * (1 + states)
    total = [p + q + c + model_bytes + gradient_bytes + twa_buffers + coefficient_bytes
             for p, q, c in zip(proj, quant, center)]
    total_proj = sum(proj)
    pad = max(coords)
    # the same state on one worker: whole blocks (the ranges' cut blocks add a byte per cut and candidate)
    single_proj = n * sum(packed_bytes(m, bits) for m in blocks.sizes)
    single_quant = 0 if bits == 32 else 2 * FLOAT * n * nblocks
    single = single_proj + single_quant + FLOAT * d + model_bytes + gradient_bytes + twa_buffers + coefficient_bytes
    fsdp, fsdp_unavailable, imbalance = None, None, {}
    if shapes is None:
        fsdp_unavailable = "needs the parameters' shapes"
    else:
        if [math.prod(s) for s in shapes] != list(numels):
            raise ValueError("shapes do not match numels")
        names = list(names) if names is not None else [f"p{t}" for t in range(len(shapes))]
        try:
            fsdp = plan_fsdp(names, shapes, n, bits, k, granularity, optimizer=optimizer)
            imbalance = fsdp_imbalance(names, shapes, n, bits, granularity, optimizer=optimizer)
        except ValueError as exc:  # a 0-d parameter
            fsdp_unavailable = str(exc)

    one_ar_payload = FLOAT * d
    payload: dict = {"one_all_reduce": one_ar_payload}
    wire: dict = {"one_all_reduce": wire_factor("all_reduce", k) * one_ar_payload}
    if k == 1:
        payload.update(reduce_scatter=0, coef_all_reduce=0, all_gather=0, clip_norm=0, total=0)
        wire.update(reduce_scatter=0.0, coef_all_reduce=0.0, all_gather=0.0, clip_norm=0.0, total=0.0)
        payload.update(paper=0, ratio_to_all_reduce=0.0, paper_ratio_to_all_reduce=0.0)
        wire.update(paper=0.0, ratio_to_all_reduce=0.0, paper_ratio_to_all_reduce=0.0)
    else:
        clip = 8 if grad_clip else 0  # the gradient norm, one float64
        payload.update(
            reduce_scatter=FLOAT * k * pad, coef_all_reduce=FLOAT * n * nblocks, all_gather=FLOAT * pad, clip_norm=clip,
        )
        payload["total"] = sum(payload[key] for key in ("reduce_scatter", "coef_all_reduce", "all_gather", "clip_norm"))
        payload["paper"] = 2 * FLOAT * d
        ops = {"reduce_scatter": "reduce_scatter", "coef_all_reduce": "all_reduce", "all_gather": "all_gather",
               "clip_norm": "all_reduce"}
        wire.update({key: wire_factor(op, k) * payload[key] for key, op in ops.items()})
        wire["total"] = sum(wire[key] for key in ("reduce_scatter", "coef_all_reduce", "all_gather", "clip_norm"))
        wire["paper"] = 2 * wire["one_all_reduce"]
        for part in (payload, wire):
            part["ratio_to_all_reduce"] = part["total"] / part["one_all_reduce"]
            part["paper_ratio_to_all_reduce"] = part["paper"] / part["one_all_reduce"]
    return CapacityPlan(
        model=model, dataset=dataset, num_params=d, num_tensors=len(numels), granularity=granularity,
        num_blocks=nblocks, candidates=n, bits=bits, workers=k, grad_clip=grad_clip,
        blocks_per_worker=[tuple(r) for r in plan.block_runs], coords_per_worker=coords,
        projection_bytes=proj, quant_params_bytes=quant, center_bytes=center, model_bytes=model_bytes,
        gradient_bytes=gradient_bytes, twa_buffer_bytes=twa_buffers, coefficient_bytes=coefficient_bytes,
        total_bytes=total, build_bytes=[FLOAT * n * c for c in coords], projection_total_bytes=total_proj,
        ideal_projection_bytes=n * d * bits / 8, paper_projection_bytes=n * d * (FLOAT if bits == 32 else 1),
        max_over_even_share=max(proj) / (total_proj / k) if total_proj else 1.0,
        padded_length=pad, payload=payload, wire=wire, single_worker_bytes=single,
        largest_over_even_share=max(total) / (single / k), fsdp=fsdp, fsdp_unavailable=fsdp_unavailable,
        fsdp_imbalance=imbalance,
    )


def plan_for_model(
    model: str,
    candidates: int,
    bits: int,
    workers: int,
    granularity: str = "tensor",
    dataset: str = "cifar10",
    *,
    grad_clip: bool = False,
    optimizer: str = "sgd",
    **model_kwargs,
) -> CapacityPlan:
    """``plan_capacity`` for model ``model`` shaped for ``dataset``, or given by a JSON shapes file."""
    names, shapes = model_shapes(model, dataset, **model_kwargs)
    return plan_capacity(
        [math.prod(s) for s in shapes], candidates, bits, workers, granularity, grad_clip=grad_clip,
        optimizer=optimizer, model=model, dataset=None if is_shapes_file(model) else dataset,
        names=names, shapes=shapes,
    )
