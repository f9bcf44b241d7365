"""Sharded TWA on Ray Train: the driver (:func:`run_twa`) that launches the workers of
``twa_loop`` (``trainer.torch_trainer``) and reads their result.

    from twa_ray.config import load_config
    from twa_ray.runtime.ray_env import init_ray
    from twa_ray.runtime.twa_train import run_twa

    init_ray()
    cfg = load_config("configs/quickstart.yaml")
    result = run_twa(cfg)  # the candidates base training left in cfg.store_uri
    print(result.coefficients[0].shape, result.history[-1])
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from ..config import (Config, check_twa_start, config_to_dict, select_candidates, settings_fingerprint, settle_locations,
                      sharding_problems, without_locations)
from ..core.blocks import make_blocks
from ..parallel.sharding import sharding_mode
from ..store import CandidateStore
from ..store import fs as store_fs
from .checkpoints import load_ray_checkpoint
from .trainer import WorkerGroup, torch_trainer
from .twa_loop import FINAL_FILE, twa_train_loop


@dataclass
class TWAResult:
    """What a TWA run returns to the driver."""

    weights: torch.Tensor  # (D,) the final w(X)
    coefficients: list[torch.Tensor]  # per round: (n_r, L)
    rounds: list[list[int]]  # candidate indices of each round
    block_names: list[str]
    history: list[dict] = field(default_factory=list)
    projection_bytes: list[int] = field(default_factory=list)  # per worker
    param_bytes: list[int] = field(default_factory=list)  # per worker: its trainable parameters (FSDP: its shards)
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
    check_twa_start(cfg.twa, len(chosen))
    return chosen


def twa_run_name(cfg: Config, store_uri: str, candidates: list[int]) -> str:
    """Deterministic per (TWA settings, data, model, candidates): a re-run resumes, a change starts afresh."""
    raw = config_to_dict(cfg)
    key = {"twa": raw["twa"], "data": without_locations(raw)["data"], "model": raw["model"], "seed": cfg.seed, "store": store_uri,
           "candidates": candidates, "debug": raw["debug"]}
    return f"{cfg.name}-twa-{settings_fingerprint(key)}"


def run_twa(
    cfg: Config,
    store_uri: str | None = None,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
) -> TWAResult:
    """Run sharded TWA on ``cfg.twa.workers`` Ray Train workers and return the result."""
    cfg = settle_locations(cfg)  # a job's config is settled already; workers run in another cwd
    store_uri = store_uri or cfg.store_uri
    store = CandidateStore.open(store_uri)
    candidates = chosen_candidates(cfg, store)
    num_blocks = len(make_blocks(store.numels, cfg.twa.granularity))
    problems = sharding_problems(cfg.twa)  # again: a sweep sets twa.select_eval after validation
    if problems:
        raise ValueError(f"twa.sharding={cfg.twa.sharding!r}: " + "; ".join(problems))
    sharding_mode(cfg.twa.sharding).check_workers(cfg.twa.workers, num_blocks, cfg.twa.granularity)
    batch_size = cfg.twa.batch_size or cfg.data.batch_size
    if batch_size < cfg.twa.workers:
        raise ValueError(f"a global batch of {batch_size} (twa.batch_size or data.batch_size) leaves some of the "
                         f"twa.workers={cfg.twa.workers} workers without an example")
    run_dir = cfg.run_dir
    storage = storage_path or cfg.ray_storage
    trainer = torch_trainer(
        twa_train_loop,
        {"cfg": config_to_dict(cfg), "store_uri": store_uri, "candidates": candidates, "cwd": os.getcwd(),
         "marker_dir": store_fs.join(run_dir, "debug")},
        WorkerGroup.of(cfg.twa), name=run_name or twa_run_name(cfg, store_uri, candidates), storage_path=storage,
        max_failures=cfg.twa.max_failures, callbacks=callbacks,
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    if result.metrics and result.metrics.get("nonfinite_at_step") is not None:
        raise FloatingPointError(
            f"TWA stopped at step {result.metrics['nonfinite_at_step']}: the loss became NaN or Inf "
            f"(try a smaller twa.lr or twa.grad_clip); the last good coefficients are in "
            f"{store_fs.location_of(storage, result.checkpoint.path)}"
        )
    final, _ = load_ray_checkpoint(result.checkpoint, name=FINAL_FILE)  # that file only, not the shards beside it
    return TWAResult(
        weights=final["weights"], coefficients=final["coefficients"], rounds=final["rounds"],
        block_names=final["block_names"], history=final["history"],
        projection_bytes=final["projection_bytes"], param_bytes=final.get("param_bytes", []), time_s=final["time_s"],
        wall_time_s=wall,
        checkpoint_path=store_fs.location_of(storage, result.checkpoint.path),
    )
