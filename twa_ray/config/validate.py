"""What makes a well-typed config invalid: values outside their choices or ranges, and
settings that rule each other out. Each problem is one line naming its dotted key;
``config_problems`` returns them all (``load.config_from_dict`` raises them together)."""
from __future__ import annotations

import re

from ..core.blocks import parse_granularity
from ..core.collectives import EXCHANGES
from ..core.kernels import kernel_names
from ..core.quant import BITS
from ..core.row_shards import ROW_BASES
from ..core.schedules import OPTIMIZERS, SCHEDULES
from ..core.subspace import BASES, RAW_BASES, check_start
from .locations import is_absolute_location
from .schema import CANDIDATES_FROM, PLACEMENT_STRATEGIES, SHARDINGS, Config, TrainConfig, TWAConfig
from .windows import max_selected, parse_candidates

NAME_CHARACTERS = "letters, digits and . _ + -"  # what a plain name (``name``) is made of


def is_plain_name(name: str) -> bool:
    """True for a plain folder name: non-empty, only ``NAME_CHARACTERS`` (no path separator,
    no space), and not ``.`` or ``..``. ``name`` makes the default run folder runs/<name>,
    which ``--force`` may remove, and Ray's run names."""
    return bool(re.fullmatch(r"[A-Za-z0-9._+-]+", name)) and name not in (".", "..")


def _start_problems(twa: TWAConfig) -> list[str]:
    """What is wrong with twa.start, as far as the config alone tells (the store may tell more:
    ``check_twa_start``)."""
    try:
        check_start(twa.start)
    except ValueError as exc:
        return [str(exc)]
    if twa.start != "mean" and twa.basis not in RAW_BASES:
        return [f"{twa.start!r} needs twa.basis: checkpoints (the journal bases start at the mean, X = 0)"]
    if isinstance(twa.start, int):  # the most candidates the settings allow, before any store exists
        try:
            window = max_selected(twa.candidates)
        except ValueError:  # reported under twa.candidates
            window = None
        bounds = [b for b in (window, twa.candidates_per_round) if b is not None]
        if bounds and twa.start >= min(bounds):
            return [f"{twa.start} is out of range: twa.candidates={twa.candidates!r} and twa.candidates_per_round="
                    f"{twa.candidates_per_round} leave at most {min(bounds)} candidates (indices 0..{min(bounds) - 1})"]
    return []


def sharding_problems(twa: TWAConfig) -> list[str]:
    """What twa.sharding rules out among the other twa settings."""
    if twa.sharding not in SHARDINGS:
        return [f"{twa.sharding!r} is not one of {list(SHARDINGS)}"]
    if twa.sharding != "fsdp":
        return []
    problems = []
    if twa.basis not in ROW_BASES:
        problems.append(f"'fsdp' does not support twa.basis: {twa.basis} (it supports {list(ROW_BASES)}; "
                        "use twa.sharding: blocks)")
    if twa.select_eval:
        problems.append("'fsdp' does not support twa.select_eval (per-epoch selection scores); "
                        "use twa.sharding: blocks")
    if twa.exchange != "auto":
        problems.append(f"'fsdp' does not support twa.exchange: {twa.exchange} (FSDP2 makes its own "
                        "collectives); use twa.sharding: blocks")
    return problems


def _stage_problems(section: str, stage: TrainConfig | TWAConfig, min_epochs: int) -> list[tuple[str, str]]:
    """(key, problem) of the fields a stage (``train``, ``twa``) shares with the other one
    (``OptimConfig``, ``WorkersConfig``)."""
    checks = [
        (stage.optimizer in OPTIMIZERS, "optimizer", f"{stage.optimizer!r} is not one of {list(OPTIMIZERS)}"),
        (stage.schedule in SCHEDULES, "schedule", f"{stage.schedule!r} is not one of {list(SCHEDULES)}"),
        (stage.workers >= 1, "workers", f"{stage.workers} is not >= 1"),
        (stage.epochs >= min_epochs, "epochs", f"{stage.epochs} is too small"),
        (stage.lr > 0, "lr", f"{stage.lr} is not > 0"),
        (0.0 <= stage.warmup < 1.0, "warmup", f"{stage.warmup} is not in [0, 1)"),
        (stage.placement_strategy in PLACEMENT_STRATEGIES, "placement_strategy",
         f"{stage.placement_strategy!r} is not one of {list(PLACEMENT_STRATEGIES)}"),
    ]
    return [(f"{section}.{key}", message) for ok, key, message in checks if not ok]


def config_problems(cfg: Config, where: str) -> list[str]:
    """Every problem of a config whose fields have their types, one line each:
    ``<where>: <dotted key>: <problem>``."""
    errors = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{where}: {key}: {message}")

    check(is_plain_name(cfg.name), "name",
          f"{cfg.name!r} is not a plain name ({NAME_CHARACTERS}; not empty, '.' or '..'): "
          "it names the run folder runs/<name>")
    check(cfg.twa.bits in BITS, "twa.bits", f"{cfg.twa.bits} is not one of {list(BITS)}")
    check(cfg.twa.basis in BASES, "twa.basis", f"{cfg.twa.basis!r} is not one of {list(BASES)}")
    check(cfg.twa.kernel in kernel_names(), "twa.kernel", f"{cfg.twa.kernel!r} is not one of {list(kernel_names())}")
    check(cfg.twa.exchange in EXCHANGES, "twa.exchange", f"{cfg.twa.exchange!r} is not one of {list(EXCHANGES)}")
    errors += [f"{where}: twa.start: {problem}" for problem in _start_problems(cfg.twa)]
    errors += [f"{where}: twa.sharding: {problem}" for problem in sharding_problems(cfg.twa)]
    try:
        parse_granularity(cfg.twa.granularity)
    except ValueError as exc:
        errors.append(f"{where}: twa.granularity: {exc}")
    try:
        parse_candidates(cfg.twa.candidates)
    except ValueError as exc:
        errors.append(f"{where}: twa.candidates: {exc}")
    check(cfg.twa.data in ("train", "val"), "twa.data", f"{cfg.twa.data!r} is not 'train' or 'val'")
    check(0.0 <= cfg.data.val_ratio < 1.0, "data.val_ratio", f"{cfg.data.val_ratio} is not in [0, 1)")
    check(
        cfg.twa.data != "val" or cfg.data.val_ratio > 0,
        "twa.data", "'val' (TWA-v) needs data.val_ratio > 0",
    )
    for section, stage, min_epochs in (("train", cfg.train, 0), ("twa", cfg.twa, 1)):
        for key, message in _stage_problems(section, stage, min_epochs):
            check(False, key, message)
    check(cfg.train.candidates_from in CANDIDATES_FROM, "train.candidates_from",
          f"{cfg.train.candidates_from!r} is not one of {list(CANDIDATES_FROM)}")
    check(cfg.train.sharding in SHARDINGS, "train.sharding", f"{cfg.train.sharding!r} is not one of {list(SHARDINGS)}")
    check(
        cfg.train.budget_epochs is None or cfg.train.budget_epochs >= cfg.train.epochs,
        "train.budget_epochs", f"{cfg.train.budget_epochs} is less than train.epochs={cfg.train.epochs}",
    )
    check(
        cfg.twa.candidates_per_round is None or cfg.twa.candidates_per_round >= 2,
        "twa.candidates_per_round", f"{cfg.twa.candidates_per_round} is not >= 2 (a subspace needs two candidates)",
    )
    check(0.0 <= cfg.twa.select_ratio < 1.0, "twa.select_ratio", f"{cfg.twa.select_ratio} is not in [0, 1)")
    check(cfg.tune.mode in (None, "max", "min"), "tune.mode", f"{cfg.tune.mode!r} is not 'max', 'min' or null")
    check(cfg.data.batch_size >= 1, "data.batch_size", f"{cfg.data.batch_size} is not >= 1")
    check(0.0 <= cfg.baselines.ema_decay < 1.0, "baselines.ema_decay", f"{cfg.baselines.ema_decay} is not in [0, 1)")
    check(cfg.baselines.best_k >= 1, "baselines.best_k", f"{cfg.baselines.best_k} is not >= 1")
    check(cfg.eval.workers is None or cfg.eval.workers >= 1, "eval.workers", f"{cfg.eval.workers} is not >= 1")
    check(cfg.storage_root is None or is_absolute_location(cfg.storage_root), "storage_root",
          f"{cfg.storage_root!r} is not an absolute path or a URI (e.g. /shared/twa or s3://bucket/prefix)")
    return errors
