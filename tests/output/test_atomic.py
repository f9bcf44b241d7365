"""Run-folder files are written atomically: a killed writer leaves the previous file intact."""
import json
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from twa_ray.output.atomic import read_rows, write_json, write_rows, write_torch

SLOW_WRITER = """
import sys, torch
from twa_ray.output.atomic import write_torch
print("writing", flush=True)
write_torch(sys.argv[1], {"big": torch.zeros(400_000_000, dtype=torch.uint8)})
"""


def test_killed_writer_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "model.pt"
    write_torch(path, {"version": torch.tensor(1)})
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)  # mid-way through 400 MB
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(path, weights_only=True)["version"].item() == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.pt"]
    assert all(name.startswith(".model.pt.") for name in leftovers)  # at most a temp file


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"test_acc": 1.0})

    class Unserialisable:
        pass

    try:
        write_json(path, {"bad": Unserialisable()})
    except TypeError:
        pass
    assert json.loads(path.read_text()) == {"test_acc": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_rows_round_trip(tmp_path):
    rows = [{"stage": "twa", "epoch": 1, "acc": 0.5}, {"stage": "base_train", "epoch": 2}]
    write_rows(tmp_path / "m.parquet", rows)
    assert read_rows(tmp_path / "m.parquet") == [{"stage": "twa", "epoch": 1, "acc": 0.5},
                                                 {"stage": "base_train", "epoch": 2, "acc": None}]
