"""The sweep job's last stage (jobs/tune_twa.py): the test split, read once, for the best trial."""
from __future__ import annotations

import os

from ..config import Config, config_to_dict
from ..runtime.evaluation import Evaluated, evaluate_on_ray
from ..runtime.tasks import wait_for_slot
from ..tune.search_space import apply_params


def evaluate_best_trial(cfg: Config, sweep) -> Evaluated:
    """The task's test metric of the best trial's final TWA weights (with its parameters
    applied to ``cfg``); recorded as ``sweep.best["test_<metric>"]`` (``test_acc`` for image
    classification)."""
    from ..tune.sweep import best_weights  # imports Ray: after init_ray

    best_cfg = apply_params(config_to_dict(cfg), sweep.best["params"])
    wait_for_slot()  # the trials' resources are freed as Tune stops them: say so if one never is
    result = evaluate_on_ray(best_cfg, {"twa": best_weights(sweep.best)}, None, os.getcwd())["twa"]
    sweep.best[f"test_{result.metric}"] = result.value
    return result
