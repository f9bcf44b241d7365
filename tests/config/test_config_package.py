"""twa_ray.config as a package (issue 24): every name callers import is still there, one
module per job, each under 500 lines, none importing back up the package."""
import ast
import dataclasses
from pathlib import Path

import pytest

import twa_ray.config
from twa_ray.config import Config, OptimConfig, TrainConfig, TWAConfig, WorkersConfig, config_from_dict, config_to_dict

PACKAGE = Path(twa_ray.config.__file__).parent
# The public names of twa_ray/config.py before it became a package (commit cce4815)
BEFORE = [
    "SHARDINGS", "ConfigError", "SyntheticConfig", "DataConfig", "ModelConfig", "TrainConfig", "PLACEMENT_STRATEGIES",
    "TWAConfig", "BaselinesConfig", "EvalConfig", "ReportConfig", "DebugConfig", "AshaConfig", "TuneConfig",
    "FinetuneConfig", "Config", "STORAGE_ROOT_ENV", "on_cluster", "is_absolute_location", "resolve_storage",
    "parse_candidates", "max_selected", "check_twa_start", "select_candidates", "as_float", "sharding_problems",
    "NAME_CHARACTERS", "is_plain_name", "config_from_dict", "load_config", "config_to_dict", "recorded_config",
    "differing_settings", "dotted_settings", "settings_fingerprint",
]
MODULES = ("schema", "windows", "locations", "validate", "load", "fingerprints")


@pytest.mark.parametrize("name", BEFORE)
def test_every_name_importable_before_is_still_in_twa_ray_config(name):
    assert name in twa_ray.config.__all__
    namespace: dict = {}
    exec(f"from twa_ray.config import {name}", namespace)
    assert namespace[name] is getattr(twa_ray.config, name)


def test_all_names_only_what_is_there():
    assert len(set(twa_ray.config.__all__)) == len(twa_ray.config.__all__)
    assert all(hasattr(twa_ray.config, name) for name in twa_ray.config.__all__)
    star: dict = {}
    exec("from twa_ray.config import *", star)
    assert set(twa_ray.config.__all__) <= set(star)


def _package_imports(module: str) -> set[str]:
    """The modules of the package that ``module`` imports (``from .x import``, ``from . import x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("twa_ray.config."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_one_module_per_job_none_over_500_lines():
    files = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert files == sorted(("__init__",) + MODULES)
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_no_import_circle_inside_the_package():
    """Each module imports only modules listed before it in MODULES: no circle, and none
    imports the package's __init__ (which imports them all)."""
    for i, module in enumerate(MODULES):
        imported = _package_imports(module)
        assert imported <= set(MODULES[:i]), f"{module} imports {sorted(imported - set(MODULES[:i]))}"


# ---------------------------------------------------------------- train and twa share their fields

def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_train_and_twa_share_one_optim_config_and_one_workers_config():
    """A field added to OptimConfig or WorkersConfig is a field (and a YAML key) of both
    stages; the fields both stages have are exactly those: none declared twice to drift."""
    for shared in (OptimConfig, WorkersConfig):
        assert issubclass(TrainConfig, shared) and issubclass(TWAConfig, shared)
        for stage in (TrainConfig, TWAConfig):
            assert set(_names(shared)) <= set(_names(stage)), (shared.__name__, stage.__name__)
    common = set(_names(TrainConfig)) & set(_names(TWAConfig))
    assert common == set(_names(OptimConfig)) | set(_names(WorkersConfig))
    for name in _names(OptimConfig) + _names(WorkersConfig):  # YAML keys of both stages
        for stage in ("train", "twa"):
            value = getattr(getattr(Config(), stage), name)
            cfg = config_from_dict({stage: {name: value}})
            assert getattr(getattr(cfg, stage), name) == value


def test_stage_defaults_that_differ_stay_different():
    train, twa = TrainConfig(), TWAConfig()
    assert (train.epochs, train.lr, train.weight_decay, train.schedule) == (10, 0.05, 5e-4, "step")
    assert (twa.epochs, twa.lr, twa.weight_decay, twa.schedule) == (2, 0.1, 0.0, "cosine")
    for name in ("optimizer", "momentum", "nesterov", "warmup", "label_smoothing", "grad_clip", "workers",
                 "sharding", "use_gpu", "cpus_per_worker", "max_failures"):
        assert getattr(train, name) == getattr(twa, name), name


def test_the_yaml_keys_of_train_and_twa_are_unchanged():
    raw = config_to_dict(Config())
    assert sorted(raw["train"]) == sorted([
        "epochs", "budget_epochs", "workers", "sharding", "cpus_per_worker", "max_failures", "use_gpu", "optimizer",
        "lr", "momentum", "weight_decay", "nesterov", "schedule", "warmup", "milestones", "gamma", "final_lr_factor",
        "swa_start", "label_smoothing", "grad_clip", "save_initial", "save_every_steps", "save_from_epoch",
        "placement_strategy",  # the one key added: train's workers are placed as twa's are
        "candidates_from"])  # issue 26: candidates from the weights (default) or their EMA
    assert sorted(raw["twa"]) == sorted([
        "workers", "sharding", "use_gpu", "bits", "granularity", "basis", "start", "data", "select_ratio",
        "select_eval", "epochs", "lr", "optimizer", "momentum", "weight_decay", "nesterov", "schedule", "warmup",
        "batch_size", "candidates", "candidates_per_round", "label_smoothing", "grad_clip", "bn_batches",
        "max_chunk_bytes", "kernel", "exchange", "checkpoint_every_steps", "cpus_per_worker", "placement_strategy",
        "max_failures"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=0", "train.lr: 0.0 is not > 0"), ("twa.lr=-1", "twa.lr: -1.0 is not > 0"),
    ("train.workers=0", "train.workers: 0 is not >= 1"), ("twa.warmup=1", "twa.warmup: 1.0 is not in [0, 1)"),
    ("train.epochs=-1", "train.epochs: -1 is too small"), ("twa.epochs=0", "twa.epochs: 0 is too small"),
    ("train.optimizer=lion", "train.optimizer: 'lion' is not one of"),
])
def test_the_shared_fields_are_checked_in_both_stages_naming_the_stage(override, message):
    with pytest.raises(twa_ray.config.ConfigError) as err:
        config_from_dict({}, "cfg", [override])
    assert f"cfg: {message}" in str(err.value)


def test_the_placement_strategy_is_a_worker_setting_of_both_stages():
    """train.placement_strategy joined twa's (a WorkersConfig field): checked in both, naming the stage."""
    from twa_ray.config import ConfigError, WorkersConfig

    assert "placement_strategy" in {f.name for f in dataclasses.fields(WorkersConfig)}
    cfg = config_from_dict({"train": {"placement_strategy": "SPREAD"}})
    assert (cfg.train.placement_strategy, cfg.twa.placement_strategy) == ("SPREAD", "PACK")
    for stage in ("train", "twa"):
        with pytest.raises(ConfigError, match=rf"{stage}.placement_strategy: 'EVERYWHERE' is not one of"):
            config_from_dict({stage: {"placement_strategy": "EVERYWHERE"}})
