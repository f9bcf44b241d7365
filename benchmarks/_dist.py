"""k TWA workers as local processes on gloo (127.0.0.1): no Ray, the library's collectives.

``run_workers(setting, k)`` spawns k processes (torch.multiprocessing), each builds its
column shard of the projection the way the runtime does (``make_blocks`` ->
``plan_shards`` -> ``build_projection`` over its columns -> ``TWA`` with
``TorchCollectives``), runs a few steps on its slice of a fixed global batch and
reports per-step collective traffic (counted by wrapping the collectives), step times
and its projection bytes. With ``reference=True`` it also runs the paper's row-sharded
scheme (gradient all-reduce + full parameter all-reduce) on the same candidates and
checks that both reach the same weights.

``time_collectives(timing, k)`` spawns k processes that only time collectives, on gloo
or NCCL (one GPU per rank): one TWA step's calls through ``TorchCollectives`` (shapes
from the model's shard plan) against one all-reduce of D floats, and the alternatives
(all-reduce + local slice for the reduce-scatter, bucketed all-reduces), interleaved
round by round.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ModelSetting:
    """The model and projection both distributed benchmarks time."""

    model: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    candidates: int = 20
    bits: int = 4
    granularity: str = "tensor"


@dataclass
class Setting(ModelSetting):
    global_batch: int = 64
    steps: int = 3
    warmup_steps: int = 1
    threads: int = 1
    reference: bool = False  # also run the paper's scheme
    lr: float = 0.05


class CountingCollectives:
    """Wraps TorchCollectives: per call, the payload it counted and the ring wire bytes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rank, self.world_size, self.ranges = inner.rank, inner.world_size, inner.ranges
        self.calls: list[tuple[str, int, float]] = []  # (op, payload bytes, wire bytes)

    def _record(self, op: str, before: int, wire_factor: float) -> None:
        payload = self.inner.bytes_sent - before
        self.calls.append((op, payload, wire_factor * payload))

    def reduce_scatter_sum(self, flat):
        before, k = self.inner.bytes_sent, self.world_size
        out = self.inner.reduce_scatter_sum(flat)
        self._record("reduce_scatter", before, (k - 1) / k)  # sends (k-1)/k of its input
        return out

    def all_reduce_sum(self, t):
        before, k = self.inner.bytes_sent, self.world_size
        out = self.inner.all_reduce_sum(t)
        self._record("all_reduce", before, 2 * (k - 1) / k)
        return out

    def all_gather(self, own, out):
        before, k = self.inner.bytes_sent, self.world_size
        res = self.inner.all_gather(own, out)
        self._record("all_gather", before, k - 1)  # sends its (padded) slice to k-1 peers
        return res

    def totals(self) -> dict:
        out: dict = {"payload": 0, "wire": 0.0, "by_op": {}}
        for op, payload, wire in self.calls:
            out["payload"] += payload
            out["wire"] += wire
            out["by_op"][op] = out["by_op"].get(op, 0) + payload
        return out


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


def _tensor_spans(numels, t0: int, t1: int) -> list[tuple[int, int]]:
    """Column ranges of tensors t0..t1-1 inside their concatenation."""
    spans, pos = [], 0
    for t in range(t0, t1):
        spans.append((pos, pos + numels[t]))
        pos += numels[t]
    return spans


def _batch(setting: Setting, rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(setting.global_batch, 3, setting.image_size, setting.image_size, generator=gen)
    y = torch.randint(0, setting.num_classes, (setting.global_batch,), generator=gen)
    idx = list(range(rank, setting.global_batch, k))
    return x[idx], y[idx], len(idx) / setting.global_batch


def _worker(rank: int, k: int, port: int, setting: Setting, out_dir: str) -> None:
    from twa_ray.core import TWA, flatten_params
    from twa_ray.core.blocks import make_blocks, plan_shards
    from twa_ray.core.params import ParamLayout, assign_flat, flatten_grads
    from twa_ray.core.projection import build_projection
    from twa_ray.distributed.collectives import TorchCollectives
    from twa_ray.models import build_model

    torch.set_num_threads(setting.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    try:
        torch.manual_seed(0)
        model = build_model(setting.model, setting.num_classes, 3, setting.image_size).train()
        layout = ParamLayout.from_model(model)
        base = flatten_params(model)
        n, numels = setting.candidates, layout.numels
        blocks = make_blocks(numels, setting.granularity)
        plan = plan_shards(blocks, setting.bits, k)
        (t0, t1), (l0, l1) = plan.tensor_runs[rank], plan.block_runs[rank]
        x, y, share = _batch(setting, rank, k)

        def loss_backward(net: nn.Module) -> None:
            net.zero_grad(set_to_none=True)
            (nn.functional.cross_entropy(net(x), y) * share).backward()  # sum over ranks = global mean

        # ---- our scheme: column shards
        started = time.perf_counter()
        cols = _candidate_columns(base, numels, t0, t1, list(range(n)), n)
        own_center = torch.cat([cols[:, a:b].mean(dim=0) for a, b in _tensor_spans(numels, t0, t1)])
        # the center, computed as the reference computes it, so both quantise the same directions
        proj = build_projection(cols, blocks.sizes[l0:l1], "normalized", setting.bits, center=own_center)
        del cols
        comm = CountingCollectives(TorchCollectives(plan.ranges, rank, k))
        twa = TWA(model, proj, len(blocks), (l0, l1), collectives=comm, lr=setting.lr)
        build_s = time.perf_counter() - started
        torch.manual_seed(100 + rank)  # dropout masks: the reference scheme replays the same ones
        first_w = None
        for _ in range(setting.warmup_steps):
            loss_backward(model)
            twa.step()
            if first_w is None:
                first_w = flatten_params(model)
        comm.calls.clear()
        step_s, update_s = [], []
        for _ in range(setting.steps):
            dist.barrier()
            t = time.perf_counter()
            loss_backward(model)
            u = time.perf_counter()
            twa.step()
            step_s.append(time.perf_counter() - t)
            update_s.append(time.perf_counter() - u)
        ours = comm.totals()
        result = {
            "rank": rank, "world_size": k, "num_params": layout.num_params, "num_blocks": len(blocks),
            "coords": plan.ranges[rank][1] - plan.ranges[rank][0], "padded_length": comm.inner.pad,
            "projection_bytes": proj.nbytes, "planned_projection_bytes": plan.shard_bytes(blocks, setting.bits, n)[rank],
            "build_s": build_s, "step_s": statistics.median(step_s), "twa_update_s": statistics.median(update_s),
            "payload_per_step": ours["payload"] / setting.steps, "wire_per_step": ours["wire"] / setting.steps,
            "payload_by_op_per_step": {op: b / setting.steps for op, b in ours["by_op"].items()},
        }
        ours_w = flatten_params(model)

        # ---- the paper's scheme: candidate rows sharded, gradient + parameter all-reduce
        if setting.reference:
            ref_model = build_model(setting.model, setting.num_classes, 3, setting.image_size).train()
            ref_model.load_state_dict(model.state_dict())
            rows = list(range(rank, n, k))
            center = torch.cat([
                _candidate_columns(base, numels, t, t + 1, list(range(n)), n).mean(dim=0) for t in range(len(numels))
            ])
            mine = _candidate_columns(base, numels, 0, len(numels), rows, n)
            ref_proj = build_projection(mine, blocks.sizes, "normalized", setting.bits, center=center.clone())
            del mine
            ref_proj.center = torch.zeros_like(center)  # reconstruct -> this rank's part sum_i X_i Q_i
            ref_comm = CountingCollectives(TorchCollectives(plan.ranges, rank, k))
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
                loss_backward(ref_model)
                g = ref_comm.all_reduce_sum(flatten_grads(ref_model, grad_buf))  # data-parallel gradient
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
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(setting: Setting, k: int) -> list[dict]:
    """Spawn k gloo workers on this machine; their result dicts, by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_worker, args=(k, free_port(), setting, out), nprocs=k, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]


def setting_dict(setting: Setting) -> dict:
    return asdict(setting)


# ---------------------------------------------------------------- collectives timed


@dataclass
class CollectiveTiming(ModelSetting):
    rounds: int = 10
    warmup_rounds: int = 2
    bucket_mb: tuple[float, ...] = (1.0, 4.0, 25.0)  # 25 MB: DistributedDataParallel's default bucket
    backend: str = "gloo"
    threads: int = 1
    seed: int = 0


# variant -> what one call does (every time is of one such call, on every rank)
TIMED_VARIANTS = {
    "all_reduce_D": "one all-reduce of the D float32 values (data-parallel SGD's gradient all-reduce)",
    "twa_step": "one TWA step's collectives as the library makes them: reduce-scatter of the (padded) D-vector, "
                "all-reduce of the n x L coefficient gradient, all-gather of the (padded) weight slices",
    "twa_step_ar_slice": "the same step with an all-reduce of D + this rank's slice in place of the reduce-scatter",
    "twa_step_all_reduce_only": "the same step with all-reduces only: of D + a slice in place of the reduce-scatter, "
                                "and of a zeroed D-vector holding this rank's slice in place of the all-gather",
    "reduce_scatter": "the step's reduce-scatter alone",
    "all_gather": "the step's all-gather alone",
    "all_gather_via_all_reduce": "an all-reduce of a zeroed D-vector holding this rank's slice, "
                                 "in place of the all-gather (same result)",
    "all_reduce_coef": "the step's all-reduce of the n x L coefficient gradient alone",
}


def bucket_variant(mb: float, asynchronous: bool) -> str:
    return f"all_reduce_D_buckets_{mb:g}MB_{'async' if asynchronous else 'sync'}"


def _bucket_views(t: torch.Tensor, mb: float) -> list[torch.Tensor]:
    """Consecutive views of ``t`` (D,) of at most ``mb`` MB each."""
    per = max(1, int(mb * 1e6) // t.element_size())
    return list(t.split(per))


def _time_worker(rank: int, k: int, port: int, timing: CollectiveTiming, out_dir: str) -> None:
    from twa_ray.core.blocks import make_blocks, plan_shards
    from twa_ray.core.params import ParamLayout
    from twa_ray.distributed.collectives import TorchCollectives
    from twa_ray.models import build_model

    torch.set_num_threads(timing.threads)
    if timing.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(timing.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    try:
        numels = ParamLayout.from_model(build_model(timing.model, timing.num_classes, 3, timing.image_size)).numels
        blocks = make_blocks(numels, timing.granularity)
        plan = plan_shards(blocks, timing.bits, k)
        d, (start, end) = sum(numels), plan.ranges[rank]
        comm = TorchCollectives(plan.ranges, rank, k)
        gen = torch.Generator().manual_seed(timing.seed + rank)
        grad = torch.randn(d, generator=gen).to(device)  # the model's gradient (reduce-scatter reads it)
        grad_ar = torch.zeros(d, device=device)  # all-reduced in place: zeros never overflow
        coef = torch.zeros(timing.candidates, len(blocks), device=device)  # the coefficient gradient (n, L)
        own = torch.randn(end - start, generator=gen).to(device)  # this rank's reconstructed weights
        weights = torch.empty(d, device=device)
        flat = torch.zeros(d, device=device)
        buckets = {mb: _bucket_views(flat, mb) for mb in timing.bucket_mb}

        def all_reduce_slice() -> torch.Tensor:
            dist.all_reduce(grad_ar)
            return grad_ar[start:end]

        def all_gather_via_all_reduce() -> torch.Tensor:
            weights.zero_()
            weights[start:end] = own
            dist.all_reduce(weights)
            return weights

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

        fns: dict[str, Callable[[], object]] = {
            "all_reduce_D": lambda: dist.all_reduce(flat),
            "twa_step": step(lambda: comm.reduce_scatter_sum(grad)),
            "twa_step_ar_slice": step(all_reduce_slice),
            "twa_step_all_reduce_only": step(all_reduce_slice, all_gather_via_all_reduce),
            "reduce_scatter": lambda: comm.reduce_scatter_sum(grad),
            "all_gather": lambda: comm.all_gather(own, weights),
            "all_gather_via_all_reduce": all_gather_via_all_reduce,
            "all_reduce_coef": lambda: comm.all_reduce_sum(coef),
        }
        for mb in timing.bucket_mb:
            for asynchronous in (False, True):
                fns[bucket_variant(mb, asynchronous)] = bucketed(mb, asynchronous)

        # the alternatives compute what the library's calls compute (sums: to float rounding)
        summed = grad.clone()
        dist.all_reduce(summed)
        gathered = comm.all_gather(own, weights).clone()
        alternatives_match = (bool(torch.allclose(comm.reduce_scatter_sum(grad), summed[start:end], rtol=1e-6, atol=1e-6))
                              and bool(torch.equal(all_gather_via_all_reduce(), gathered)))

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
            "padded_length": comm.pad, "alternatives_match": alternatives_match, "times": times,
            "buckets": {f"{mb:g}": len(views) for mb, views in buckets.items()},
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def time_collectives(timing: CollectiveTiming, k: int) -> list[dict]:
    """Spawn k workers that time collectives (``TIMED_VARIANTS`` and the bucketed
    all-reduces); their result dicts by rank, each with ``times[variant]``: seconds per
    timed round (a barrier before each call)."""
    import torch.multiprocessing as mp

    if timing.backend == "nccl" and torch.cuda.device_count() < k:
        raise RuntimeError(f"NCCL with {k} ranks needs {k} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as out:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_time_worker, args=(k, free_port(), timing, out), nprocs=k, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]


def slowest_rank_times(results: list[dict]) -> dict[str, list[float]]:
    """Per variant and round, the slowest rank's seconds: a collective ends for the group
    when it ends on its last rank."""
    return {name: [max(r["times"][name][i] for r in results) for i in range(len(results[0]["times"][name]))]
            for name in results[0]["times"]}
