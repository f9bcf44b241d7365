"""A finished run folder read back: model_spec in summary.json, twa_ray.load_model, export to .safetensors / .pt."""
import json

import pytest
import torch
from safetensors.torch import load_file

import twa_ray
from twa_ray.config import load_config
from twa_ray.data import DataSplits
from twa_ray.models import build_model
from twa_ray.models.from_config import model_from_config, model_from_spec, model_spec
from twa_ray.output.atomic import write_json, write_torch
from twa_ray.output.export import export_model, load_state_dict, read_summary

SPEC = {"name": "small_cnn", "kwargs": {}, "num_classes": 10, "in_channels": 1, "image_size": 28}


def finished_run(tmp_path, spec=SPEC, seed=0):
    """A run folder as a job leaves it: model.pt (a plain state_dict) and summary.json."""
    torch.manual_seed(seed)
    model = model_from_spec(spec)
    for module in model.modules():  # BatchNorm statistics as recalibration leaves them, not the defaults
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    run = tmp_path / "run"
    write_torch(run / "model.pt", model.state_dict())
    write_json(run / "summary.json", {"test_acc": {"twa": 80.0}, "model_spec": spec})
    return run, model.eval()


def test_model_spec_holds_what_builds_the_model():
    cfg = load_config("configs/quickstart.yaml", ["model.kwargs={\"widths\": [8, 16]}"])
    splits = DataSplits(train=None, val=None, test=None, train_eval=None, num_classes=7, in_channels=3, image_size=32)
    spec = model_spec(cfg, splits)
    assert spec == {"name": "small_cnn", "kwargs": {"widths": [8, 16]}, "num_classes": 7, "in_channels": 3, "image_size": 32}
    assert json.loads(json.dumps(spec)) == spec
    built, direct = model_from_spec(spec), model_from_config(cfg, splits)
    assert [(k, v.shape) for k, v in built.state_dict().items()] == [(k, v.shape) for k, v in direct.state_dict().items()]
    with pytest.raises(ValueError, match="image_size"):
        model_from_spec({k: v for k, v in spec.items() if k != "image_size"})


def test_load_model_is_built_loaded_and_in_eval_mode(tmp_path):
    run, reference = finished_run(tmp_path)
    model = twa_ray.load_model(run)
    assert not model.training
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        twa_ray.load_model(tmp_path)
    run, _ = finished_run(tmp_path)
    write_json(run / "summary.json", {"test_acc": {}})
    with pytest.raises(ValueError, match="summary.json has no model_spec"):
        twa_ray.load_model(run)
    write_json(run / "summary.json", {"model_spec": {**SPEC, "num_classes": 3}})
    with pytest.raises(ValueError, match="model.pt does not fit"):
        twa_ray.load_model(run)
    (run / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_state_dict(run)
    (run / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_summary(run)


def test_export_safetensors_and_pt(tmp_path):
    run, reference = finished_run(tmp_path)
    path = export_model(run, "safetensors")
    assert path == run / "model.safetensors"
    state = load_file(str(path))
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert export_model(run, "pt") == run / "model.pt"  # already a plain state_dict
    out = export_model(run, "pt", tmp_path / "elsewhere" / "twa.pt")
    copy = torch.load(out, weights_only=True)
    assert all(torch.equal(copy[k], v) for k, v in reference.state_dict().items())
    fresh = build_model("small_cnn", 10, 1, 28)
    fresh.load_state_dict(load_file(str(path)))  # loads without twa_ray's help
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_model(run, "safetensors", tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown format"):
        export_model(run, "onnx")
