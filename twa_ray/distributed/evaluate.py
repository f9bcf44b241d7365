"""Test-split evaluation of weight vectors (candidates, SWA, TWA) in one Ray task.

Each vector is loaded into a fresh model, BatchNorm is recalibrated on the training
data (``train_eval``: train indices, eval transform), and the model is evaluated on
the test split. The task asks for a GPU when the cluster has one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import torch

from ..builders import model_from_config, splits_from_config
from ..config import Config, config_from_dict, config_to_dict
from ..data import calibration_loader
from ..core import assign_flat, recalibrate_bn, swa_vector
from ..evaluation import evaluate
from ..store import CandidateStore

log = logging.getLogger(__name__)

# A source of weights: a store candidate index, the SWA of several, or a (D,) vector.
Source = Union[int, list, torch.Tensor]


@dataclass
class Evaluated:
    accuracy: float  # percent
    loss: float
    state_dict: dict | None = None  # with recalibrated BatchNorm, when asked for


def _vector(source: Source, store: CandidateStore | None) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if store is None:
        raise ValueError("a candidate index needs a store")
    if isinstance(source, int):
        return store.read_flat(source)
    return swa_vector(store.read(candidates=list(source)))


def evaluate_sources(
    cfg: Config, sources: dict[str, Source], store_uri: str | None = None, cwd: str | None = None,
    keep_state: tuple[str, ...] = (),
) -> dict[str, Evaluated]:
    """Evaluate each named source on the test split (in this process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = splits_from_config(cfg, cwd, include_test=True, reason=f"test accuracy of {', '.join(sources)}")
    model = model_from_config(cfg, splits).to(device)
    store = CandidateStore.open(store_uri) if store_uri else None
    bn_loader = calibration_loader(splits.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed)
    out = {}
    for name, source in sources.items():
        assign_flat(model, _vector(source, store).to(device))
        recalibrate_bn(model, bn_loader, device)
        result = evaluate(model, splits.test, device, cfg.data.eval_batch_size)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if name in keep_state else None
        out[name] = Evaluated(result.accuracy, result.loss, state)
        log.info("test accuracy of %s: %.2f%% (loss %.4f)", name, result.accuracy, result.loss)
    return out


def evaluate_on_ray(
    cfg: Config, sources: dict[str, Source], store_uri: str | None = None, cwd: str | None = None,
    keep_state: tuple[str, ...] = (),
) -> dict[str, Evaluated]:
    """``evaluate_sources`` in a Ray task (on a GPU when the cluster has one)."""
    import ray

    from ..ray_env import cluster_has_gpus, worker_runtime_env

    def task(cfg_dict, sources, store_uri, cwd, keep_state):
        logging.basicConfig(level=logging.INFO)
        return evaluate_sources(config_from_dict(cfg_dict), sources, store_uri, cwd, keep_state)

    resources = {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
    remote = ray.remote(**resources, runtime_env=worker_runtime_env() or None)(task)
    return ray.get(remote.remote(config_to_dict(cfg), sources, store_uri, cwd, keep_state))
