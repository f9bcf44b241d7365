"""The char-level LM example (examples/char_lm.py) through the main job on a local Ray: your
own task, its metric (perplexity, lower is better) in every stage, TWA sharded with FSDP."""
import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from readme_commands import readme_block_with
from twa_ray.cli import main
from twa_ray.output.export import load_model
from twa_ray.parallel.evaluate import evaluate
from twa_ray.tasks import task_data, task_from_config
from twa_ray.config import load_config

pytestmark = pytest.mark.ray

TINY = ["task_args={context: 16, max_chars: 12000, d_model: 16, layers: 1, heads: 2}", "data.batch_size=32",
        "train.epochs=2", "train.budget_epochs=4", "train.save_every_steps=10", "twa.sharding=fsdp"]


def test_the_char_lm_example_runs_through_the_main_job(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # `twa-ray run` from the folder that holds the task's package
    out = tmp_path / "run"
    command = next(c for c in readme_block_with("twa-ray run --config examples/char_lm.yaml")
                   if c.startswith("twa-ray run"))  # the README's own
    assert main([*command.split()[1:], f"output_dir={out}", *TINY]) == 0
    table = capsys.readouterr().out
    assert "test ppl" in table.splitlines()[[i for i, line in enumerate(table.splitlines())
                                              if line.startswith("method")][0]]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["metric"], summary["higher_is_better"]) == ("examples.char_lm:CharLM", "ppl", False)
    assert "test_acc" not in summary
    assert list(summary["test_ppl"]) == ["last", "swa", "ema", "best_k", "full_budget", "sgd_same_compute", "twa"]
    for method, ppl in summary["test_ppl"].items():
        assert ppl == pytest.approx(math.exp(summary["test_loss"][method]), rel=1e-9), method
    # every stage named its metrics after the task's: base training's val_ppl chose best-k
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert all(r["val_ppl"] > 1.0 for r in rows if r["stage"] == "base_train") and "val_acc" not in rows[0]
    # load_model rebuilds the task's model by its import path; its test perplexity is the summary's
    cfg = load_config(ROOT / "examples" / "char_lm.yaml", TINY)
    task = task_from_config(cfg)
    model = load_model(out)
    data = task_data(task, include_test=True)
    result = evaluate(model, data.test, task, batch_size=cfg.data.eval_batch_size)
    assert result.value == pytest.approx(summary["test_ppl"]["twa"], rel=1e-6)
    assert "test ppl" in (out / "report.html").read_text()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
