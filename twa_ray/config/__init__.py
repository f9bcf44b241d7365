"""One typed config for every job: dataclasses loaded from YAML, with ``a.b=value`` overrides.

    cfg = load_config("configs/quickstart.yaml", ["twa.bits=4", "train.epochs=3"])
    cfg = settle_locations(cfg)  # a job's driver, once: every location absolute

One module per job, each importing only those before it:

    schema        the dataclasses (``train`` and ``twa`` share ``OptimConfig`` and ``WorkersConfig``)
    windows       the candidate-window grammar of ``twa.candidates`` ("all", "last:3", "stride:2")
    locations     the storage root, and every location settled absolute once, where a job loads
    validate      what makes a well-typed config invalid, each problem naming its key
    load          YAML, overrides, types; all problems raised together as one ConfigError
    fingerprints  same settings? config dicts compared (locations aside) and hashed
"""
from __future__ import annotations

from .fingerprints import (LOCATION_KEYS, config_to_dict, differing_settings, dotted_settings, recorded_config,
                           settings_fingerprint, without_locations)
from .load import as_float, config_from_dict, load_config
from .locations import (STORAGE_ROOT_ENV, is_absolute_location, on_cluster, resolve_storage, settle_locations,
                        unsettled_locations)
from .schema import (PLACEMENT_STRATEGIES, SHARDINGS, AshaConfig, BaselinesConfig, Config, ConfigError, DataConfig,
                     DebugConfig, EvalConfig, FinetuneConfig, ModelConfig, OptimConfig, ReportConfig, SyntheticConfig,
                     TrainConfig, TuneConfig, TWAConfig, WorkersConfig)
from .validate import NAME_CHARACTERS, config_problems, is_plain_name, sharding_problems
from .windows import check_twa_start, max_selected, parse_candidates, select_candidates

__all__ = [
    # schema
    "Config", "ConfigError", "SyntheticConfig", "DataConfig", "ModelConfig", "OptimConfig", "WorkersConfig",
    "TrainConfig", "TWAConfig", "BaselinesConfig", "EvalConfig", "ReportConfig", "DebugConfig", "AshaConfig",
    "TuneConfig", "FinetuneConfig", "SHARDINGS", "PLACEMENT_STRATEGIES",
    # windows
    "parse_candidates", "max_selected", "select_candidates", "check_twa_start",
    # locations
    "STORAGE_ROOT_ENV", "on_cluster", "is_absolute_location", "resolve_storage", "settle_locations",
    "unsettled_locations",
    # validate
    "NAME_CHARACTERS", "is_plain_name", "sharding_problems", "config_problems",
    # load
    "as_float", "config_from_dict", "load_config",
    # fingerprints
    "LOCATION_KEYS", "config_to_dict", "recorded_config", "without_locations", "differing_settings",
    "dotted_settings", "settings_fingerprint",
]
