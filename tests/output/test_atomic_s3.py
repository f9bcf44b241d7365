"""The run folder on a URI: every writer against a real S3 API (moto's server on the loopback)."""
import io
import json

import pyarrow.fs as pafs
import pytest
import torch

from twa_ray.config import ConfigError, config_from_dict
from twa_ray.output.atomic import read_json, read_rows, write_bytes, write_json, write_rows, write_torch
from twa_ray.output.export import load_state_dict, read_summary
from twa_ray.output.mixing import Mixing
from twa_ray.output.report import model_files, write_report
from twa_ray.output.run_folder import write_run_folder
from twa_ray.output.tensorboard import write_run_events
from twa_ray.pipelines.runs import RUN_MARKER, finished_run, prepare_run_dir, record_config, require_local_run_dir
from twa_ray.store import fs as store_fs


def keys(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it."""
    loc = store_fs.resolve(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(loc.path) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_a_query_stays_at_the_end_of_a_location():
    base = "s3://b/run?endpoint_override=127.0.0.1:9000&scheme=http"
    assert store_fs.join(base, "plots", "a.png") == "s3://b/run/plots/a.png?endpoint_override=127.0.0.1:9000&scheme=http"
    run = store_fs.as_location(base)
    assert run / "models" / "twa" == "s3://b/run/models/twa?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (run / "model.pt").name == "model.pt" and run.name == "run"
    assert store_fs.with_suffix(run / "twa", ".pt") == "s3://b/run/twa.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    assert store_fs.join("/local/run", "x") == "/local/run/x"
    assert store_fs.location_of(base, "b/run/ray/ckpt_1") == store_fs.join(base, "ray/ckpt_1")
    assert store_fs.location_of("/local/run", "/local/run/ray/ckpt_1") == "/local/run/ray/ckpt_1"
    with pytest.raises(ValueError, match="is not under"):
        store_fs.location_of(base, "b/other")


def test_writers_round_trip_and_leave_no_temporary_keys(s3_uri):
    run = store_fs.as_location(store_fs.join(s3_uri, "run"))
    write_json(run / "summary.json", {"test_acc": 1.0})
    write_torch(run / "model.pt", {"w": torch.arange(3.0)})
    write_rows(run / "metrics.parquet", [{"stage": "twa", "epoch": 1}, {"stage": "base_train", "acc": 0.5}])
    assert read_json(run / "summary.json") == {"test_acc": 1.0}
    state = torch.load(io.BytesIO(store_fs.read_file(run / "model.pt")), weights_only=True)
    torch.testing.assert_close(state["w"], torch.arange(3.0))
    assert read_rows(run / "metrics.parquet") == [{"stage": "twa", "epoch": 1, "acc": None},
                                                  {"stage": "base_train", "epoch": None, "acc": 0.5}]

    class Unserialisable:
        pass

    with pytest.raises(TypeError):  # fails while rendering: nothing is uploaded
        write_json(run / "summary.json", {"bad": Unserialisable()})
    assert read_json(run / "summary.json") == {"test_acc": 1.0}
    assert keys(run) == ["metrics.parquet", "model.pt", "summary.json"]  # one upload each: no temp key, no folder marker
    with pytest.raises(FileNotFoundError, match=r"run/absent.json\?.* does not exist"):
        read_json(run / "absent.json")


def test_a_run_folder_and_its_report_on_s3(s3_uri):
    cfg = config_from_dict({"output_dir": store_fs.join(s3_uri, "run"), "seed": 1})
    assert cfg.store_uri == store_fs.join(s3_uri, "run", "candidates")
    run = prepare_run_dir(cfg)
    assert isinstance(run, store_fs.Uri) and run == cfg.run_dir
    state = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)}
    written = write_run_folder(
        run, {"config": "s3", "test_acc": {"twa": 50.0}}, [{"stage": "twa", "epoch": 1, "val_acc": 40.0}],
        Mixing([torch.tensor([[0.1, -0.2], [0.3, 0.0]])], [[4, 7]], ["0.weight", "0.bias"], [6, 2], {}), state,
        lambda path: write_bytes(path, b"\x89PNG accuracy"),  # mixing.png is drawn by matplotlib
        models={"uniform_soup": state},
    )
    assert [str(p) for p in written] == [run / n for n in (
        "model.pt", "metrics.parquet", "coefficients.parquet", "plots/accuracy.png", "plots/mixing.png",
        "models/uniform_soup.pt", "models/uniform_soup.safetensors", "summary.json")]
    assert read_summary(run)["test_acc"] == {"twa": 50.0}
    torch.testing.assert_close(load_state_dict(run)["0.weight"], torch.ones(2, 3))
    assert not finished_run(cfg, run)  # no config.json yet
    record_config(cfg, run)
    assert finished_run(cfg, run)
    assert not finished_run(config_from_dict({"output_dir": cfg.output_dir, "seed": 2}), run)

    report = write_report(run)
    assert report == run / "report.html"
    page = store_fs.read_file(report).decode("utf-8")
    assert store_fs.read_file(run / "plots" / "mixing.png")[:4] == b"\x89PNG"
    assert page.count("data:image/png;base64,") == 2 and f"<code>{run.split('?')[0]}" in page
    assert "models/uniform_soup.safetensors" in page and "Config (config.json)" in page
    assert [str(p) for p in model_files(run)] == ["model.pt", "models/uniform_soup.pt", "models/uniform_soup.safetensors"]

    events = write_run_events(run)  # written locally by TensorBoard, then uploaded
    assert events == run / "tensorboard"
    assert [k.split("/")[0] for k in keys(events)] == ["twa"]
    assert not [k for k in keys(run) if store_fs.TEMP_MARKER in k]

    assert prepare_run_dir(cfg, force=True) == run
    assert keys(run) == [RUN_MARKER]  # emptied, and marked again as a run folder


def test_object_stores_get_one_upload_other_filesystems_a_rename(s3_uri, tmp_path, monkeypatch):
    """The per-filesystem choice of write_bytes_atomic: S3 never sees a temporary key (a
    move there is a copy), a local folder always does (rename into place)."""
    moves, move_into_place = [], store_fs.move_into_place

    def recorded(fs, tmp, final, overwrite):
        moves.append(type(fs).__name__)
        return move_into_place(fs, tmp, final, overwrite)

    monkeypatch.setattr(store_fs, "move_into_place", recorded)
    loc = store_fs.resolve(store_fs.join(s3_uri, "x.json"))
    assert store_fs.write_bytes_atomic(loc.fs, loc.path, b"{}")
    assert not store_fs.write_bytes_atomic(loc.fs, loc.path, b"[]", overwrite=False)
    local = store_fs.resolve(tmp_path / "x.json")
    assert store_fs.write_bytes_atomic(local.fs, local.path, b"{}")
    assert moves == ["LocalFileSystem"]
    assert json.loads(store_fs.read_file(loc.uri)) == {} and (tmp_path / "x.json").read_text() == "{}"


def test_the_soup_and_tune_jobs_refuse_a_uri_run_folder(tmp_path):
    from twa_ray.cli.soup import _check_soup_config

    uri = config_from_dict({"output_dir": "s3://bucket/run", "checkpoints_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"output_dir: 's3://bucket/run' is a URI; the soup job writes"):
        _check_soup_config(uri, "soup.yaml")
    with pytest.raises(ConfigError, match="the tune job writes its run folder to a local path"):
        require_local_run_dir(uri, "the tune job")
    require_local_run_dir(config_from_dict({"output_dir": str(tmp_path)}), "the tune job")
