"""k TWA workers as local processes on gloo (127.0.0.1): no Ray, the library's builders.

``run_workers(setting, k)`` writes the candidates to a candidate store and spawns k processes
(torch.multiprocessing); each builds its column shard of the projection the way the runtime
does (``parallel.sharding``'s ``BlocksMode.build_twa``: its blocks' columns of the store ->
packed Q shard -> ``TWA`` over the ``sharded`` exchange, ``parallel.exchanges``), runs a few
steps on its slice of a fixed global batch and reports per-step collective traffic (counted by
wrapping ``torch.distributed``'s functions, ``DistCounter``), step times and its projection
bytes. With ``reference=True`` it also runs the paper's row-sharded scheme (gradient
all-reduce + full parameter all-reduce) on the same candidates and checks that both reach
the same weights.

``run_workers(setting, k, "fsdp")`` runs the ``twa.sharding: fsdp`` mode on the same
candidates: the model wrapped and TWA built by ``FSDPMode``, every collective counted by
``DistCounter`` (FSDP2's all-gathers and reduce-scatters, TWA's all-reduce).

``time_collectives(timing, k)`` spawns k processes that only time collectives, on gloo
or NCCL (one GPU per rank): one TWA step's calls through each exchange class (shapes
from the model's shard plan) and the calls FSDP2 makes in one step of the fsdp mode
(per unit, padded shards), against one all-reduce of D floats, and the alternatives
(all-reduce + local slice for the reduce-scatter, bucketed all-reduces), interleaved
round by round.

``time_sharding_steps(setting, k)`` times whole TWA steps (forward, backward, ``twa.step()``)
of both modes, built by the runtime's builders from one store, interleaved round by round.
"""
from __future__ import annotations

import functools
import inspect
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from twa_ray.planner.fsdp import fsdp_unit_sizes, wire_factor


@dataclass
class ModelSetting:
    """The model and projection both distributed benchmarks time."""

    model: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    candidates: int = 20
    bits: int = 4
    granularity: str = "tensor"
    in_channels: int = 3
    model_kwargs: dict = field(default_factory=dict)  # the model's constructor arguments

    def build(self) -> nn.Module:
        from twa_ray.models import build_model

        return build_model(self.model, self.num_classes, self.in_channels, self.image_size, **self.model_kwargs)


SHARDINGS = ("blocks", "fsdp")  # twa.sharding


@dataclass
class Setting(ModelSetting):
    global_batch: int = 64
    steps: int = 3
    warmup_steps: int = 1
    threads: int = 1
    reference: bool = False  # also run the paper's scheme (blocks)
    lr: float = 0.05
    grad_clip: float | None = None  # TWA clips the gradient's global norm (one more all-reduce, of a scalar)

    def twa_config(self, sharding: str, exchange: str = "auto"):
        """The TWA settings both modes are built with (``sharding_mode(sharding).build_twa``)."""
        from twa_ray.config import TWAConfig

        return TWAConfig(sharding=sharding, bits=self.bits, granularity=self.granularity, basis="normalized",
                         lr=self.lr, momentum=0.9, schedule="constant", grad_clip=self.grad_clip, exchange=exchange)


def _totals(calls: list[tuple[str, int, float]]) -> dict:
    """Sums of (op, payload bytes, wire bytes) calls: payload, wire, and per op payload and calls."""
    out: dict = {"payload": 0, "wire": 0.0, "by_op": {}, "calls": {}}
    for op, payload, wire in calls:
        out["payload"] += payload
        out["wire"] += wire
        out["by_op"][op] = out["by_op"].get(op, 0) + payload
        out["calls"][op] = out["calls"].get(op, 0) + 1
    return out


class DistCounter:
    """Counts the collectives any code issues through ``torch.distributed`` (FSDP2's own calls
    included): inside ``with counter:`` its functions are wrapped, and while ``counting`` is
    set each call is recorded as (op, bytes of its input, ring wire bytes). Calls that one
    wrapped function makes through another count once."""

    # torch.distributed function -> (op, the argument holding the bytes handed over)
    FUNCTIONS = {
        "all_gather_single": ("all_gather", "input_tensor"),
        "all_gather_into_tensor": ("all_gather", "input_tensor"),
        "reduce_scatter_single": ("reduce_scatter", "input"),
        "reduce_scatter_tensor": ("reduce_scatter", "input"),
        "all_reduce": ("all_reduce", "tensor"),
        "broadcast": ("broadcast", "tensor"),
    }

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.counting = False
        self.calls: list[tuple[str, int, float]] = []
        self._saved: dict[str, Callable] = {}
        self._depth = 0

    def __enter__(self) -> "DistCounter":
        for name, (op, arg) in self.FUNCTIONS.items():
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(self._saved[name], op, arg))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def _wrap(self, fn: Callable, op: str, arg: str) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.counting and self._depth == 0:
                t = signature.bind(*args, **kwargs).arguments[arg]
                payload = t.numel() * t.element_size()
                self.calls.append((op, payload, wire_factor(op, self.world_size) * payload))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def totals(self) -> dict:
        return _totals(self.calls)


class CountingCollectives:
    """Wraps an exchange (``parallel.exchanges``): per call, the payload it counted and the ring wire bytes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rank, self.world_size, self.ranges = inner.rank, inner.world_size, inner.ranges
        self.calls: list[tuple[str, int, float]] = []  # (op, payload bytes, wire bytes)

    def _record(self, op: str, before: int, wire_factor: float) -> None:
        payload = self.inner.bytes_sent - before
        self.calls.append((op, payload, wire_factor * payload))

    def reduce_scatter_sum(self, flat):
        before = self.inner.bytes_sent
        out = self.inner.reduce_scatter_sum(flat)
        self._record("reduce_scatter", before, wire_factor("reduce_scatter", self.world_size))
        return out

    def all_reduce_sum(self, t):
        before = self.inner.bytes_sent
        out = self.inner.all_reduce_sum(t)
        self._record("all_reduce", before, wire_factor("all_reduce", self.world_size))
        return out

    def all_gather(self, own, out):
        before = self.inner.bytes_sent
        res = self.inner.all_gather(own, out)
        self._record("all_gather", before, wire_factor("all_gather", self.world_size))
        return res

    def totals(self) -> dict:
        return _totals(self.calls)


def _candidate_columns(base: torch.Tensor, numels, t0: int, t1: int, rows, n: int) -> torch.Tensor:
    """Candidates (len(rows), coords of tensors t0..t1-1): base + noise, the same on every rank."""
    offsets = [0]
    for m in numels:
        offsets.append(offsets[-1] + m)
    parts = []
    for t in range(t0, t1):
        gen = torch.Generator().manual_seed(1000 + t)  # per tensor: any column split sees the same values
        noise = torch.randn(n, numels[t], generator=gen)
        scale = 0.01 * (1 + torch.arange(n, dtype=torch.float32)[:, None] / n)
        parts.append(base[offsets[t] : offsets[t + 1]] + scale[rows] * noise[rows])
    return torch.cat(parts, dim=1)


def _batch(setting: Setting, rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(setting.global_batch, setting.in_channels, setting.image_size, setting.image_size, generator=gen)
    y = torch.randint(0, setting.num_classes, (setting.global_batch,), generator=gen)
    idx = list(range(rank, setting.global_batch, k))
    return x[idx], y[idx], len(idx) / setting.global_batch


def _loss_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, share: float) -> None:
    """Back-propagate this rank's share of the global batch's mean loss (the ranks' sum)."""
    net.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(net(x), y) * share).backward()


def _timed_step(model: nn.Module, twa, x: torch.Tensor, y: torch.Tensor, share: float) -> tuple[float, float]:
    """One TWA step (forward, backward, ``twa.step()``): its seconds, and those of ``twa.step()``."""
    t = time.perf_counter()
    _loss_backward(model, x, y, share)
    u = time.perf_counter()
    twa.step()
    end = time.perf_counter()
    return end - t, end - u


def _worker(rank: int, k: int, setting: Setting, store_uri: str, out_dir: str) -> None:
    """The blocks mode as the runtime builds it (``BlocksMode.build_twa`` on the store's
    candidates, over the ``sharded`` exchange), every collective of its steps counted through
    ``torch.distributed`` (``DistCounter``); with ``setting.reference`` the paper's scheme too."""
    from twa_ray.core import flatten_params
    from twa_ray.core.collectives import padded_length
    from twa_ray.core.params import ParamLayout, assign_flat, flatten_grads
    from twa_ray.core.projection import build_projection
    from twa_ray.parallel.exchanges import ShardedExchange
    from twa_ray.parallel.sharding import sharding_mode
    from twa_ray.store import CandidateStore

    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    model = setting.build().train()
    layout = ParamLayout.from_model(model)
    base = flatten_params(model)
    n, numels = setting.candidates, layout.numels
    # the center (D,), computed as the reference computes it, so both quantise the same directions
    center = torch.cat([
        _candidate_columns(base, numels, t, t + 1, list(range(n)), n).mean(dim=0) for t in range(len(numels))
    ])
    x, y, share = _batch(setting, rank, k)

    # ---- our scheme: column shards, over the sharded exchange (whose collectives DistCounter sees)
    store = CandidateStore.open(store_uri)
    started = time.perf_counter()
    setup = sharding_mode("blocks").build_twa(model, store, store.candidate_indices(),
                                              setting.twa_config("blocks", exchange="sharded"),
                                              setting.warmup_steps + setting.steps, rank, k, center=center.clone())
    build_s = time.perf_counter() - started
    twa, blocks, plan = setup.twa, setup.blocks, setup.plan
    torch.manual_seed(100 + rank)  # dropout masks: the reference scheme replays the same ones
    first_w = None
    for _ in range(setting.warmup_steps):
        _loss_backward(model, x, y, share)
        twa.step()
        if first_w is None:
            first_w = flatten_params(model)
    counter = DistCounter(k)
    step_s, update_s = [], []
    with counter:
        for _ in range(setting.steps):
            dist.barrier()
            counter.counting = True
            step, update = _timed_step(model, twa, x, y, share)
            counter.counting = False
            step_s.append(step)
            update_s.append(update)
    ours = counter.totals()
    result = {
        "rank": rank, "world_size": k, "num_params": layout.num_params, "num_blocks": len(blocks),
        "coords": plan.ranges[rank][1] - plan.ranges[rank][0], "padded_length": padded_length(plan.ranges),
        "projection_bytes": twa.projection.nbytes,
        "planned_projection_bytes": plan.shard_bytes(blocks, setting.bits, n)[rank],
        "build_s": build_s, "step_s": statistics.median(step_s), "twa_update_s": statistics.median(update_s),
        "payload_per_step": ours["payload"] / setting.steps, "wire_per_step": ours["wire"] / setting.steps,
        "payload_by_op_per_step": {op: b / setting.steps for op, b in ours["by_op"].items()},
    }
    ours_w = flatten_params(model)

    # ---- the paper's scheme: candidate rows sharded, gradient + parameter all-reduce
    if setting.reference:
        ref_model = setting.build().train()
        ref_model.load_state_dict(model.state_dict())
        rows = list(range(rank, n, k))
        mine = _candidate_columns(base, numels, 0, len(numels), rows, n)
        ref_proj = build_projection(mine, blocks.sizes, "normalized", setting.bits, center=center.clone())
        del mine
        ref_proj.center = torch.zeros_like(center)  # reconstruct -> this rank's part sum_i X_i Q_i
        ref_comm = CountingCollectives(ShardedExchange(plan.ranges, rank, k))  # its all-reduces only
        xr = torch.zeros(len(rows), len(blocks), requires_grad=True)
        opt = torch.optim.SGD([xr], lr=setting.lr, momentum=0.9)
        grad_buf = torch.empty(layout.num_params)
        assign_flat(ref_model, center)
        # same steps as ours: warm-up + timed, with the same random state
        torch.manual_seed(100 + rank)
        ref_steps = []
        for i in range(setting.warmup_steps + setting.steps):
            if i == setting.warmup_steps:
                ref_comm.calls.clear()
            dist.barrier()
            t = time.perf_counter()
            _loss_backward(ref_model, x, y, share)
            g = ref_comm.all_reduce_sum(flatten_grads(ref_model, grad_buf))  # data-parallel gradient
            if setting.grad_clip is not None:  # as TWA clips: by the global gradient norm
                g = g * min(1.0, setting.grad_clip / (float(g.double().norm()) + 1e-6))
            xr.grad = ref_proj.coef_grad(g)
            opt.step()
            with torch.no_grad():
                part = ref_proj.reconstruct(xr.detach())
                w = ref_comm.all_reduce_sum(part).add_(center)  # full parameter all-reduce
                assign_flat(ref_model, w)
            if i >= setting.warmup_steps:
                ref_steps.append(time.perf_counter() - t)
            if i == 0 and first_w is not None:
                first_diff = float((flatten_params(ref_model) - first_w).abs().max())
                first_change = float((first_w - center).abs().max())
        ref = ref_comm.totals()
        result.update(
            reference_payload_per_step=ref["payload"] / setting.steps,
            reference_wire_per_step=ref["wire"] / setting.steps,
            reference_step_s=statistics.median(ref_steps),
            max_weight_diff=float((flatten_params(ref_model) - ours_w).abs().max()),
            max_weight_change=float((ours_w - center).abs().max()),  # the scale of the difference
            first_step_weight_diff=first_diff if first_w is not None else None,
            first_step_weight_change=first_change if first_w is not None else None,
        )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _fsdp_worker(rank: int, k: int, setting: Setting, store_uri: str, out_dir: str) -> None:
    """The fsdp mode as the runtime runs it (``FSDPMode``: ``wrap``, then ``build_twa``), every
    collective of its steps counted through ``torch.distributed`` (``DistCounter``)."""
    from twa_ray.core.fsdp_rows import fsdp_padded_numel
    from twa_ray.core.params import ParamLayout
    from twa_ray.parallel.sharding import sharding_mode
    from twa_ray.parallel.sharding.fsdp_tensors import local_param_bytes
    from twa_ray.store import CandidateStore

    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    mode = sharding_mode("fsdp")
    model = setting.build().train()
    layout = ParamLayout.from_model(model)
    model = mode.wrap(model, k, torch.device("cpu"))
    store = CandidateStore.open(store_uri)
    started = time.perf_counter()
    setup = mode.build_twa(model, store, store.candidate_indices(), setting.twa_config("fsdp"),
                           setting.warmup_steps + setting.steps, rank, k)
    build_s = time.perf_counter() - started
    twa = setup.twa
    x, y, share = _batch(setting, rank, k)
    torch.manual_seed(100 + rank)
    counter = DistCounter(k)
    step_s, update_s, twa_bytes = [], [], 0
    with counter:
        for i in range(setting.warmup_steps + setting.steps):
            dist.barrier()
            counter.counting = i >= setting.warmup_steps
            before = twa.comm.bytes_sent
            step, update = _timed_step(model, twa, x, y, share)
            counter.counting = False
            if i >= setting.warmup_steps:
                step_s.append(step)
                update_s.append(update)
                twa_bytes += twa.comm.bytes_sent - before
    counted = counter.totals()
    result = {
        "rank": rank, "world_size": k, "num_params": layout.num_params, "num_blocks": len(setup.blocks),
        "coords": twa.shard.numel, "padded_coords": sum(fsdp_padded_numel(s, k) for s in layout.shapes),
        "param_bytes": local_param_bytes(model), "projection_bytes": twa.projection.nbytes,
        "build_s": build_s, "step_s": statistics.median(step_s), "twa_update_s": statistics.median(update_s),
        "payload_per_step": counted["payload"] / setting.steps, "wire_per_step": counted["wire"] / setting.steps,
        "payload_by_op_per_step": {op: b / setting.steps for op, b in counted["by_op"].items()},
        "calls_per_step": {op: c / setting.steps for op, c in counted["calls"].items()},
        "twa_payload_per_step": twa_bytes / setting.steps,  # what TWA's own collectives counted
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(fn: Callable, k: int, *args, backend: str = "gloo") -> list[dict]:
    """``fn(rank, k, *args, out_dir)`` as k ranks of one group (``spawn_ranks``); the JSON each
    wrote, by rank."""
    from twa_ray.parallel.local_ranks import spawn_ranks

    with tempfile.TemporaryDirectory() as out:
        spawn_ranks(fn, k, *args, out, backend=backend)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]


def write_candidate_store(setting: ModelSetting, path: str | Path) -> str:
    """The candidates the blocks workers build from (``_candidate_columns`` of every tensor
    around the model's initial weights with seed 0) as a candidate store at ``path``: its URI."""
    from twa_ray.core import flatten_params
    from twa_ray.core.params import ParamLayout
    from twa_ray.store import CandidateStore

    torch.manual_seed(0)
    model = setting.build()
    numels, n = ParamLayout.from_model(model).numels, setting.candidates
    store = CandidateStore.create_for_model(str(path), model)
    for w in _candidate_columns(flatten_params(model), numels, 0, len(numels), list(range(n)), n):
        store.append_flat(w)
    return store.uri


def run_workers(setting: Setting, k: int, sharding: str = "blocks") -> list[dict]:
    """Spawn k gloo workers on this machine running TWA with ``sharding`` on the candidates of
    ``write_candidate_store`` (blocks: our column shards, with the paper's scheme when
    ``setting.reference``; fsdp: FSDP2's row shards); their result dicts, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        store_uri = write_candidate_store(setting, Path(tmp, "store"))
        return _spawn(_worker if sharding == "blocks" else _fsdp_worker, k, setting, store_uri)


def setting_dict(setting: Setting) -> dict:
    return asdict(setting)


# ---------------------------------------------------------------- whole steps of both modes timed


def _speed_worker(rank: int, k: int, setting: Setting, store_uri: str, out_dir: str) -> None:
    """Both modes on this rank, built by the runtime's builders (``sharding_mode``) from one
    store; whole steps timed in alternation (which mode goes first alternates by round)."""
    from twa_ray.parallel.sharding import sharding_mode
    from twa_ray.parallel.sharding.fsdp_tensors import local_param_bytes
    from twa_ray.store import CandidateStore

    torch.set_num_threads(setting.threads)
    store = CandidateStore.open(store_uri)
    chosen, total = store.candidate_indices(), setting.warmup_steps + setting.steps
    models, setups, build_s = {}, {}, {}
    for sharding in SHARDINGS:
        mode = sharding_mode(sharding)
        torch.manual_seed(0)
        models[sharding] = mode.wrap(setting.build().train(), k, torch.device("cpu"))
        started = time.perf_counter()
        setups[sharding] = mode.build_twa(models[sharding], store, chosen, setting.twa_config(sharding), total, rank, k)
        build_s[sharding] = time.perf_counter() - started
    twas = {sharding: setup.twa for sharding, setup in setups.items()}
    x, y, share = _batch(setting, rank, k)
    start = twas["blocks"].weights().clone()  # (D,) the candidates' mean, where both start (a reused buffer)
    step_s: dict[str, list[float]] = {s: [] for s in SHARDINGS}
    update_s: dict[str, list[float]] = {s: [] for s in SHARDINGS}
    for r in range(total):
        for sharding in SHARDINGS if r % 2 == 0 else SHARDINGS[::-1]:
            dist.barrier()
            step, update = _timed_step(models[sharding], twas[sharding], x, y, share)
            if r >= setting.warmup_steps:
                step_s[sharding].append(step)
                update_s[sharding].append(update)
        if r == 0:  # both modes took the same step: the same weights to float rounding
            blocks_w, fsdp_w = twas["blocks"].weights(), twas["fsdp"].weights()
            first_diff = float((blocks_w - fsdp_w).abs().max())
            first_change = float((blocks_w - start).abs().max())
    result = {
        "rank": rank, "world_size": k, "num_params": start.numel(), "step_s": step_s, "twa_update_s": update_s,
        "build_s": build_s, "first_step_weight_diff": first_diff, "first_step_weight_change": first_change,
        "param_bytes": {s: local_param_bytes(m) for s, m in models.items()},
        "exchange": setups["blocks"].exchange,  # twa.exchange: auto, as the runtime resolves it
        "projection_bytes": {s: t.projection.nbytes for s, t in twas.items()},
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def time_sharding_steps(setting: Setting, k: int) -> list[dict]:
    """Spawn k gloo workers that each run TWA in both modes (``SHARDINGS``) on the same
    candidates and time ``setting.steps`` whole steps of each, interleaved (after
    ``setting.warmup_steps``); their result dicts by rank, with ``step_s[sharding]`` and
    ``twa_update_s[sharding]``: seconds per round."""
    with tempfile.TemporaryDirectory() as tmp:
        return _spawn(_speed_worker, k, setting, write_candidate_store(setting, Path(tmp, "store")))


# ---------------------------------------------------------------- collectives timed


@dataclass
class CollectiveTiming(ModelSetting):
    rounds: int = 10
    warmup_rounds: int = 2
    bucket_mb: tuple[float, ...] = (1.0, 4.0, 25.0)  # 25 MB: DistributedDataParallel's default bucket
    backend: str = "gloo"
    threads: int = 1
    seed: int = 0
    sharding: str = "both"  # whose step variants: blocks, fsdp or both (in the same rounds)
    global_batch: int = 64  # the forward and backward pass the ring all-gather may overlap (k = 2)


# variant -> what one call does (every time is of one such call, on every rank)
TIMED_VARIANTS = {
    "all_reduce_D": "one all-reduce of the D float32 values (data-parallel SGD's gradient all-reduce)",
    "twa_step": "one TWA step's collectives as the library makes them with twa.exchange: sharded: reduce-scatter "
                "of the (padded) D-vector, all-reduce of the n x L coefficient gradient, all-gather of the (padded) "
                "weight slices",
    "twa_step_ar_slice": "the same step with an all-reduce of D + this rank's slice in place of the reduce-scatter",
    "twa_step_all_reduce_only": "the same step with twa.exchange: all_reduce: "
                                "all-reduces of D + a slice in place of the reduce-scatter, and of a zeroed "
                                "D-vector holding this rank's slice in place of the all-gather",
    "twa_step_ring": "the same step with twa.exchange: ring (the library's default on gloo): the reduce-scatter "
                     "and the all-gather as rings of point-to-point sends (k - 1 sends of one rank's range each)",
    "reduce_scatter": "the step's reduce-scatter alone",
    "all_gather": "the step's all-gather alone",
    "reduce_scatter_ring": "the ring exchange's reduce-scatter alone",
    "all_gather_ring": "the ring exchange's all-gather alone",
    "all_gather_via_all_reduce": "an all-reduce of a zeroed D-vector holding this rank's slice, "
                                 "in place of the all-gather (same result)",
    # k = 2 only: the compute an all-gather of the weights could overlap, and the two together
    "forward_backward": "the model's forward and backward pass on this rank's share of the global batch "
                        "(no collective)",
    "forward_backward_under_all_gather_ring": "the ring all-gather of the weights posted before the forward and "
                                              "backward pass and waited for after it: the most that overlapping "
                                              "the all-gather with the next forward pass can hide",
    "all_reduce_coef": "the step's all-reduce of the n x L coefficient gradient alone",
}
# the fsdp mode's step: FSDP2's collectives (per unit: its padded shards, as fsdp_wrap makes the units)
FSDP_TIMED_VARIANTS = {
    "fsdp_step": "one fsdp-mode TWA step's collectives as FSDP2 makes them: per unit, the all-gather of its padded "
                 "shards in the forward pass, again in the backward pass (not the root unit, which FSDP2 keeps "
                 "gathered) and the reduce-scatter of its gradient; then the all-reduce of the n x L "
                 "coefficient gradient",
    "fsdp_step_flat": "the same bytes with the whole model as one unit: one all-gather of all padded shards, one "
                      "reduce-scatter, the n x L all-reduce",
    "fsdp_all_gathers": "the fsdp step's all-gathers alone (forward and backward)",
    "fsdp_reduce_scatters": "the fsdp step's reduce-scatters alone",
}
# variants that belong to neither mode (the reference and what both modes share) -> no "sharding"
SHARED_VARIANTS = ("all_reduce_D", "all_reduce_coef")


def variant_sharding(variant: str) -> str | None:
    """The twa.sharding mode a timed variant is a step (part) of; None for the references."""
    if variant in SHARED_VARIANTS or variant.startswith("all_reduce_D"):
        return None
    return "fsdp" if variant in FSDP_TIMED_VARIANTS else "blocks"


def bucket_variant(mb: float, asynchronous: bool) -> str:
    return f"all_reduce_D_buckets_{mb:g}MB_{'async' if asynchronous else 'sync'}"


def _bucket_views(t: torch.Tensor, mb: float) -> list[torch.Tensor]:
    """Consecutive views of ``t`` (D,) of at most ``mb`` MB each."""
    per = max(1, int(mb * 1e6) // t.element_size())
    return list(t.split(per))


def _time_worker(rank: int, k: int, timing: CollectiveTiming, out_dir: str) -> None:
    from twa_ray.core.blocks import make_blocks, plan_ranges
    from twa_ray.core.params import ParamLayout
    from twa_ray.parallel.exchanges import EXCHANGES
    from twa_ray.planner.fsdp import ROOT_UNIT

    torch.set_num_threads(timing.threads)
    device = torch.device("cuda", rank) if timing.backend == "nccl" else torch.device("cpu")  # spawn_ranks set it
    layout = ParamLayout.from_model(timing.build())
    numels = layout.numels
    blocks = make_blocks(numels, timing.granularity)
    with_blocks, with_fsdp = timing.sharding in ("blocks", "both"), timing.sharding in ("fsdp", "both")
    plan = plan_ranges(blocks, timing.bits, k) if with_blocks else None  # as BlocksMode cuts them
    d, (start, end) = sum(numels), plan.ranges[rank] if with_blocks else (0, 0)
    comm = EXCHANGES["sharded"](plan.ranges, rank, k) if with_blocks else None
    gen = torch.Generator().manual_seed(timing.seed + rank)
    grad = torch.randn(d, generator=gen).to(device)  # the model's gradient (reduce-scatter reads it)
    grad_ar = torch.zeros(d, device=device)  # all-reduced in place: zeros never overflow
    coef = torch.zeros(timing.candidates, len(blocks), device=device)  # the coefficient gradient (n, L)
    own = torch.randn(end - start, generator=gen).to(device)  # this rank's reconstructed weights
    weights = torch.empty(d, device=device)
    flat = torch.zeros(d, device=device)
    buckets = {mb: _bucket_views(flat, mb) for mb in timing.bucket_mb}

    # twa.exchange: all_reduce, as the library makes it (grad_ar is zeros: summing in place keeps it so)
    comm_ar = EXCHANGES["all_reduce"](plan.ranges, rank, k) if with_blocks else None
    comm_ring = EXCHANGES["ring"](plan.ranges, rank, k) if with_blocks else None

    def all_reduce_slice() -> torch.Tensor:
        return comm_ar.reduce_scatter_sum(grad_ar)

    def all_gather_via_all_reduce() -> torch.Tensor:
        return comm_ar.all_gather(own, weights)

    def step(first: Callable[[], torch.Tensor],
             gather: Callable[[], torch.Tensor] = lambda: comm.all_gather(own, weights)) -> Callable[[], None]:
        def run() -> None:
            first()
            comm.all_reduce_sum(coef)
            gather()
        return run

    def bucketed(mb: float, asynchronous: bool) -> Callable[[], None]:
        def run() -> None:
            if asynchronous:  # all in flight at once, as DistributedDataParallel issues them
                for work in [dist.all_reduce(b, async_op=True) for b in buckets[mb]]:
                    work.wait()
            else:
                for b in buckets[mb]:
                    dist.all_reduce(b)
        return run

    def forward_backward() -> None:
        nn.functional.cross_entropy(net(images), labels).backward()

    def forward_backward_under_all_gather_ring() -> None:
        # k = 2: the ring all-gather is one exchange with the other rank, in flight during the pass
        comm_ring.all_gather(own, weights, in_flight=forward_backward)

    fns: dict[str, Callable[[], object]] = {
        "all_reduce_D": lambda: dist.all_reduce(flat),
        "all_reduce_coef": lambda: dist.all_reduce(coef),  # Exchange.all_reduce_sum's call, both modes
    }
    if with_blocks:
        fns.update({
            "twa_step": step(lambda: comm.reduce_scatter_sum(grad)),
            "twa_step_ar_slice": step(all_reduce_slice),
            "twa_step_all_reduce_only": step(all_reduce_slice, all_gather_via_all_reduce),
            "twa_step_ring": step(lambda: comm_ring.reduce_scatter_sum(grad_ar), lambda: comm_ring.all_gather(own, weights)),
            "reduce_scatter": lambda: comm.reduce_scatter_sum(grad),
            "all_gather": lambda: comm.all_gather(own, weights),
            "reduce_scatter_ring": lambda: comm_ring.reduce_scatter_sum(grad_ar),
            "all_gather_ring": lambda: comm_ring.all_gather(own, weights),
            "all_gather_via_all_reduce": all_gather_via_all_reduce,
        })
        if k == 2:
            torch.manual_seed(timing.seed)
            net = timing.build().to(device)
            per_rank = max(1, timing.global_batch // k)
            images = torch.randn(per_rank, timing.in_channels, timing.image_size, timing.image_size,
                                 generator=gen).to(device)
            labels = torch.randint(0, timing.num_classes, (per_rank,), generator=gen).to(device)
            fns.update({"forward_backward": forward_backward,
                        "forward_backward_under_all_gather_ring": forward_backward_under_all_gather_ring})
    units = fsdp_unit_sizes(layout.names, layout.shapes, k)
    if with_fsdp:
        # FSDP2's buffers: per unit its padded shard (all-gather input) and k of them
        shard_in = {u: torch.randn(m, generator=gen).to(device) for u, m in units.items()}
        gathered_out = {u: torch.empty(k * m, device=device) for u, m in units.items()}
        grad_in = {u: torch.randn(k * m, generator=gen).to(device) for u, m in units.items()}
        grad_out = {u: torch.empty(m, device=device) for u, m in units.items()}
        flat_in, flat_grad = torch.cat(list(shard_in.values())), torch.cat(list(grad_in.values()))
        flat_out, flat_grad_out = torch.empty(k * flat_in.numel(), device=device), torch.empty_like(flat_in)

        def forward_gathers() -> None:
            for u in units:
                dist.all_gather_single(gathered_out[u], shard_in[u])

        def backward(gather: bool, scatter: bool) -> None:
            for u in reversed(units):
                if gather and u != ROOT_UNIT:  # FSDP2 keeps the root unit gathered after forward
                    dist.all_gather_single(gathered_out[u], shard_in[u])
                if scatter:
                    dist.reduce_scatter_single(grad_out[u], grad_in[u])

        def fsdp_step() -> None:
            forward_gathers()
            backward(gather=True, scatter=True)
            dist.all_reduce(coef)

        def fsdp_step_flat() -> None:
            dist.all_gather_single(flat_out, flat_in)
            dist.reduce_scatter_single(flat_grad_out, flat_grad)
            dist.all_reduce(coef)

        def fsdp_all_gathers() -> None:
            forward_gathers()
            backward(gather=True, scatter=False)

        fns.update({"fsdp_step": fsdp_step, "fsdp_step_flat": fsdp_step_flat, "fsdp_all_gathers": fsdp_all_gathers,
                    "fsdp_reduce_scatters": lambda: backward(gather=False, scatter=True)})
    for mb in timing.bucket_mb:
        for asynchronous in (False, True):
            fns[bucket_variant(mb, asynchronous)] = bucketed(mb, asynchronous)

    # the alternatives compute what the library's calls compute (sums: to float rounding)
    alternatives_match = None
    if with_blocks:
        summed = grad.clone()
        dist.all_reduce(summed)
        gathered = comm.all_gather(own, weights).clone()
        alternatives_match = (
            bool(torch.allclose(comm.reduce_scatter_sum(grad), summed[start:end], rtol=1e-6, atol=1e-6))
            and bool(torch.equal(all_gather_via_all_reduce(), gathered))
            and bool(torch.allclose(comm_ring.reduce_scatter_sum(grad.clone()), summed[start:end], rtol=1e-6, atol=1e-6))
            and bool(torch.equal(comm_ring.all_gather(own, weights), gathered)))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(timing.warmup_rounds + timing.rounds):
        # rotate which goes first, so none always follows the same one
        for name in order[r % len(order):] + order[: r % len(order)]:
            sync()
            dist.barrier()
            t = time.perf_counter()
            fns[name]()
            sync()
            if r >= timing.warmup_rounds:
                times[name].append(time.perf_counter() - t)
    result = {
        "rank": rank, "world_size": k, "num_params": d, "num_blocks": len(blocks), "coords": end - start,
        "padded_length": comm.pad if with_blocks else None, "alternatives_match": alternatives_match,
        "times": times, "buckets": {f"{mb:g}": len(views) for mb, views in buckets.items()},
        "fsdp_units": len(units), "fsdp_padded": sum(units.values()), "fsdp_root_padded": units.get(ROOT_UNIT, 0),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def time_collectives(timing: CollectiveTiming, k: int) -> list[dict]:
    """Spawn k workers that time collectives (``TIMED_VARIANTS`` and/or ``FSDP_TIMED_VARIANTS``
    as ``timing.sharding`` says, and the bucketed all-reduces); their result dicts by rank,
    each with ``times[variant]``: seconds per timed round (a barrier before each call)."""
    if timing.backend == "nccl" and torch.cuda.device_count() < k:
        raise RuntimeError(f"NCCL with {k} ranks needs {k} GPUs, this machine has {torch.cuda.device_count()}")
    return _spawn(_time_worker, k, timing, backend=timing.backend)


def slowest_rank_times(results: list[dict]) -> dict[str, list[float]]:
    """Per variant and round, the slowest rank's seconds: a collective ends for the group
    when it ends on its last rank."""
    return {name: [max(r["times"][name][i] for r in results) for i in range(len(results[0]["times"][name]))]
            for name in results[0]["times"]}
