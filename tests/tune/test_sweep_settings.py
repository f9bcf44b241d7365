"""A sweep's recorded config and the "same settings?" check of its rerun, without Ray
(issue 23, defect 2; the job's whole path is tests/cli/test_cli.py)."""
import json

import pytest

from twa_ray.config import ConfigError, config_from_dict, config_to_dict
from twa_ray.pipelines.runs import check_recorded_config, record_config

SPACE = {"twa.lr": {"grid": [0.05, 0.5]}, "twa.candidates": {"grid": ["all", "last:2"]}}


def _sweep_cfg(tmp_path, **extra):
    raw = {"name": "sweep", "output_dir": str(tmp_path / "run"), "tune": {"space": SPACE, "num_samples": 1}}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return config_from_dict(raw)


def test_a_sweep_of_other_settings_is_refused_naming_the_keys(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = _sweep_cfg(tmp_path)
    assert not check_recorded_config(cfg, run, "the sweep")  # nothing recorded yet
    record_config(cfg, run)
    assert check_recorded_config(cfg, run, "the sweep")
    other = _sweep_cfg(tmp_path, tune__space={**SPACE, "twa.bits": {"choice": [4, 8]}}, tune__num_samples=2,
                       twa__epochs=3, train__lr=0.5)
    with pytest.raises(ConfigError) as err:
        check_recorded_config(other, run, "the sweep")
    assert str(err.value) == (f"the sweep in {run} was made with other settings (train.lr, tune.num_samples, "
                              "tune.space, twa.epochs differ): run with --force to start afresh, "
                              "or choose another output_dir")


def test_locations_and_keys_added_since_are_the_same_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = _sweep_cfg(tmp_path, data__root="/old/checkout/data")
    recorded = config_to_dict(cfg)
    del recorded["train"]["sharding"]  # recorded before the key existed
    (run / "config.json").write_text(json.dumps(recorded))
    moved = _sweep_cfg(tmp_path, data__root="data", output_dir=str(tmp_path / "moved"), storage_root="/shared")
    assert check_recorded_config(moved, run, "the sweep")


def test_an_unreadable_record_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{half")
    with pytest.raises(ConfigError, match=r"config\.json: not a readable config: run with --force"):
        check_recorded_config(_sweep_cfg(tmp_path), tmp_path, "the sweep")
