"""Sharded TWA on Ray Train: the per-worker loop and the driver that launches it.

Each of k workers holds a full model replica, its slice of every global batch and the
packed projection of its own blocks (``twa_shard``). Every epoch (and every
``twa.checkpoint_every_steps``) rank 0 reports a checkpoint of the tiny coefficient
state, so a restarted worker group resumes at the same step with the same data order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..builders import model_from_config, splits_from_config, twa_datasets
from ..config import Config, config_from_dict, config_to_dict, select_candidates
from ..core import make_blocks
from ..core.baselines import recalibrate_bn
from ..data import calibration_loader
from ..store import CandidateStore
from .batches import ShardedBatchSampler, batches_per_epoch, loader_for
from .twa_shard import build_shard_twa, candidate_rounds

log = logging.getLogger(__name__)

STATE_FILE = "twa_state.pt"
FINAL_FILE = "twa_final.pt"


# ---------------------------------------------------------------- worker side


def _load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def _report(metrics: dict, state: dict | None, final: dict | None = None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (state and optional final result)."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / STATE_FILE)
        if final is not None:
            torch.save(final, Path(folder) / FINAL_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _maybe_fail(cfg: Config, step: int, rank: int, world_size: int, marker_dir: str) -> None:
    """Fault injection, each at most once per run folder (a marker file remembers it):
    ``debug.fail_at_step`` makes the last rank fail at that step; ``debug.pause_at_step``
    makes it stall there (up to 10 minutes), so a drill can interrupt a run mid-training."""
    if rank != world_size - 1:
        return
    for kind, at in (("failed", cfg.debug.fail_at_step), ("paused", cfg.debug.pause_at_step)):
        marker = Path(marker_dir) / f"twa-{kind}-at-step-{step}"
        if at is None or step != at or marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if kind == "failed":
            raise RuntimeError(f"debug.fail_at_step: injected failure of rank {rank} at TWA step {step}")
        time.sleep(600)


@torch.no_grad()
def _evaluate_sharded(model: nn.Module, data, rank: int, world_size: int, comm, device, batch_size: int) -> dict:
    """Accuracy/loss on ``data``, each rank taking every k-th example, summed across ranks."""
    from torch.utils.data import DataLoader, Subset

    part = Subset(data, list(range(rank, len(data), world_size)))
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss, count
    for x, y in DataLoader(part, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        sums[0] += (out.argmax(1) == y).sum()
        sums[1] += nn.functional.cross_entropy(out, y, reduction="sum")
        sums[2] += len(y)
    model.train()
    sums = comm.all_reduce_sum(sums)
    count = max(1.0, float(sums[2]))
    return {"select_acc": 100.0 * float(sums[0]) / count, "select_loss": float(sums[1]) / count}


def twa_train_loop(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` for sharded TWA."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    splits = splits_from_config(cfg, config["cwd"])
    train_data, select_data = twa_datasets(cfg, splits)
    calibration = calibration_loader(splits.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed)
    model = model_from_config(cfg, splits)
    if cfg.model.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    store = CandidateStore.open(config["store_uri"])
    rounds = candidate_rounds(config["candidates"], cfg.twa.candidates_per_round)
    batch_size = cfg.twa.batch_size or cfg.data.batch_size
    steps_per_epoch = batches_per_epoch(len(train_data), batch_size)
    steps_per_round = steps_per_epoch * cfg.twa.epochs

    state = _load_state(ray.train.get_checkpoint()) or {
        "round": 0, "epoch": 0, "batch": 0, "twa": None, "center": None,
        "coefficients": [], "history": [], "buffers": None, "done": False,
        "projection_bytes": [], "elapsed_s": 0.0,
    }
    if state.get("data_seed", cfg.seed) != cfg.seed:
        raise ValueError(f"the checkpoint was made with seed {state['data_seed']}, this run has seed {cfg.seed}")
    if state["buffers"] is not None:
        model.load_state_dict(state["buffers"], strict=False)
    started = time.time()
    for r in range(state["round"], len(rounds)):
        setup = build_shard_twa(model, store, rounds[r], cfg.twa, steps_per_round, rank, world, center=state["center"])
        twa = setup.twa
        if state["twa"] is not None:
            twa.load_state_dict(state["twa"])
        nbytes = torch.zeros(world, dtype=torch.float64, device=twa.X.device)
        nbytes[rank] = twa.projection.nbytes
        state["projection_bytes"] = [int(v) for v in twa.comm.all_reduce_sum(nbytes).tolist()]
        if rank == 0:
            log.info("TWA round %d/%d: %d candidates, %d blocks, projection bytes per worker %s",
                     r + 1, len(rounds), len(rounds[r]), len(setup.blocks), state["projection_bytes"])

        def snapshot(epoch: int, batch: int) -> dict:
            buffers = {k: v.cpu() for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
            return {**state, "round": r, "epoch": epoch, "batch": batch, "twa": twa.state_dict(), "buffers": buffers,
                    "elapsed_s": state["elapsed_s"] + time.time() - started, "data_seed": cfg.seed}

        for epoch in range(state["epoch"], cfg.twa.epochs):
            t0 = time.time()
            sampler = ShardedBatchSampler(
                len(train_data), batch_size, rank, world, cfg.seed, 1000 * r + epoch, start_batch=state["batch"]
            )
            sums = torch.zeros(2, dtype=torch.float64, device=twa.X.device)  # loss sum, count
            for j, (x, y) in enumerate(loader_for(train_data, sampler)):
                _maybe_fail(cfg, r * steps_per_round + twa.num_steps, rank, world, config["marker_dir"])
                model.train()
                for p in model.parameters():
                    p.grad = None
                if len(y):
                    x, y = x.to(device), y.to(device)
                    loss = nn.functional.cross_entropy(
                        model(x), y, reduction="sum", label_smoothing=cfg.twa.label_smoothing
                    ) / sampler.global_sizes[j]
                    if cfg.debug.nan_at_step == r * steps_per_round + twa.num_steps:
                        loss = loss * float("nan")  # drill: a loss that became NaN
                    loss.backward()
                    sums[0] += float(loss.detach()) * sampler.global_sizes[j]
                    sums[1] += len(y)
                try:
                    twa.step()
                except FloatingPointError:
                    # the gradient was all-reduced, so every rank stops here; X is still the
                    # last good one: keep it as the checkpoint and end without retrying
                    bad = r * steps_per_round + twa.num_steps
                    if rank == 0:
                        log.error("TWA step %d: the loss is not finite; stopping with the last good coefficients", bad)
                    _report({"nonfinite_at_step": bad}, snapshot(epoch, state["batch"] + j) if rank == 0 else None)
                    return
                every = cfg.twa.checkpoint_every_steps
                if every and twa.num_steps % every == 0 and j + 1 < len(sampler):
                    _report({"round": r, "epoch": epoch, "step": twa.num_steps},
                            snapshot(epoch, state["batch"] + j + 1) if rank == 0 else None)
            sums = twa.comm.all_reduce_sum(sums)
            metrics = {
                "round": r, "epoch": epoch + 1, "step": twa.num_steps, "lr": twa.lr,
                "train_loss": float(sums[0]) / max(1.0, float(sums[1])), "epoch_time_s": time.time() - t0,
            }
            if select_data is not None:
                # the same recalibration as the final evaluation, identical on every rank, so
                # the selection ranks the weights that are reported
                recalibrate_bn(model, calibration, device)
                metrics.update(_evaluate_sharded(model, select_data, rank, world, twa.comm, device, cfg.data.eval_batch_size))
            state["history"].append(metrics)
            state["batch"] = 0
            if rank == 0:
                log.info("TWA round %d epoch %d/%d: %s", r + 1, epoch + 1, cfg.twa.epochs,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            last = r == len(rounds) - 1 and epoch == cfg.twa.epochs - 1
            if not last:
                _report(metrics, snapshot(epoch + 1, 0) if rank == 0 else None)
        state["coefficients"].append(twa.X.detach().cpu().clone())
        state["center"] = twa.weights().detach().cpu().clone()
        state.update(round=r + 1, epoch=0, batch=0, twa=None)

    if not state["done"]:
        state.update(done=True, elapsed_s=state["elapsed_s"] + time.time() - started)
    metrics = {**(state["history"][-1] if state["history"] else {}), "twa_complete": True}  # not "done": Tune reads that key
    if rank == 0:
        final = {
            "weights": state["center"], "coefficients": state["coefficients"], "rounds": rounds,
            "history": state["history"], "projection_bytes": state["projection_bytes"],
            "block_names": _block_names(store, cfg.twa.granularity), "time_s": state["elapsed_s"],
        }
        _report(metrics, state, final)
    else:
        _report(metrics, None)


def _block_names(store: CandidateStore, granularity: str) -> list[str]:
    """A readable name per block: its tensor, or first..last tensor of the group."""
    blocks = make_blocks(store.numels, granularity)
    names = store.names
    return [names[a] if b - a == 1 else f"{names[a]}..{names[b - 1]}" for a, b in blocks.tensor_ranges]


# ---------------------------------------------------------------- driver side


@dataclass
class TWAResult:
    """What a TWA run returns to the driver."""

    weights: torch.Tensor  # (D,) the final w(X)
    coefficients: list[torch.Tensor]  # per round: (n_r, L)
    rounds: list[list[int]]  # candidate indices of each round
    block_names: list[str]
    history: list[dict] = field(default_factory=list)
    projection_bytes: list[int] = field(default_factory=list)  # per worker
    time_s: float = 0.0  # inside the workers (set-up and training)
    wall_time_s: float = 0.0  # the driver's TorchTrainer.fit, start-up included
    checkpoint_path: str | None = None  # the final Ray Train checkpoint (holds FINAL_FILE)


def chosen_candidates(cfg: Config, store: CandidateStore) -> list[int]:
    """Store indices ``twa.candidates`` selects; raises ValueError when fewer than two remain."""
    available = store.candidate_indices()
    chosen = [available[i] for i in select_candidates(cfg.twa.candidates, len(available))]
    if len(chosen) < 2:
        raise ValueError(
            f"TWA needs at least two candidates to span a subspace; twa.candidates={cfg.twa.candidates!r} "
            f"selects {len(chosen)} of the {len(available)} in the store at {store.uri}"
        )
    return chosen


def twa_run_name(cfg: Config, store_uri: str, candidates: list[int]) -> str:
    """Deterministic per (TWA settings, data, model, candidates): a re-run resumes, a change starts afresh."""
    key = json.dumps(
        {"twa": config_to_dict(cfg)["twa"], "data": config_to_dict(cfg)["data"], "model": config_to_dict(cfg)["model"],
         "seed": cfg.seed, "store": store_uri, "candidates": candidates, "debug": config_to_dict(cfg)["debug"]},
        sort_keys=True,
    )
    return f"{cfg.name}-twa-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def run_twa(
    cfg: Config,
    store_uri: str | None = None,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
) -> TWAResult:
    """Run sharded TWA on ``cfg.twa.workers`` Ray Train workers and return the result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..ray_env import cluster_has_gpus, worker_runtime_env

    store_uri = store_uri or cfg.store_uri
    if "://" not in store_uri:
        store_uri = str(Path(store_uri).resolve())
    store = CandidateStore.open(store_uri)
    candidates = chosen_candidates(cfg, store)
    num_blocks = len(make_blocks(store.numels, cfg.twa.granularity))
    if cfg.twa.workers > num_blocks:
        raise ValueError(
            f"twa.workers={cfg.twa.workers} is more than the {num_blocks} block(s) of granularity "
            f"{cfg.twa.granularity!r}: each worker owns whole blocks; use a finer granularity or fewer workers"
        )
    use_gpu = cfg.twa.use_gpu if cfg.twa.use_gpu is not None else cluster_has_gpus()
    run_dir = Path(cfg.run_dir).resolve()
    storage = storage_path or str(run_dir / "ray")
    trainer = TorchTrainer(
        twa_train_loop,
        train_loop_config={
            "cfg": config_to_dict(cfg), "store_uri": store_uri, "candidates": candidates,
            "cwd": os.getcwd(), "marker_dir": str(run_dir / "debug"),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.twa.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.twa.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name or twa_run_name(cfg, store_uri, candidates), storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.twa.max_failures), callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    if result.metrics and result.metrics.get("nonfinite_at_step") is not None:
        raise FloatingPointError(
            f"TWA stopped at step {result.metrics['nonfinite_at_step']}: the loss became NaN or Inf "
            f"(try a smaller twa.lr or twa.grad_clip); the last good coefficients are in {result.checkpoint.path}"
        )
    with result.checkpoint.as_directory() as folder:
        final = torch.load(Path(folder) / FINAL_FILE, weights_only=True)
    return TWAResult(
        weights=final["weights"], coefficients=final["coefficients"], rounds=final["rounds"],
        block_names=final["block_names"], history=final["history"],
        projection_bytes=final["projection_bytes"], time_s=final["time_s"], wall_time_s=wall,
        checkpoint_path=result.checkpoint.path,
    )
