"""The twa-ray command line: every subcommand, the jobs' thin wrappers, show and export of a finished run."""
import logging
import runpy
import subprocess
import sys
import tomllib

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
