"""Importing checkpoint folders into a candidate store, and exporting results as plain state_dicts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twa_ray.core.params import ParamLayout, flatten_state
from twa_ray.parallel.checkpoint_files import save_checkpoint
from twa_ray.store import (
    CandidateStore,
    CheckpointError,
    UnsafeCheckpointError,
    export_state_dict,
    find_checkpoints,
    import_checkpoints,
    state_dict_from_vector,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n state_dicts of _model() with distinct weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    base = _model().state_dict()
    return [{k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()) for k, v in base.items()}
            for _ in range(n)]


def _vectors(states) -> torch.Tensor:
    layout = ParamLayout.from_model(_model())
    return torch.stack([flatten_state(s, layout) for s in states])  # (n, D)


def _write(folder: Path, fmt: str, states, numbers) -> None:
    """Write one checkpoint per state in the layout of ``fmt``, named after ``numbers``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, state in zip(numbers, states):
        if fmt == "paper":  # the TWA paper's code: {i}.pt
            torch.save(state, folder / f"{i}.pt")
        elif fmt == "soups":  # Model Soups: model_{i}.pt
            torch.save(state, folder / f"model_{i}.pt")
        elif fmt == "safetensors":
            save_file(state, str(folder / f"ckpt_{i}.safetensors"))
        elif fmt == "ray":  # our base-training Ray Train checkpoints: state.pt {"model", "optimizer", ...}
            save_checkpoint(folder / f"checkpoint_{i:06d}", {"model": state, "optimizer": {"state": {}, "lr": 0.1},
                                                             "epoch": i}, {"epoch": i})
        elif fmt == "wrapped":  # DDP: {"state_dict": {"module.<name>": ...}}
            torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": i}, folder / f"e{i}.pth")
        else:
            raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["paper", "soups", "safetensors", "ray", "wrapped"])
def test_each_format_round_trips_in_natural_order(tmp_path, fmt):
    states = _states(4)
    numbers = [0, 1, 2, 10]  # natural order, not 0, 1, 10, 2
    _write(tmp_path / "ckpts", fmt, states, numbers)
    (tmp_path / "ckpts" / "notes.json").write_text("{}")  # ignored
    store = import_checkpoints(tmp_path / "ckpts", tmp_path / "store", _model(), meta={"origin": fmt})
    assert store.names == list(ParamLayout.from_model(_model()).names)  # buffers are not stored
    torch.testing.assert_close(store.read(), _vectors(states), rtol=0, atol=0)
    infos = [c.info for c in store.list_candidates()]
    assert [i["format"] for i in infos] == ["safetensors" if fmt == "safetensors" else "torch"] * 4
    assert [int("".join(ch for ch in i["entry"] if ch.isdigit())) for i in infos] == numbers
    assert store.meta["origin"] == fmt and len(store.meta["import"]["entries"]) == 4


def test_export_round_trips_through_both_formats_and_the_importer(tmp_path):
    model = _model()
    weights = _vectors(_states(1))[0]
    state = state_dict_from_vector(weights, model)
    assert list(state) == list(model.state_dict())  # parameters and buffers, model order
    paths = export_state_dict(state, tmp_path / "out" / "twa")
    assert [Path(p).name for p in paths] == ["twa.pt", "twa.safetensors"]
    for loaded in (torch.load(paths[0], weights_only=True), load_file(paths[1])):
        assert sorted(loaded) == sorted(state)  # safetensors keeps its own key order
        for k in state:
            torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0)
        fresh = _model()
        fresh.load_state_dict(loaded)  # plain torch, no twa_ray needed
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temporary files left
    store = import_checkpoints(tmp_path / "out", tmp_path / "store", model)
    torch.testing.assert_close(store.read(), torch.stack([weights, weights]), rtol=0, atol=0)


def test_buffers_may_be_missing_and_parameters_may_not(tmp_path):
    model = _model()
    params_only = [{k: v for k, v in s.items() if k in dict(model.named_parameters())} for s in _states(2)]
    _write(tmp_path / "ok", "paper", params_only, [0, 1])
    torch.testing.assert_close(import_checkpoints(tmp_path / "ok", tmp_path / "s", model).read(), _vectors(params_only))


def _bad_folder(tmp_path: Path, change) -> Path:
    """Three good {i}.pt files; ``change(states)`` edits them first."""
    states = _states(3)
    change(states)
    _write(tmp_path / "bad", "paper", states, [0, 1, 2])
    return tmp_path / "bad"


def _delete(states):
    del states[2]["4.weight"]


def _extra(states):
    states[1]["head.weight"] = torch.zeros(2)


def _shape(states):
    states[2]["0.bias"] = torch.zeros(4)


def _dtype(states):
    states[1]["4.bias"] = states[1]["4.bias"].half()


def _nan(states):
    states[2]["0.weight"][0, 0, 0, 0] = float("nan")


def _inf(states):
    states[1]["1.weight"][1] = float("inf")


@pytest.mark.parametrize("change,file,message", [
    (_delete, "2.pt", "missing parameter '4.weight'"),
    (_extra, "1.pt", "unexpected key 'head.weight'"),
    (_shape, "2.pt", "key '0.bias' has shape [4], the model [3]"),
    (_dtype, "1.pt", "parameter '4.bias' has dtype torch.float16"),
    (_nan, "2.pt", "parameter '0.weight' has non-finite values"),
    (_inf, "1.pt", "parameter '1.weight' has non-finite values"),
])
def test_mismatched_or_nonfinite_candidates_name_the_file_and_key(tmp_path, change, file, message):
    folder = _bad_folder(tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        import_checkpoints(folder, tmp_path / "store", _model())
    assert str(folder / file) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "store").exists()  # nothing half-imported is left behind


class _Payload:
    """Unpickling this runs os.mkdir(marker): code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpts"
    _write(folder, "paper", _states(2), [0, 1])
    torch.save({"state_dict": _states(1)[0], "hook": _Payload(marker)}, folder / "2.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        import_checkpoints(folder, tmp_path / "store", _model())
    assert str(folder / "2.pt") in str(err.value) and "arbitrary unpickling" in str(err.value)
    assert "posix.mkdir" in str(err.value)  # names what it wanted to call
    assert not marker.exists()
    assert not (tmp_path / "store").exists()
    # the payload is live: a plain unpickler would have run it
    torch.load(folder / "2.pt", weights_only=False)
    assert marker.exists()


def test_a_whole_pickled_model_is_refused(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save(_model(), folder / "0.pt")
    with pytest.raises(UnsafeCheckpointError, match="Save model.state_dict"):
        import_checkpoints(folder, tmp_path / "store", _model())


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no checkpoints in {tmp_path / 'empty'}"):
        import_checkpoints(tmp_path / "empty", tmp_path / "store", _model())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "log.txt").write_text("x")
    (tmp_path / "other" / "sub").mkdir()  # a subfolder without a checkpoint is skipped
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        find_checkpoints(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        find_checkpoints(tmp_path / "nope")


def _truncate(path: Path) -> None:
    torch.save(_states(1)[0], path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_safetensors(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "gone.pt")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("make,name", [(_truncate, "1.pt"), (_garbage_safetensors, "1.safetensors"),
                                       (_dangling, "1.pt"), (_empty, "1.pt")])
def test_unreadable_files_are_named(tmp_path, make, name):
    folder = tmp_path / "ckpts"
    _write(folder, "paper", _states(1), [0])
    make(folder / name)
    with pytest.raises(CheckpointError) as err:
        import_checkpoints(folder, tmp_path / "store", _model())
    assert str(folder / name) in str(err.value) and "cannot read" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_a_ray_checkpoint_folder_must_hold_one_file(tmp_path):
    folder = tmp_path / "ckpts" / "checkpoint_000001"
    save_checkpoint(folder, {"model": _states(1)[0]})
    torch.save(_states(1)[0], folder / "extra.pt")
    with pytest.raises(CheckpointError, match="holds several checkpoint files"):
        find_checkpoints(tmp_path / "ckpts")


def test_no_state_dict_and_existing_store(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"epoch": 3, "lr": 0.1}, folder / "0.pt")
    with pytest.raises(CheckpointError, match="no state_dict found"):
        import_checkpoints(folder, tmp_path / "store", _model())
    _write(tmp_path / "good", "paper", _states(2), [0, 1])
    CandidateStore.create_for_model(tmp_path / "taken", _model())
    with pytest.raises(FileExistsError):
        import_checkpoints(tmp_path / "good", tmp_path / "taken", _model())
