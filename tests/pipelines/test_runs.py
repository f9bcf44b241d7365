"""A run folder's life (``pipelines.runs``) and the main job's "same candidates?" check, without Ray."""
import json

import pytest

from twa_ray.config import config_from_dict, config_to_dict
from twa_ray.pipelines.main import ensure_candidates
from twa_ray.pipelines.runs import finished_run, prepare_run_dir, record_config
from twa_ray.store import CandidateStore


def _cfg(tmp_path, **extra):
    return config_from_dict({"output_dir": str(tmp_path / "run"), "seed": 1, **extra})


def test_a_run_is_finished_only_with_its_summary_and_the_same_config(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = prepare_run_dir(cfg)
    record_config(cfg, run_dir)
    assert not finished_run(cfg, run_dir)  # no summary.json yet
    (run_dir / "summary.json").write_text("{}")
    assert finished_run(cfg, run_dir)
    assert not finished_run(_cfg(tmp_path, twa={"bits": 4}), run_dir)
    (run_dir / "config.json").write_text("{not json")
    assert not finished_run(cfg, run_dir)
    assert not (prepare_run_dir(cfg, force=True) / "summary.json").exists()


def test_a_store_of_other_candidates_is_named_before_any_training(tmp_path):
    cfg = _cfg(tmp_path, data={"root": "data/somewhere"})
    stored = config_to_dict(cfg)
    stored["data"]["root"] = str(tmp_path / "elsewhere")  # where the files were read from is no setting
    stored["data"]["limit_train"] = 7
    stored["train"]["lr"] = 0.5
    CandidateStore.create(cfg.store_uri, ["w"], [(2,)], meta={"config": json.loads(json.dumps(stored))})
    with pytest.raises(ValueError, match=r"candidate store .*candidates was made with other settings \(data, train differ\)"):
        ensure_candidates(cfg)


def test_a_complete_store_of_the_same_settings_is_reused(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, data={"root": "data"}, train={"epochs": 2})
    stored = config_to_dict(cfg)
    stored["data"]["root"] = "/another/checkout/data"  # a moved checkout or a job's working dir
    store = CandidateStore.create(cfg.store_uri, ["w"], [(2,)], meta={"config": json.loads(json.dumps(stored))})
    store.append({"w": torch.zeros(2)}, info={"kind": "epoch", "epoch": 2, "metrics": {"val_acc": 40.0}})
    base = ensure_candidates(cfg)
    assert (base.store_uri, base.num_candidates, base.metrics) == (cfg.store_uri, 1, [{"val_acc": 40.0}])
