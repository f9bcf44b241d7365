"""The twa-ray command line: every subcommand, the jobs' thin wrappers, show and export of a finished run."""
import logging
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from twa_ray import cli
from twa_ray.cli import COMMANDS, build_parser, main
from twa_ray.output.atomic import write_json, write_torch

JOBS = {"cifar_twa.py": "run", "tune_twa.py": "tune", "soup_twa.py": "soup", "train_candidates.py": "train-candidates"}
SUMMARY = {
    "config": "quickstart", "dataset": "fashion_mnist", "model": "small_cnn", "twa_data": "train",
    "test_acc": {"last": 81.37, "swa": 83.91, "twa": 84.66}, "test_loss": {"last": 0.52, "swa": 0.47, "twa": 0.44},
    "epochs": {"base": 4, "twa": 2}, "time_s": {"base_train": 61.25, "twa": 17.75},
}


@pytest.fixture(autouse=True)
def restore_logging():
    """The job commands call setup_logging (a handler on this test's stderr, no propagation):
    undo it, so later tests log (and capture logs) as before."""
    logger = logging.getLogger("twa_ray")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = before


def test_every_subcommand_is_registered():
    parser = build_parser()
    assert set(COMMANDS) == {"run", "tune", "soup", "train-candidates", "plan", "show", "export"}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["twa-ray"].partition(":")
    assert module == "twa_ray.cli" and getattr(cli, name) is main


@pytest.mark.parametrize("script, command", sorted(JOBS.items()))
def test_jobs_are_thin_wrappers_of_the_subcommands(script, command):
    namespace = runpy.run_path(str(ROOT / "jobs" / script), run_name="jobs_module")  # not __main__: runs nothing
    assert namespace["main"] is COMMANDS[command].main


def test_job_script_and_subcommand_take_the_same_flags():
    help_job = subprocess.run([sys.executable, "jobs/cifar_twa.py", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    help_cli = subprocess.run([sys.executable, "-m", "twa_ray", "run", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert help_job.returncode == 0 and help_cli.returncode == 0, help_job.stderr + help_cli.stderr

    def options(text):
        return sorted(word for word in text.split() if word.startswith("--"))

    assert options(help_job.stdout) == options(help_cli.stdout)
    assert {"--config", "--force", "--verbose"} <= set(options(help_cli.stdout))


def test_a_bad_config_fails_before_anything_starts(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["train-candidates", "--config", "configs/quickstart.yaml", "twa.bits=3"]) == 2
    assert "twa.bits" in capsys.readouterr().err
    assert main(["tune", "--config", "configs/quickstart.yaml"]) == 2  # no tune.space
    assert "tune.space" in capsys.readouterr().err


def test_show_prints_the_results_table(tmp_path, capsys):
    run = tmp_path / "run"
    write_json(run / "summary.json", SUMMARY)
    write_torch(run / "model.pt", {"w": torch.zeros(2)})
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "84.66" in lines["TWA"] and "83.91" in lines["SWA"]
    assert f"model:  {run / 'model.pt'}" in out


def test_show_names_the_missing_summary(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 1
    assert str(tmp_path / "summary.json") in capsys.readouterr().err


def test_export_writes_the_format_asked_for(tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    write_torch(run / "model.pt", {"w": torch.arange(3.0)})
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "model.safetensors")
    assert torch.equal(load_file(str(run / "model.safetensors"))["w"], torch.arange(3.0))
    assert main(["export", str(run), "--format", "pt", "--out", str(tmp_path / "copy.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "copy.pt", weights_only=True)["w"], torch.arange(3.0))
    assert main(["export", str(tmp_path / "nothing"), "--format", "pt", "--out", str(tmp_path / "x.pt")]) == 1
    assert "model.pt does not exist" in capsys.readouterr().err


def test_finish_writes_the_report_and_prints_the_table_and_paths(tmp_path, capsys):
    from twa_ray.cli.common import finish
    from twa_ray.output.atomic import write_rows

    run = tmp_path / "run"
    write_json(run / "summary.json", SUMMARY)
    write_rows(run / "metrics.parquet", [{"stage": "base_train", "epoch": 1, "val_acc": 50.0}])
    finish(run, SUMMARY, tensorboard=True)
    out = capsys.readouterr().out
    assert "84.66" in next(line for line in out.splitlines() if line.startswith("TWA"))
    assert out.rstrip().endswith(f"model:  {run / 'model.pt'}\nreport: {run / 'report.html'}\nrun folder: {run}")
    assert (run / "report.html").is_file() and list((run / "tensorboard" / "base_train").iterdir())


class _Stop(Exception):
    """Ends a job command where a test has seen what it needed."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.fixture
def ray_calls(monkeypatch):
    """``ray.init`` recorded instead of run (the kwargs of each call), Ray never started; the
    environment switches that ``init_ray`` sets are undone after the test."""
    import ray

    from twa_ray.runtime import ray_env

    for key in ("RAY_ADDRESS", "TWA_RAY_VERBOSE", "RAY_API_SERVER_ADDRESS", *ray_env.LOCAL_ENV,
                *ray_env.QUIET_DRIVER_ENV, *ray_env.QUIET_WORKER_ENV):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize("verbose", [False, True])
def test_tune_verbose_flag_reaches_ray_and_the_sweeps_run_config(verbose, tmp_path, monkeypatch, ray_calls):
    import ray
    from ray import tune
    from ray.tune.experimental.output import AirVerbosity, get_air_verbosity

    from twa_ray.pipelines import main as pipeline
    from twa_ray.tune import sweep

    seen = {}

    class Tuner:  # records the RunConfig the sweep builds, and ends the command
        can_restore = staticmethod(lambda path: False)

        def __init__(self, trainable, *, param_space, tune_config, run_config):
            seen["run_config"] = run_config
            raise _Stop

    monkeypatch.setattr(pipeline, "check_store_settings", lambda cfg: None)
    monkeypatch.setattr(pipeline, "ensure_candidates", lambda cfg: SimpleNamespace(store_uri="store"))
    monkeypatch.setattr(sweep.CandidateStore, "open", lambda uri: [None] * 8)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(tune, "Tuner", Tuner)
    with pytest.raises(_Stop):
        main(["tune", "--config", "configs/tune_quickstart.yaml", f"output_dir={tmp_path / 'run'}"]
             + (["--verbose"] if verbose else []))
    (init,) = ray_calls
    assert ("env_vars" in init.get("runtime_env", {})) is not verbose  # quiet_ray's worker switches only when quiet
    assert init["address"] == "local"  # a Ray of its own, not one a `ray start` here left running
    run_config = seen["run_config"]
    if verbose:  # Tune's default reporter and its trial tables
        assert get_air_verbosity(run_config.verbose) == AirVerbosity.DEFAULT
    else:  # the legacy reporter at verbosity 0 prints nothing
        assert run_config.verbose == 0 and get_air_verbosity(run_config.verbose) is None


@pytest.mark.parametrize("verbose", [False, True])
def test_soup_verbose_flag_reaches_ray(verbose, tmp_path, monkeypatch, ray_calls):
    from twa_ray.pipelines import runs, soups

    monkeypatch.setattr(runs, "check_inputs", lambda cfg: None)
    # Ray starts inside the first stage (pretraining and fine-tuning): stop right after it
    monkeypatch.setattr(soups, "make_finetuned", _stop)
    with pytest.raises(_Stop):
        main(["soup", "--config", "configs/soup_quickstart.yaml", f"output_dir={tmp_path / 'run'}"]
             + (["--verbose"] if verbose else []))
    (init,) = ray_calls
    assert ("env_vars" in init.get("runtime_env", {})) is not verbose


# ---------------------------------------------------------------- a rerun with other settings (issue 23, defect 2)


def _sweep(tmp_path, *overrides, force=False):
    return main(["tune", "--config", "configs/tune_quickstart.yaml", f"output_dir={tmp_path / 'run'}",
                 f"store={tmp_path / 'store'}", *overrides] + (["--force"] if force else []))


@pytest.fixture
def stub_sweep(monkeypatch, ray_calls):
    """The tune command up to Tune: candidates stubbed; the Tuner, new or restored, ends the
    command (_Stop). Returns the Tuner calls ("new" or "restore")."""
    import ray
    from ray import tune

    from twa_ray.pipelines import main as pipeline
    from twa_ray.tune import sweep

    tuners = []

    class Tuner:
        can_restore = staticmethod(lambda path: Path(path).is_dir())

        @staticmethod
        def restore(path, **kwargs):
            tuners.append("restore")
            raise _Stop

        def __init__(self, trainable, *, run_config, **kwargs):  # the experiment's folder, as Tune makes it
            (Path(run_config.storage_path) / run_config.name).mkdir(parents=True)
            tuners.append("new")
            raise _Stop

    monkeypatch.setattr(pipeline, "check_store_settings", lambda cfg: None)
    monkeypatch.setattr(pipeline, "ensure_candidates", lambda cfg: SimpleNamespace(store_uri="store"))
    monkeypatch.setattr(sweep.CandidateStore, "open", lambda uri: [None] * 8)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(tune, "Tuner", Tuner)
    return tuners


def test_a_sweep_rerun_with_other_settings_is_refused_before_ray_starts(tmp_path, stub_sweep, ray_calls, capsys):
    with pytest.raises(_Stop):
        _sweep(tmp_path)
    assert stub_sweep == ["new"] and len(ray_calls) == 1
    assert (tmp_path / "run" / "config.json").is_file()  # the sweep's config, recorded as the main job's is
    capsys.readouterr()
    assert _sweep(tmp_path, "tune.num_samples=3", "twa.lr=0.25", "tune.asha.grace_period=2") == 1
    err = capsys.readouterr().err
    assert "the sweep in" in err and "was made with other settings" in err
    assert "(tune.asha.grace_period, tune.num_samples, twa.lr differ)" in err
    assert "--force" in err and "output_dir" in err and "Traceback" not in err
    assert len(ray_calls) == 1 and stub_sweep == ["new"]  # refused before ray.init, no Tuner
    with pytest.raises(_Stop):  # the same settings resume (a moved dataset root is the same settings)
        _sweep(tmp_path, "data.root=/elsewhere/data")
    assert stub_sweep == ["new", "restore"]
    with pytest.raises(_Stop):  # --force: a new sweep of the new settings
        _sweep(tmp_path, "tune.num_samples=3", force=True)
    assert stub_sweep == ["new", "restore", "new"]


def test_train_candidates_with_other_settings_is_refused_before_ray_starts(tmp_path, monkeypatch, ray_calls, capsys):
    import json

    from twa_ray.config import config_to_dict, load_config
    from twa_ray.runtime import base_train
    from twa_ray.store import CandidateStore

    monkeypatch.setattr(base_train, "run_base_training", _stop)
    args = ["train-candidates", "--config", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}"]
    stored = config_to_dict(load_config("configs/quickstart.yaml", [f"output_dir={tmp_path / 'run'}"]))
    CandidateStore.create(str(tmp_path / "run" / "candidates"), ["w"], [(2,)],
                          meta={"config": json.loads(json.dumps(stored))})
    assert main(args + ["train.lr=0.5"]) == 1
    err = capsys.readouterr().err
    assert "was made with other settings (train differ)" in err and "--force" in err and "Traceback" not in err
    assert ray_calls == []
    with pytest.raises(_Stop):  # the same settings resume
        main(args)
    assert len(ray_calls) == 1


def test_soup_with_other_fine_tuning_settings_is_refused_before_ray_starts(tmp_path, monkeypatch, ray_calls, capsys):
    from twa_ray.pipelines import runs, soups

    monkeypatch.setattr(runs, "check_inputs", lambda cfg: None)
    monkeypatch.setattr(soups, "make_finetuned", _stop)
    args = ["soup", "--config", "configs/soup_quickstart.yaml", f"output_dir={tmp_path / 'run'}"]
    folder = tmp_path / "run" / "finetuned"
    folder.mkdir(parents=True)
    from twa_ray.config import config_to_dict, load_config
    from twa_ray.pipelines.finetune import FINETUNE_SECTIONS

    raw = config_to_dict(load_config("configs/soup_quickstart.yaml"))
    write_json(folder / "settings.json", {k: raw[k] for k in FINETUNE_SECTIONS})  # as an earlier run left it
    assert main(args + ["finetune.lrs=[0.1]", "seed=3"]) == 1
    err = capsys.readouterr().err
    assert "fine-tuned models" in err and "was made with other settings (seed, finetune differ)" in err
    assert "--force" in err and "Traceback" not in err and ray_calls == []
    with pytest.raises(_Stop):  # the same settings go on, to the fine-tuning stage
        main(args)
    assert len(ray_calls) == 1
