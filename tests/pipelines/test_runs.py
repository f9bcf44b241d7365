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


# ---------------------------------------------------------------- --force (issue 23, defect 5)

from twa_ray.config import ConfigError  # noqa: E402
from twa_ray.pipelines.runs import RUN_MARKER  # noqa: E402
from twa_ray.store import fs as store_fs  # noqa: E402


@pytest.fixture
def removals(monkeypatch):
    """``store_fs.remove_tree`` recorded and never run: a refused --force must remove nothing
    (and a test of today's code must never delete a real folder)."""
    calls = []
    monkeypatch.setattr(store_fs, "remove_tree", lambda location: calls.append(str(location)) or True)
    return calls


@pytest.mark.parametrize("output_dir, why", [
    (".", "the working directory"), ("..", "a parent of the working directory"),
    ("/", "the filesystem root"), ("~", "the home folder"),
])
def test_force_never_removes_the_working_directory_its_parents_the_root_or_home(
        tmp_path, monkeypatch, removals, output_dir, why):
    work, home = tmp_path / "checkout", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    cfg = config_from_dict({"output_dir": output_dir})
    for force in (True, False):  # a run folder there is refused even without --force
        with pytest.raises(ConfigError, match=rf"output_dir: .* is {why}"):
            prepare_run_dir(cfg, force=force)
    assert removals == []


def test_force_removes_only_a_run_folder_or_an_empty_one(tmp_path, removals):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"output_dir: .*mine is not a run folder .*--force removes"):
        prepare_run_dir(config_from_dict({"output_dir": str(other)}), force=True)
    assert removals == [] and not (other / RUN_MARKER).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_run_dir(config_from_dict({"output_dir": str(empty)}), force=True)
    assert removals == [str(empty)]


def test_a_name_that_is_no_plain_name_never_reaches_the_run_folder(tmp_path, monkeypatch, removals):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "other").mkdir(parents=True)
    for name in ("", ".."):
        with pytest.raises(ConfigError, match="name: "):
            prepare_run_dir(config_from_dict({"name": name}), force=True)
    assert removals == []


def test_a_run_that_died_early_is_cleared_by_force(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = prepare_run_dir(cfg)
    assert (run_dir / RUN_MARKER).is_file()  # from the first write on
    (run_dir / "ray").mkdir()
    (run_dir / "ray" / "checkpoint").write_text("partial")
    again = prepare_run_dir(cfg, force=True)
    assert again == run_dir and sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER]


def test_an_unmarked_folder_is_used_but_never_marked(tmp_path):
    """A folder that already holds other files (a run folder from before the marker, or
    anything else) is written into as before, but not claimed: --force will refuse it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    assert prepare_run_dir(_cfg(tmp_path)) == folder and not (folder / RUN_MARKER).exists()


def test_remove_tree_itself_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch):
    work = tmp_path / "checkout"
    (work / ".git").mkdir(parents=True)
    monkeypatch.chdir(work)
    for location in (work, tmp_path, "."):
        with pytest.raises(ValueError, match="refusing to delete .*working directory"):
            store_fs.remove_tree(location)
    assert (work / ".git").is_dir()
    assert store_fs.protected_folder("/") == "the filesystem root" and store_fs.protected_folder(work / "run") is None


# ---------------------------------------------------------------- completion marker (issue 23, defect 4)


def _write_main_run(cfg, run_dir, monkeypatch, weight):
    """The main job's stage 5 (``pipelines.main.write_run``) with its inputs stubbed: a
    model.pt of ``weight``; everything else tiny."""
    from types import SimpleNamespace

    import torch

    from twa_ray.output.atomic import write_bytes
    from twa_ray.output.mixing import Mixing
    from twa_ray.pipelines import main

    monkeypatch.setattr(main, "twa_summary", lambda *args: {"config": cfg.name, "test_acc": {"twa": weight}})
    monkeypatch.setattr(main, "task_from_config", lambda cfg: None)
    monkeypatch.setattr(main, "model_spec", lambda cfg, task: {})
    monkeypatch.setattr(main, "run_mixing", lambda *args: Mixing([torch.zeros(2, 1)], [[0, 1]], ["w"], [1], {}))
    monkeypatch.setattr(main, "plot_accuracy", lambda path, *args: write_bytes(path, b"png"))
    monkeypatch.setattr("twa_ray.output.run_folder.plot_mixing", lambda path, mixing: write_bytes(path, b"png"))
    base = SimpleNamespace(metrics=[], store_uri="unused")
    twa = SimpleNamespace(history=[], coefficients=None, rounds=[[0, 1]], block_names=["w"])
    evaluation = SimpleNamespace(results={"twa": SimpleNamespace(state_dict={"w": torch.full((1,), weight)})})
    return main.write_run(cfg, run_dir, base, twa, None, evaluation)


def test_a_run_that_dies_while_writing_its_folder_leaves_no_complete_run(tmp_path, monkeypatch):
    """Config A finished; config B dies inside the run-folder write, after model.pt: a rerun
    of A must not find "A finished" beside B's model.pt."""
    import torch

    a, b = _cfg(tmp_path), _cfg(tmp_path, twa={"bits": 4})
    run_dir = prepare_run_dir(a)
    _write_main_run(a, run_dir, monkeypatch, 1.0)
    assert finished_run(a, run_dir)

    def crash(path, rows):
        raise OSError("disk full")

    monkeypatch.setattr("twa_ray.output.run_folder.write_rows", crash)  # the writer after model.pt
    with pytest.raises(OSError, match="disk full"):
        _write_main_run(b, run_dir, monkeypatch, 2.0)
    assert torch.load(run_dir / "model.pt", weights_only=True)["w"].item() == 2.0  # B's, written first
    assert not finished_run(a, run_dir) and not finished_run(b, run_dir)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "config.json").exists()
    monkeypatch.undo()
    _write_main_run(b, run_dir, monkeypatch, 2.0)  # B again, to its end: complete for B alone
    assert finished_run(b, run_dir) and not finished_run(a, run_dir)
    last = (run_dir / "config.json").stat().st_mtime_ns  # written last
    assert all(p.stat().st_mtime_ns <= last for p in run_dir.rglob("*") if p.is_file())


# ---------------------------------------------------------------- settled locations (issue 24)

def test_a_finished_run_is_finished_from_another_copy_of_the_working_dir(tmp_path, monkeypatch):
    """Locations are settled absolute where the job loads its config: data.root is the
    working dir's (under `ray job submit`, Ray's copy, which may move between submissions).
    A run folder is finished for the same settings wherever its data was read from."""
    from twa_ray.config import STORAGE_ROOT_ENV, settle_locations

    shared = {STORAGE_ROOT_ENV: str(tmp_path / "shared")}
    for copy in ("copy1", "copy2"):
        (tmp_path / copy).mkdir()
    monkeypatch.chdir(tmp_path / "copy1")
    first = settle_locations(config_from_dict({"name": "q", "seed": 1}), shared)
    run_dir = prepare_run_dir(first)
    record_config(first, run_dir)
    (run_dir / "summary.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "copy2")
    again = settle_locations(config_from_dict({"name": "q", "seed": 1}), shared)
    assert again.data.root != first.data.root and again.run_dir == first.run_dir
    assert finished_run(again, run_dir)
    assert not finished_run(settle_locations(config_from_dict({"name": "q", "seed": 2}), shared), run_dir)

