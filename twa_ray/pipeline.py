"""The stages of the main job, as library calls the job script strings together."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .config import Config, config_to_dict
from .distributed.evaluate import Evaluated, evaluate_on_ray
from .run_folder import write_json
from .store import CandidateStore

log = logging.getLogger(__name__)

# Config sections that decide what base training produces: a store made with other
# values holds other candidates.
CANDIDATE_SECTIONS = ("seed", "data", "model", "train")


def prepare_run_dir(cfg: Config, force: bool = False) -> Path:
    """Create the run folder; with ``force`` first remove what an earlier run left in it."""
    run_dir = Path(cfg.run_dir).resolve()
    if force and run_dir.exists():
        log.warning("--force: removing the earlier results in %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_inputs(cfg: Config) -> None:
    """Fail early, in the driver, with the data/model errors workers would hit: a missing
    dataset (naming where it looked), a val_ratio giving an empty split, an unknown model."""
    from .builders import model_from_config, splits_from_config

    splits = splits_from_config(cfg)
    model_from_config(cfg, splits)


def finished_run(cfg: Config, run_dir: Path) -> bool:
    """True when ``run_dir`` holds a complete run (summary.json) of exactly this config."""
    summary, recorded = run_dir / "summary.json", run_dir / "config.json"
    if not (summary.exists() and recorded.exists()):
        return False
    try:
        return json.loads(recorded.read_text()) == json.loads(json.dumps(config_to_dict(cfg)))
    except ValueError:
        return False


def record_config(cfg: Config, run_dir: Path) -> None:
    """The config a run folder was made with (compared by ``finished_run``)."""
    write_json(run_dir / "config.json", config_to_dict(cfg))


def _candidate_settings(raw: dict) -> dict:
    out = {k: raw.get(k) for k in CANDIDATE_SECTIONS}
    if isinstance(out.get("data"), dict):
        data = dict(out["data"])
        root = data.get("root") or ""
        data["root"] = root if "://" in root else os.path.abspath(root)
        out["data"] = data
    return out


def ensure_candidates(cfg: Config):
    """The base-training result behind ``cfg.store_uri``: reused when the store is complete
    for the same settings, else (re)made by base training on Ray Train (which resumes a
    partial run). A store made with different settings is an error naming the section."""
    from .distributed.base_train import BaseTrainResult, run_base_training

    uri = cfg.store_uri if "://" in cfg.store_uri else os.path.abspath(cfg.store_uri)
    try:
        store = CandidateStore.open(uri)
    except FileNotFoundError:
        return run_base_training(cfg)
    stored = _candidate_settings(store.meta.get("config", {}))
    wanted = _candidate_settings(config_to_dict(cfg))
    differ = [k for k in CANDIDATE_SECTIONS if stored.get(k) != wanted.get(k)]
    if differ:
        raise ValueError(
            f"the candidate store {uri} was made with other settings ({', '.join(differ)} differ): "
            "run with --force to start afresh, or choose another output_dir or store"
        )
    infos = [c.info for c in store.list_candidates()]
    epochs = [i for i in infos if i.get("kind") == "epoch"]
    if not any(i.get("epoch") == cfg.train.epochs for i in epochs):
        return run_base_training(cfg)
    log.info("reusing the %d candidates in %s", len(infos), uri)
    return BaseTrainResult(uri, len(infos), [i.get("metrics", {}) for i in epochs], 0.0)


def evaluate_run(cfg: Config, store_uri: str, twa, full=None) -> dict[str, Evaluated]:
    """Test accuracy of every stored candidate ("cand:<index>"), the last chosen candidate
    ("last"), SWA of the chosen candidates ("swa"), TWA ("twa", with its state_dict) and the
    full-budget run's final weights ("full_budget")."""
    chosen = sorted({c for r in twa.rounds for c in r})
    store = CandidateStore.open(store_uri)
    sources: dict = {f"cand:{c}": c for c in store.candidate_indices()}
    sources.update({"last": chosen[-1], "swa": chosen, "twa": twa.weights})
    results = evaluate_on_ray(cfg, sources, store_uri, os.getcwd(), keep_state=("twa",))
    if full is not None:
        full_store = CandidateStore.open(full.store_uri)
        last = full_store.candidate_indices()[-1]
        results.update(evaluate_on_ray(cfg, {"full_budget": last}, full.store_uri, os.getcwd()))
    return results


def candidate_curve(store_uri: str, results: dict[str, Evaluated], prefix: str = "cand:") -> tuple[list, list]:
    """(epochs, test accuracies) of the candidates evaluated under ``prefix``."""
    store = CandidateStore.open(store_uri)
    points = sorted(
        (float(c.info.get("epoch", c.index)), results[f"{prefix}{c.index}"].accuracy)
        for c in store.list_candidates() if f"{prefix}{c.index}" in results
    )
    return [p[0] for p in points], [p[1] for p in points]


def twa_summary(cfg: Config, base, twa, full, results: dict[str, Evaluated]) -> dict:
    """summary.json of the main job."""
    return {
        "config": cfg.name,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "num_candidates": len({c for r in twa.rounds for c in r}),
        "rounds": len(twa.rounds),
        "bits": cfg.twa.bits,
        "granularity": cfg.twa.granularity,
        "basis": cfg.twa.basis,
        "twa_data": cfg.twa.data,
        "workers": cfg.twa.workers,
        "base_epochs": cfg.train.epochs,
        "budget_epochs": cfg.train.schedule_epochs,
        "twa_epochs": cfg.twa.epochs,
        "test_acc": {
            "last": results["last"].accuracy,
            "swa": results["swa"].accuracy,
            "twa": results["twa"].accuracy,
            "full_budget": results["full_budget"].accuracy if "full_budget" in results else None,
        },
        "test_loss": {k: results[k].loss for k in ("last", "swa", "twa", "full_budget") if k in results},
        "time_s": {
            "base_train": base.wall_time_s,
            "twa": twa.wall_time_s,
            "twa_in_workers": twa.time_s,
            "full_budget": full.wall_time_s if full is not None else None,
        },
        "projection_bytes_per_worker": [int(b) for b in twa.projection_bytes],
        "store": base.store_uri,
    }
