"""report.html: self-contained, offline, and true to summary.json."""
import base64
import html
import json
import re

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from twa_ray.output.atomic import write_json, write_torch  # noqa: E402
from twa_ray.output.report import render_report, write_report  # noqa: E402

SUMMARY = {
    "config": "quickstart", "dataset": "fashion_mnist", "model": "small_cnn", "twa_data": "train",
    "base_epochs": 4, "budget_epochs": 8, "twa_epochs": 2, "bits": 8,
    "test_acc": {"last": 81.37, "swa": 83.91, "twa": 84.66, "full_budget": 85.02},
    "test_loss": {"last": 0.5213, "swa": 0.4702, "twa": 0.4411, "full_budget": 0.4307},
    "time_s": {"base_train": 61.25, "twa": 17.75, "twa_in_workers": 9.5, "full_budget": 122.5},
    "projection_bytes_per_worker": [123456, 654321],
    "store": "runs/quickstart/store",
}


def run_folder(tmp_path, summary=SUMMARY, safetensors=True):
    run = tmp_path / "run"
    write_json(run / "summary.json", summary)
    write_json(run / "config.json", {"name": "quickstart", "train": {"epochs": 4, "lr": 0.1}, "note": "<b>&"})
    write_torch(run / "model.pt", {"w": torch.zeros(3)})
    if safetensors:
        (run / "model.safetensors").write_bytes(b"\0" * 16)
    (run / "plots").mkdir()
    plt.imsave(run / "plots" / "accuracy.png", torch.rand(8, 12).numpy())
    plt.imsave(run / "plots" / "mixing.png", torch.rand(5, 5).numpy())
    return run


def cells(page: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", page)]


def test_report_matches_summary_and_embeds_every_plot(tmp_path):
    run = run_folder(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    found = cells(page)
    for method, acc in SUMMARY["test_acc"].items():
        assert f"{acc:.2f}" in found, method
    for loss in SUMMARY["test_loss"].values():
        assert f"{loss:.4f}" in found
    for stage, seconds in SUMMARY["time_s"].items():
        assert stage in found and f"{seconds:.1f}" in found
    for nbytes in SUMMARY["projection_bytes_per_worker"]:
        assert str(nbytes) in found
    # every PNG embedded, byte for byte
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in (run / "plots").glob("*.png"))
    assert len(embedded) == 2
    # the config, escaped
    assert html.escape(json.dumps({"name": "quickstart", "train": {"epochs": 4, "lr": 0.1}, "note": "<b>&"}, indent=2)) in page
    assert "<b>&" not in page
    # models linked relatively; nothing fetched from anywhere
    assert re.findall(r'href="([^"]+)"', page) == ["model.pt", "model.safetensors"]
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_report_links_only_the_models_present_and_the_soups(tmp_path):
    run = run_folder(tmp_path, safetensors=False)
    write_torch(run / "models" / "greedy_soup.pt", {"w": torch.ones(1)})
    (run / "models" / "greedy_soup.safetensors").write_bytes(b"\0")
    (run / "models" / "notes.txt").write_text("not a model")
    page = render_report(run)
    assert re.findall(r'href="([^"]+)"', page) == ["model.pt", "models/greedy_soup.pt", "models/greedy_soup.safetensors"]


def test_report_tolerates_a_partial_folder(tmp_path):
    run = tmp_path / "sweep"
    write_json(run / "best.json", {"params": {"twa.lr": 0.3}, "test_acc": 77.5})
    page = write_report(run).read_text()
    assert "No test results" in page and "No plots" in page and "No model files" in page
    assert "best.json" in page and "77.5" in page and "twa.lr" in page
