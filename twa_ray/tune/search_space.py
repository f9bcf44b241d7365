"""From the config's ``tune.space`` to a Ray Tune param space, and trial params back to configs.

    tune:
      space:
        twa.lr: {loguniform: [0.01, 1.0]}
        twa.candidates: {grid: ["all", "last:3", "stride:2"]}
        twa.bits: {choice: [4, 8]}

Keys are dotted config keys; each trial's params override the base config, so every
value goes through the same validation as a YAML file (an invalid candidate names the
key and the value).
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

from ..config import Config, ConfigError, as_float, config_from_dict, config_to_dict

KINDS = ("grid", "choice", "loguniform", "uniform")


def _check_entry(key: str, spec: Any) -> tuple[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"tune.space.{key}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tune.space.{key}.{kind}: expected a non-empty list, got {values!r}")
    else:  # bounds in any float notation, as float fields take them (YAML reads 1e-4 as a string)
        bounds = [as_float(v) for v in values] if isinstance(values, list) and len(values) == 2 else [None]
        if None in bounds or bounds[0] >= bounds[1] or (kind == "loguniform" and bounds[0] <= 0):
            raise ConfigError(f"tune.space.{key}.{kind}: expected [low, high] with 0 < low < high, got {values!r}")
        values = bounds
    return kind, values


def apply_params(base: dict, params: dict, where: str = "tune trial") -> Config:
    """The base config dict with each dotted ``params`` key set, validated."""
    return config_from_dict(copy.deepcopy(base), where, [f"{k}={json.dumps(v)}" for k, v in params.items()])


def validate_space(cfg: Config) -> None:
    """Every key and every listed value must make a valid config (errors name them)."""
    base = config_to_dict(cfg)
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one config key to search over")
    for key, spec in cfg.tune.space.items():
        kind, values = _check_entry(key, spec)
        for value in values if kind in ("grid", "choice") else values[:1]:
            try:
                apply_params(base, {key: value}, f"tune.space.{key}")
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: candidate value {value!r} is invalid:\n{exc}") from None


def param_space(cfg: Config) -> dict:
    """``tune.space`` as Ray Tune primitives (grid_search, choice, loguniform, uniform)."""
    from ray import tune

    validate_space(cfg)
    build = {"grid": tune.grid_search, "choice": tune.choice,
             "loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v)}
    return {key: build[_check_entry(key, spec)[0]](_check_entry(key, spec)[1]) for key, spec in cfg.tune.space.items()}


def num_trials(cfg: Config) -> int:
    """Grid points x num_samples."""
    grid = [len(v["grid"]) for v in cfg.tune.space.values() if isinstance(v, dict) and "grid" in v]
    return math.prod(grid) * cfg.tune.num_samples


def trial_concurrency(cfg: Config, cpus: float, gpus: float) -> int:
    """Trials that fit at once: each needs its driver's CPUs plus twa.workers workers."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = max_workers(cfg)
    if gpus >= 1:
        return max(1, int(gpus // workers))
    per_trial = cfg.tune.trial_cpus + workers * trial_cpus_per_worker(cfg)
    return max(1, int(cpus // per_trial + 1e-9))


def trial_cpus_per_worker(cfg: Config) -> float:
    """CPUs each TWA worker of a trial reserves: twa.cpus_per_worker, 1 when unset (the
    main job's default of a node's CPUs per worker would leave no room for the trial's driver)."""
    return cfg.twa.cpus_per_worker if cfg.twa.cpus_per_worker is not None else 1.0


def max_workers(cfg: Config) -> int:
    spec = cfg.tune.space.get("twa.workers")
    if isinstance(spec, dict) and ("grid" in spec or "choice" in spec):
        return max(int(v) for v in next(iter(spec.values())))
    return cfg.twa.workers


def max_epochs(cfg: Config) -> int:
    """Most TWA epochs a trial can report (ASHA's max_t)."""
    spec = cfg.tune.space.get("twa.epochs")
    if isinstance(spec, dict) and ("grid" in spec or "choice" in spec):
        return max(int(v) for v in next(iter(spec.values())))
    if isinstance(spec, dict):
        return int(next(iter(spec.values()))[1])
    return cfg.twa.epochs


def settle_objective(cfg: Config) -> Config:
    """``cfg`` with ``tune.metric`` and ``tune.mode`` set where the config left them open:
    ``select_<the task's metric>``, maximised when higher is better (image classification:
    select_acc, max). Raises TaskError (in the driver) when the task does not load."""
    import dataclasses

    from ..tasks import task_from_config

    if cfg.tune.metric is not None and cfg.tune.mode is not None:
        return cfg
    task = task_from_config(cfg)
    metric = cfg.tune.metric or f"select_{task.metric}"
    if cfg.tune.mode is not None:
        mode = cfg.tune.mode
    elif metric.endswith("_loss"):
        mode = "min"
    else:
        mode = "max" if task.higher_is_better else "min"
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, metric=metric, mode=mode))
