"""Typed config: YAML loading, overrides, errors naming keys, every shipped config; same settings?"""
import json

import pytest

from conftest import ROOT
from twa_ray.config import (
    STORAGE_ROOT_ENV,
    ConfigError,
    config_from_dict,
    config_to_dict,
    differing_settings,
    load_config,
    recorded_config,
    resolve_storage,
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


# ---------------------------------------------------------------- storage root

CLUSTER = {"RAY_ADDRESS": "10.0.0.1:6379"}  # as `ray job submit` sets it for the driver


def test_locally_without_a_root_nothing_changes():
    cfg = config_from_dict({"name": "q"})
    assert resolve_storage(cfg, {}) is cfg and cfg.output_dir is None and cfg.run_dir == "runs/q"


@pytest.mark.parametrize("output_dir, store, named", [
    (None, None, "output_dir 'runs/q' (the default runs/<name>) is relative"),
    ("results/q", None, "output_dir 'results/q' is relative"),
    ("/abs/q", "stores/q", "store 'stores/q' is relative"),
])
def test_on_a_cluster_a_relative_location_without_a_root_is_refused(output_dir, store, named):
    cfg = config_from_dict({"name": "q", "output_dir": output_dir, "store": store})
    with pytest.raises(ConfigError) as err:
        resolve_storage(cfg, CLUSTER)
    message = str(err.value)
    assert named in message and "RAY_ADDRESS" in message
    assert "storage_root" in message and STORAGE_ROOT_ENV in message and "output_dir" in message


def test_on_a_cluster_absolute_paths_and_uris_are_used_as_given():
    for output_dir, store in [("/shared/q", None), ("s3://bucket/q", "gs://other/store"), ("~/q", "/abs/store")]:
        cfg = config_from_dict({"name": "q", "output_dir": output_dir, "store": store})
        assert resolve_storage(cfg, CLUSTER) is cfg


@pytest.mark.parametrize("root, expected", [
    ("s3://bucket/prefix", "s3://bucket/prefix/runs/q"),
    ("s3://bucket/prefix/", "s3://bucket/prefix/runs/q"),
    ("s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http", "s3://b/p/runs/q?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("file:///shared", "file:///shared/runs/q"),
    ("/shared/twa", "/shared/twa/runs/q"),
])
def test_relative_locations_resolve_against_the_root(root, expected):
    cfg = config_from_dict({"name": "q"})
    for environ in ({STORAGE_ROOT_ENV: root}, {**CLUSTER, STORAGE_ROOT_ENV: root}):
        out = resolve_storage(cfg, environ)
        assert out.output_dir == expected and out.run_dir == expected
        base, _, query = expected.partition("?")
        assert out.store_uri == base + "/candidates" + ("?" + query if query else "")
    assert cfg.output_dir is None  # a new config; the loaded one is untouched
    out = resolve_storage(config_from_dict({"name": "q", "output_dir": "./exp/one", "store": "st"}),
                          {**CLUSTER, STORAGE_ROOT_ENV: root})
    assert out.output_dir == expected.replace("runs/q", "exp/one") and out.store == expected.replace("runs/q", "st")
    absolute = config_from_dict({"name": "q", "output_dir": "/elsewhere/q"})
    assert resolve_storage(absolute, {**CLUSTER, STORAGE_ROOT_ENV: root}).output_dir == "/elsewhere/q"


def test_the_config_key_wins_over_the_environment_variable(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("storage_root: s3://from-yaml/p\n")
    environ = {**CLUSTER, STORAGE_ROOT_ENV: "s3://from-env/p"}
    assert resolve_storage(load_config(path), environ).output_dir == "s3://from-yaml/p/runs/q"
    assert resolve_storage(load_config(path, ["storage_root=/override"]), environ).output_dir == "/override/runs/q"
    assert resolve_storage(load_config(path, ["storage_root=null"]), environ).output_dir == "s3://from-env/p/runs/q"


def test_a_relative_root_is_refused_naming_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match="storage_root: 'rel' is not an absolute path or a URI"):
        config_from_dict({"storage_root": "rel"})
    with pytest.raises(ConfigError, match=f"{STORAGE_ROOT_ENV}: 'rel' is not an absolute path or a URI"):
        resolve_storage(config_from_dict({}), {STORAGE_ROOT_ENV: "rel"})


def test_the_process_environment_decides_by_default(monkeypatch):
    cfg = config_from_dict({"name": "q"})
    monkeypatch.delenv(STORAGE_ROOT_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_storage(cfg) is cfg
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ConfigError, match="storage_root"):
        resolve_storage(cfg)
    monkeypatch.setenv(STORAGE_ROOT_ENV, "/shared")
    assert resolve_storage(cfg).output_dir == "/shared/runs/q"


def test_the_job_refuses_a_relative_output_dir_on_a_cluster_before_ray(tmp_path, monkeypatch, capsys):
    from twa_ray.cli import run as run_cli

    def no_ray(*args, **kwargs):
        raise AssertionError("the job must refuse before Ray starts")

    monkeypatch.setattr(run_cli, "run", no_ray)
    monkeypatch.setattr(run_cli, "setup_logging", lambda *args, **kwargs: None)  # no handler on captured stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv(STORAGE_ROOT_ENV, raising=False)
    assert run_cli.main(["--config", str(ROOT / "configs" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err
    assert "output_dir 'runs/quickstart' (the default runs/<name>) is relative" in err
    assert "storage_root" in err and STORAGE_ROOT_ENV in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing made in the working dir either


@pytest.mark.parametrize("sweep_name, stage", [("tune_head_stage", "head_stage"), ("tune_head_bits", "head_stage"),
                                               ("tune_head_bases", "head_stage"), ("tune_head_probe", "head_stage"),
                                               ("tune_tail_stage", "tail_stage")])
def test_a_stage_sweep_reuses_its_stage_candidate_store(sweep_name, stage):
    """A sweep over a stage's TWA settings (configs/tune_*.yaml) runs over the stage's candidates:
    its seed, data, model and train sections must equal the stage's (the store is reused)."""
    from twa_ray.pipelines.main import CANDIDATE_SECTIONS

    sweep, run = (config_to_dict(load_config(ROOT / "configs" / f"{name}.yaml")) for name in (sweep_name, stage))
    assert differing_settings(sweep, run, CANDIDATE_SECTIONS) == []
    assert sweep["store"] == f"runs/{stage}/candidates"  # where `run --config configs/<stage>.yaml` keeps it


def test_a_recorded_config_from_before_a_new_key_has_the_same_settings():
    """A store or run folder made before a key existed (e.g. train.sharding) is the same
    settings today; one with a key since removed is not."""
    today = config_to_dict(load_config(ROOT / "configs" / "quickstart.yaml"))
    earlier = json.loads(json.dumps(today))
    del earlier["train"]["sharding"]
    assert differing_settings(earlier, today) == ["train"]  # compared raw, the new key differs
    assert differing_settings(recorded_config(earlier), today) == []
    removed = dict(earlier, old_key=1)
    assert recorded_config(removed) is removed and "old_key" in differing_settings(recorded_config(removed), today)


# ---------------------------------------------------------------- float notations (issue 23, defect 11)

@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5E-4", 5e-4), (".5", 0.5), ("1_000", 1000.0),
                                         ("1.0e4", 1e4), ("-2e+3", -2000.0), ("3", 3.0)])
def test_every_float_notation_python_accepts_is_a_float(tmp_path, text, value):
    """YAML 1.1 reads 1e-4 (no dot) as a string: a float field takes it as float(text) does,
    in an override and in a YAML file, in a list of floats too; the value is a float."""
    cfg = config_from_dict({}, "cfg", [f"train.weight_decay={text}", f"twa.grad_clip={text}"])
    assert cfg.train.weight_decay == value and type(cfg.train.weight_decay) is float
    assert cfg.twa.grad_clip == value and type(cfg.twa.grad_clip) is float  # float | None
    path = tmp_path / "exp.yaml"
    path.write_text(f"train:\n  weight_decay: {text}\nfinetune:\n  weight_decays: [0.0, {text}]\n")
    cfg = load_config(path)
    assert cfg.train.weight_decay == value and type(cfg.train.weight_decay) is float
    assert cfg.finetune.weight_decays == [0.0, value] and all(type(v) is float for v in cfg.finetune.weight_decays)


def test_a_non_number_is_still_refused_naming_the_key_and_bool_and_int_stay_apart(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  weight_decay: 1e-4x\n  lr: true\n  epochs: 1e1\ntwa:\n  lr: '1e-2'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "bad.yaml: train.weight_decay: expected float, got '1e-4x'" in text
    assert "train.lr: expected float, got True" in text  # a bool is no float
    assert "train.epochs: expected an integer, got '1e1'" in text  # an int field takes integers only
    assert "twa.lr" not in text  # a quoted number is a number too
    cfg = load_config(path, ["train.weight_decay=0.1", "train.lr=0.2", "train.epochs=1_000"])
    assert cfg.train.epochs == 1000 and type(cfg.train.epochs) is int and cfg.twa.lr == 0.01
    with pytest.raises(ConfigError, match=r"twa\.lr: expected float, got 'fast'"):
        config_from_dict({}, "cfg", ["twa.lr=fast"])


# ---------------------------------------------------------------- name (issue 23, defect 5)

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b", "/abs", "two words", "a\nb"])
def test_name_must_be_a_plain_folder_name(name):
    """runs/<name> is the default run folder, which --force may remove: a name that is empty,
    a path or a dot folder would make it runs/, the working directory or somewhere else."""
    with pytest.raises(ConfigError, match=r"cfg: name: .* is not a plain name"):
        config_from_dict({"name": name}, "cfg")


def test_plain_names_pass():
    for name in ("quickstart", "tune_head-stage.v2", "Run7", "a+b"):
        assert config_from_dict({"name": name}).name == name
