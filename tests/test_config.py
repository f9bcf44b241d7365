"""Typed config: YAML loading, overrides, errors naming keys, every shipped config; same settings?"""
import json

import pytest

from conftest import ROOT
from twa_ray.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    differing_settings,
    load_config,
    select_candidates,
    settings_fingerprint,
)

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# run:"), f"{path.name} must name the command that runs it on line 1"


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_overrides_and_types(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("twa:\n  bits: 8\n  lr: 1\ntrain:\n  milestones: [0.5, 0.75]\n")
    cfg = load_config(path, ["twa.bits=4", "train.epochs=3", "data.limit_train=100", "twa.grad_clip=null"])
    assert cfg.name == "exp" and cfg.run_dir == "runs/exp"
    assert cfg.twa.bits == 4 and cfg.train.epochs == 3 and cfg.data.limit_train == 100
    assert isinstance(cfg.twa.lr, float) and cfg.twa.lr == 1.0
    assert cfg.store_uri == "runs/exp/candidates"


def test_unknown_keys_and_wrong_types_are_all_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("twa:\n  bitz: 4\n  lr: fast\nfoo: 1\ntrain:\n  epochs: 2.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "bad.yaml" in text
    assert "unknown key twa.bitz" in text and "unknown key foo" in text
    assert "twa.lr: expected float, got 'fast'" in text
    assert "train.epochs: expected an integer" in text


@pytest.mark.parametrize(
    "override,message",
    [
        ("twa.bits=3", "twa.bits: 3 is not one of"),
        ("twa.granularity=layer", "twa.granularity"),
        ("twa.basis=pca", "twa.basis"),
        ("data.val_ratio=1.0", "data.val_ratio"),
        ("twa.data=test", "twa.data"),
        ("twa.candidates=every:2", "twa.candidates"),
        ("twa.candidates_per_round=1", "twa.candidates_per_round"),
        ("train.optimizer=lion", "train.optimizer"),
        ("twa.schedule=poly", "twa.schedule"),
        ("train.budget_epochs=1", "train.budget_epochs"),
        ("twa.workers=0", "twa.workers"),
        ("twa.nested.key=1", "twa.nested"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_invalid_values_named(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict({"train": {"epochs": 2}}, "cfg", [override])


def test_twa_v_needs_a_val_split():
    with pytest.raises(ConfigError, match="needs data.val_ratio > 0"):
        config_from_dict({"twa": {"data": "val"}, "data": {"val_ratio": 0.0}})


def test_candidate_windows():
    assert select_candidates("all", 5) == [0, 1, 2, 3, 4]
    assert select_candidates("first:3", 5) == [0, 1, 2]
    assert select_candidates("last:3", 5) == [2, 3, 4]
    assert select_candidates("stride:2", 5) == [0, 2, 4]
    assert select_candidates("first:4,last:3,stride:2", 10) == [1, 3]


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_same_settings_compare_as_json_and_name_what_differs():
    raw = config_to_dict(config_from_dict({"seed": 1, "train": {"milestones": [2, 4]}}))
    recorded = json.loads(json.dumps(raw))
    assert differing_settings(recorded, raw) == []  # a file read back equals the config it was written from
    other = config_to_dict(config_from_dict({"seed": 2, "train": {"milestones": [2, 4]}, "twa": {"bits": 4}}))
    assert differing_settings(recorded, other) == ["seed", "twa"]
    assert differing_settings(recorded, other, ["data", "model", "train"]) == []
    assert differing_settings({"a": 1}, {"a": 1, "b": None}) == ["b"]  # a missing key is not a null one
    assert differing_settings({"a": (1, 2)}, {"a": [1, 2]}) == []
    assert differing_settings(["not", "a", "mapping"], {"a": 1}) == ["a"]


def test_settings_fingerprint_is_stable_and_sensitive():
    key = {"twa": {"bits": 4, "lr": 0.3}, "candidates": [0, 1, 2]}
    assert settings_fingerprint(key) == settings_fingerprint({"candidates": [0, 1, 2], "twa": {"lr": 0.3, "bits": 4}})
    assert settings_fingerprint(key) != settings_fingerprint({**key, "candidates": [0, 1]})
    assert len(settings_fingerprint(key)) == 10 and int(settings_fingerprint(key), 16) >= 0
