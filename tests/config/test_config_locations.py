"""Locations settled once, where a job loads its config (issue 24): absolute after
``settle_locations``, unchanged through the dict a Ray worker rebuilds its config from,
whatever that worker's working directory."""
import argparse
import os

import pytest

from conftest import ROOT
from twa_ray.config import (STORAGE_ROOT_ENV, ConfigError, config_from_dict, config_to_dict, load_config,
                            settle_locations, unsettled_locations, without_locations)

CLUSTER = {"RAY_ADDRESS": "10.0.0.1:6379"}


@pytest.fixture
def local(monkeypatch):
    monkeypatch.delenv(STORAGE_ROOT_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_every_location_is_absolute_after_settling(tmp_path, monkeypatch, local):
    monkeypatch.chdir(tmp_path)
    loaded = load_config(ROOT / "configs" / "quickstart.yaml")
    assert unsettled_locations(loaded) == ["output_dir", "store", "data.root"]  # as written: relative
    cfg = settle_locations(loaded)
    here = str(tmp_path)
    assert cfg.run_dir == cfg.output_dir == f"{here}/runs/quickstart"
    assert cfg.store_uri == f"{here}/runs/quickstart/candidates" and cfg.store is None
    assert cfg.ray_storage == f"{here}/runs/quickstart/ray"
    assert cfg.data.root == os.path.join(here, loaded.data.root)
    assert cfg.storage_root == here  # what relative locations resolved against
    assert unsettled_locations(cfg) == []
    assert loaded.output_dir is None  # a new config; the loaded one is untouched


def test_settled_locations_survive_the_dict_round_trip_in_another_working_directory(tmp_path, monkeypatch, local):
    """A Ray worker rebuilds the config from config_to_dict(cfg) in its own working dir:
    nothing is resolved again there, and settling again changes nothing."""
    driver, worker = tmp_path / "driver", tmp_path / "worker"
    driver.mkdir()
    worker.mkdir()
    monkeypatch.chdir(driver)
    cfg = settle_locations(config_from_dict({"name": "q", "store": "stores/q", "data": {"root": "datasets"},
                                             "output_dir": "~/results/q"}))
    raw = config_to_dict(cfg)
    monkeypatch.chdir(worker)
    rebuilt = config_from_dict(raw)
    assert rebuilt == cfg and settle_locations(rebuilt) == cfg
    assert (rebuilt.store_uri, rebuilt.data.root) == (str(driver / "stores" / "q"), str(driver / "datasets"))
    assert rebuilt.run_dir == os.path.expanduser("~/results/q") and rebuilt.ray_storage == rebuilt.run_dir + "/ray"


def test_the_store_follows_the_root_and_the_data_the_working_directory(tmp_path, monkeypatch):
    """As before locations were settled: a relative output_dir and store resolve against the
    storage root, a relative data.root against the driver's working directory (under ray job
    submit, Ray's copy of the working dir, which holds the job's files)."""
    monkeypatch.chdir(tmp_path)
    raw = {"name": "q", "store": "st", "data": {"root": "data"}}
    for environ in ({STORAGE_ROOT_ENV: "/shared/twa"}, {**CLUSTER, STORAGE_ROOT_ENV: "/shared/twa"}):
        cfg = settle_locations(config_from_dict(raw), environ)
        assert (cfg.run_dir, cfg.store_uri, cfg.storage_root) == ("/shared/twa/runs/q", "/shared/twa/st", "/shared/twa")
        assert cfg.data.root == str(tmp_path / "data")
    assert settle_locations(config_from_dict({**raw, "storage_root": "/from/key"}), {}).store_uri == "/from/key/st"


def test_a_uri_root_settles_uris_with_their_query_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http"
    cfg = settle_locations(config_from_dict({"name": "q"}), {**CLUSTER, STORAGE_ROOT_ENV: root})
    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (cfg.run_dir, cfg.store_uri, cfg.ray_storage) == (
        f"s3://b/p/runs/q{query}", f"s3://b/p/runs/q/candidates{query}", f"s3://b/p/runs/q/ray{query}")
    assert cfg.storage_root == root and unsettled_locations(cfg) == []
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_on_a_cluster_without_a_root_absolute_locations_settle_and_relative_ones_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = settle_locations(config_from_dict({"name": "q", "output_dir": "/shared/q"}), CLUSTER)
    assert (cfg.run_dir, cfg.store_uri, cfg.storage_root) == ("/shared/q", "/shared/q/candidates", None)
    assert cfg.data.root == str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"output_dir 'runs/q' \(the default runs/<name>\) is relative"):
        settle_locations(config_from_dict({"name": "q"}), CLUSTER)


def test_a_job_loads_its_config_settled(tmp_path, monkeypatch, local):
    from twa_ray.cli.common import load_job_config

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=str(ROOT / "configs" / "quickstart.yaml"), overrides=["store=elsewhere/st"])
    cfg = load_job_config(args)
    assert unsettled_locations(cfg) == [] and cfg.store_uri == str(tmp_path / "elsewhere" / "st")


def test_locations_are_no_settings():
    raw = config_to_dict(config_from_dict({"output_dir": "/a", "storage_root": "/r", "data": {"root": "/d"}}))
    bare = without_locations(raw)
    assert "output_dir" not in bare and "storage_root" not in bare and "root" not in bare["data"]
    assert "store" in bare and raw["data"]["root"] == "/d"  # the store is compared; raw is untouched
    assert without_locations({"data": "not a section"}) == {"data": "not a section"}
