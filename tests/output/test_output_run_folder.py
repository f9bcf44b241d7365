"""The one run-folder writer of every job: each file, the optional exports, summary.json last."""
import json

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from twa_ray.output.mixing import Mixing
from twa_ray.output.run_folder import stage_rows, write_run_folder


def test_stage_rows():
    assert stage_rows("twa", [{"epoch": 1, "loss": 0.5, "skip": [1, 2], "none": None}]) == [
        {"stage": "twa", "epoch": 1, "loss": 0.5, "none": None}]


def test_write_run_folder_writes_every_file_and_the_summary_last(tmp_path):
    run, drawn = tmp_path / "run", []

    def plot_accuracy(path):
        drawn.append((path, sorted(p.name for p in run.iterdir())))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"png")

    state = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)}
    written = write_run_folder(
        run, {"test_acc": {"twa": 50.0}}, [{"stage": "twa", "epoch": 1}],
        Mixing([torch.tensor([[0.1, -0.2], [0.3, 0.0]])], [[4, 7]], ["0.weight", "0.bias"], [6, 2], {}), state,
        plot_accuracy, models={"uniform_soup": {k: 2 * v for k, v in state.items()}},
    )
    names = [str(p.relative_to(run)) for p in written]
    assert names == ["model.pt", "metrics.parquet", "coefficients.parquet", "plots/accuracy.png", "plots/mixing.png",
                     "models/uniform_soup.pt", "models/uniform_soup.safetensors", "summary.json"]
    assert drawn == [(run / "plots" / "accuracy.png", ["coefficients.parquet", "metrics.parquet", "model.pt"])]
    assert all(p.is_file() for p in written)
    last = max(written, key=lambda p: p.stat().st_mtime_ns)
    assert last.stat().st_mtime_ns == (run / "summary.json").stat().st_mtime_ns
    assert json.loads((run / "summary.json").read_text()) == {"test_acc": {"twa": 50.0}}
    torch.testing.assert_close(torch.load(run / "model.pt", weights_only=True)["0.weight"], torch.ones(2, 3))
    torch.testing.assert_close(load_file(str(run / "models" / "uniform_soup.safetensors"))["0.bias"], torch.zeros(2))
    assert [r["candidate"] for r in pq.read_table(run / "coefficients.parquet").to_pylist()] == [4, 7]
    assert (run / "plots" / "mixing.png").read_bytes()[:4] == b"\x89PNG"


def test_main_job_run_folder_has_no_exports(tmp_path):
    written = write_run_folder(
        tmp_path, {"test_acc": {}}, [], Mixing([torch.zeros(2, 1)], [[0, 1]], ["w"], [1], {}), {"w": torch.zeros(1)},
        lambda path: (path.parent.mkdir(), path.write_bytes(b"png")),
    )
    assert [p.name for p in written][-1] == "summary.json" and not (tmp_path / "models").exists()


def test_an_earlier_summary_is_gone_before_the_first_file_is_written(tmp_path, monkeypatch):
    """summary.json marks a complete folder: a write that dies after model.pt leaves none,
    not the earlier run's beside the new model.pt (issue 23, defect 4)."""
    import pytest

    from twa_ray.output import run_folder

    mixing = Mixing([torch.zeros(2, 1)], [[0, 1]], ["w"], [1], {})
    plot = lambda path: (path.parent.mkdir(exist_ok=True), path.write_bytes(b"png"))  # noqa: E731
    write_run_folder(tmp_path, {"run": "A"}, [], mixing, {"w": torch.zeros(1)}, plot)
    seen = []

    def crash(path, rows):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(run_folder, "write_rows", crash)
    with pytest.raises(OSError, match="disk full"):
        write_run_folder(tmp_path, {"run": "B"}, [], mixing, {"w": torch.ones(1)}, plot)
    assert "summary.json" not in seen[0] and not (tmp_path / "summary.json").exists()
