"""Base training's candidates: rank 0 decides which steps save one and with what info, and
writes whole candidates (``sharding: blocks``); under ``sharding: fsdp`` every rank writes
its rows of the same candidates (``fsdp_candidates.RowCandidateWriter``) and rank 0's writer
still decides."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from ...config import Config, config_to_dict
from ...data import DataSplits
from ...store import CandidateStore

log = logging.getLogger(__name__)

STAGE = "base_train"  # the stage every base-training candidate's info names


class CandidateWriter:
    """Rank 0's writes into the candidate store; skips steps the store already holds (resume)."""

    def __init__(self, cfg: Config, net: nn.Module, model_spec: dict, steps_per_epoch: int, resumed: bool,
                 run_storage: str) -> None:
        meta = {
            "config": config_to_dict(cfg), "stage": STAGE, "task": cfg.task,
            "model_spec": model_spec,  # tasks.model_spec: what builds the model
            "base_run": run_storage,  # its last checkpoint: the EMA and where the full budget continues
        }
        self.store = CandidateStore.create_for_model(cfg.store_uri, net, meta=meta, exist_ok=True)
        self.steps_per_epoch = steps_per_epoch
        self.save_from_epoch = cfg.train.save_from_epoch
        self.saved_steps = {c.info.get("step") for c in self.store.list_candidates()
                            if c.info.get("stage", STAGE) == STAGE}
        later = [s for s in self.saved_steps if isinstance(s, int) and s > 0]
        if not resumed and later:
            log.warning("store %s already holds base-training candidates up to step %d while this run starts "
                        "without a checkpoint: they are kept and those steps are not written again (expected "
                        "when a restarted group replays its first epoch; for a new experiment use a new "
                        "output_dir or store)", self.store.uri, max(later))

    def info_for(self, *, kind: str, step: int, lr: float, metrics: dict) -> dict | None:
        """The info of the candidate due at ``step``; None when none is (before
        ``save_from_epoch``, or the store already holds that step)."""
        epoch = step / self.steps_per_epoch  # float for candidates inside an epoch
        if epoch < self.save_from_epoch or step in self.saved_steps:
            return None
        return {"stage": STAGE, "kind": kind, "epoch": round(epoch) if kind != "step" else epoch,
                "step": step, "lr": lr, "metrics": metrics}

    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict,
             weights: Sequence[torch.Tensor] | None = None) -> None:
        """Save ``net``'s trainable parameters as the candidate due at ``step`` (if any), or
        ``weights`` instead: one tensor per trainable parameter, in their order (the EMA's,
        ``train.candidates_from: ema``)."""
        info = self.info_for(kind=kind, step=step, lr=lr, metrics=metrics)
        if info is None:
            return
        if weights is None:
            self.saved(self.store.append_model(net, info), info)
        else:
            names = [n for n, p in net.named_parameters() if p.requires_grad]
            if len(names) != len(weights):
                raise ValueError(f"{len(weights)} candidate tensors for {len(names)} trainable parameters")
            self.saved(self.store.append(dict(zip(names, weights)), info), info)

    def saved(self, index: int, info: dict) -> None:
        """Record that candidate ``index`` with ``info`` is in the store."""
        self.saved_steps.add(info["step"])
        log.debug("candidate %d: %s", index, info)

    def checkpoint_info(self) -> dict:
        """What each checkpoint's info records of the writes: nothing more than the store holds."""
        return {}
