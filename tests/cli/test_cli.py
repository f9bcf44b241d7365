"""The twa-ray command line: every subcommand, the jobs' thin wrappers, show and export of a finished run."""
import logging
import runpy
import subprocess
import sys
import tomllib
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

    from twa_ray.distributed import ray_env

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
