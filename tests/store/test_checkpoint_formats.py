"""Checkpoints as the tools that wrote them write them, listed by ``find_checkpoints`` and
imported by ``import_checkpoints``: Lightning ``.ckpt`` files (``Trainer.fit`` with
``ModelCheckpoint``), Hugging Face folders (``save_pretrained``, single and sharded; the
``pytorch_model.bin`` forms written by huggingface_hub, as transformers 4.x did; a
``Trainer``'s ``checkpoint-<step>/``), and ``torch.distributed.checkpoint`` folders
(``dcp.save`` in one process, and FSDP2 on two gloo ranks). Every file is written by the
real library on a tiny model; none is a hand-made look-alike."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_module
from twa_ray.core.params import ParamLayout, flatten_state
from twa_ray.store import CheckpointError, UnsafeCheckpointError, find_checkpoints, import_checkpoints
from twa_ray.store.importers import read_checkpoint


_require = require_module


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _vector(state, model: nn.Module) -> torch.Tensor:
    return flatten_state(state, ParamLayout.from_model(model))


def _vectors(states, model: nn.Module) -> torch.Tensor:
    return torch.stack([_vector(s, model) for s in states])  # (n, D)


# ---------------------------------------------------------------- Lightning


def _fit_lightning(folder: Path, steps: int, **hparams) -> nn.Module:
    """Lightning's Trainer.fit for ``steps`` steps, ModelCheckpoint writing a .ckpt after each
    into ``folder``; returns the LightningModule (its model is ``.model``)."""
    L = _require("lightning")

    class Classifier(L.LightningModule):
        def __init__(self, lr: float = 0.1, data_dir: Path = Path("/data"), args=None, act=None):
            super().__init__()
            self.save_hyperparameters()  # the arguments go into the .ckpt as hyper_parameters
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(2))  # a buffer outside the model

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=gen), torch.randint(0, 2, (32,), generator=gen))
    module = Classifier(**hparams)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (num_workers, ...) on a toy loader
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return module


def _lightning_states(folder: Path) -> list[dict[str, torch.Tensor]]:
    """The model's state_dicts in the .ckpt files, read by plain torch (trusted: written here)."""
    states = []
    for path in sorted(folder.glob("*.ckpt")):
        saved = torch.load(path, weights_only=False)["state_dict"]
        states.append({k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")})
    return states


def test_lightning_ckpts_import_with_the_modules_attribute_prefix_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    module = _fit_lightning(folder, 2, data_dir=Path("/data/x"), args=argparse.Namespace(depth=2))
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    raw = torch.load(folder / "epoch=0-step=2.ckpt", weights_only=False)
    assert isinstance(raw["hyper_parameters"]["data_dir"], Path)  # what needs the allow-list
    assert "criterion.weight" in raw["state_dict"] and "optimizer_states" in raw

    store = import_checkpoints(folder, tmp_path / "store", _mlp())
    expected = _lightning_states(folder)
    torch.testing.assert_close(store.read(), _vectors(expected, _mlp()), rtol=0, atol=0)
    torch.testing.assert_close(store.read()[-1], _vector(module.model.state_dict(), _mlp()), rtol=0, atol=0)
    assert [c.info["format"] for c in store.list_candidates()] == ["lightning"] * 2
    assert [c.info["entry"] for c in store.list_candidates()] == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    fresh = _mlp()
    fresh.load_state_dict(read_checkpoint(find_checkpoints(folder)[-1], fresh))  # the model's keys, buffers too
    torch.testing.assert_close(fresh.state_dict(), module.model.state_dict())


def test_a_lightning_ckpt_with_an_object_hyperparameter_is_refused_naming_the_class(tmp_path):
    folder = tmp_path / "checkpoints"
    _fit_lightning(folder, 1, act=nn.ReLU)  # a class as a hyper-parameter: code to unpickle
    (path,) = folder.glob("*.ckpt")
    with pytest.raises(UnsafeCheckpointError) as err:
        import_checkpoints(folder, tmp_path / "store", _mlp())
    assert str(path) in str(err.value) and "torch.nn.modules.activation.ReLU" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_a_lightning_ckpt_of_another_model_names_the_file(tmp_path):
    folder = tmp_path / "checkpoints"
    _fit_lightning(folder, 1)
    (path,) = folder.glob("*.ckpt")

    class Encoder(nn.Module):  # no key of the file ends with its names
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 8)

    with pytest.raises(CheckpointError, match="none of its keys is a parameter of the model") as err:
        import_checkpoints(folder, tmp_path / "s1", Encoder())
    assert str(path) in str(err.value)
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))  # "model." holds its names, and BatchNorm's
    with pytest.raises(CheckpointError, match="unexpected key '1.running_mean'") as err:
        import_checkpoints(folder, tmp_path / "s2", other)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- Hugging Face


def _gpt2(seed: int):
    """A tiny GPT-2 (1 layer, 16 wide, vocabulary 50; no download): lm_head tied to wte."""
    transformers = _require("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _save_hf(model, folder: Path, how: str) -> None:
    """``model`` saved in one of the layouts Hugging Face libraries write."""
    if how == "single":
        model.save_pretrained(folder)
    elif how == "sharded":
        model.save_pretrained(folder, max_shard_size="8KB")
    else:  # pytorch_model.bin (+ index when sharded): huggingface_hub, which transformers 4.x used
        from huggingface_hub import save_torch_state_dict

        folder.mkdir(parents=True)
        save_torch_state_dict(model.state_dict(), folder, safe_serialization=False,
                              max_shard_size="8KB" if how == "bin-sharded" else "5GB")


def test_hugging_face_folders_single_sharded_and_bin_with_tied_weights(tmp_path):
    layouts = ["single", "sharded", "bin", "bin-sharded"]
    models = [_gpt2(seed) for seed in range(len(layouts))]
    for i, (model, how) in enumerate(zip(models, layouts)):
        _save_hf(model, tmp_path / "models" / f"{i}-{how}", how)
    listing = {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp_path / "models").iterdir()}
    assert "lm_head.weight" not in json.loads((tmp_path / "models/1-sharded/model.safetensors.index.json")
                                              .read_text())["weight_map"]  # tied: stored once
    assert "model.safetensors.index.json" in listing["1-sharded"] and len(listing["1-sharded"]) > 4, listing
    assert "pytorch_model.bin.index.json" in listing["3-bin-sharded"] and "pytorch_model.bin" in listing["2-bin"]

    found = find_checkpoints(tmp_path / "models")
    assert [c.format for c in found] == ["huggingface"] * 4
    assert len(found[1].all_files) == 1 + len([f for f in listing["1-sharded"] if f.startswith("model-")])
    store = import_checkpoints(tmp_path / "models", tmp_path / "store", _gpt2(9))
    torch.testing.assert_close(store.read(), _vectors([m.state_dict() for m in models], _gpt2(9)), rtol=0, atol=0)
    for ckpt, model in zip(found, models):
        fresh = _gpt2(9)
        fresh.load_state_dict(read_checkpoint(ckpt, fresh), strict=True)  # lm_head.weight filled from wte
        torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)


class _HeadFirst(nn.Module):
    """GPT-2's modules with the tied head registered first: ``named_parameters()`` then names the
    tied weight ``lm_head.weight``, the key save_pretrained leaves out."""

    def __init__(self, gpt2):
        super().__init__()
        self.lm_head = gpt2.lm_head
        self.transformer = gpt2.transformer


def test_a_tied_key_the_file_omits_is_taken_from_its_partner(tmp_path):
    model = _gpt2(1)
    model.save_pretrained(tmp_path / "gpt2")
    target = _HeadFirst(_gpt2(2))
    assert ParamLayout.from_model(target).names[0] == "lm_head.weight"
    store = import_checkpoints(tmp_path / "gpt2", tmp_path / "store", target)
    assert len(store) == 1 and store.list_candidates()[0].info["entry"] == "gpt2"
    torch.testing.assert_close(store.read()[0], _vector(_HeadFirst(model).state_dict(), target), rtol=0, atol=0)


def test_a_trainer_output_dir_gives_its_checkpoints_in_step_order(tmp_path):
    transformers = _require("transformers")
    _require("accelerate")
    model = _gpt2(0)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(8) * (i + 1) % 50
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    trainer.save_model()  # the final model beside the checkpoints: not a candidate
    names = sorted(p.name for p in (tmp_path / "out/checkpoint-2").iterdir())
    assert {"optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json"} <= set(names), names
    assert (tmp_path / "out/model.safetensors").exists()

    found = find_checkpoints(tmp_path / "out")
    assert [(c.entry, c.path.name, c.format) for c in found] == [
        ("checkpoint-1", "model.safetensors", "huggingface"), ("checkpoint-2", "model.safetensors", "huggingface")]
    store = import_checkpoints(tmp_path / "out", tmp_path / "store", _gpt2(5))
    assert store.meta["import"]["entries"] == ["checkpoint-1", "checkpoint-2"]
    torch.testing.assert_close(store.read()[1], _vector(model.state_dict(), model), rtol=0, atol=0)
    assert not torch.equal(store.read()[0], store.read()[1])


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    _gpt2(0).save_pretrained(tmp_path / "gpt2", max_shard_size="8KB")
    index = tmp_path / "gpt2/model.safetensors.index.json"
    content = json.loads(index.read_text())
    key = next(iter(content["weight_map"]))
    content["weight_map"][key] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="refused") as err:
        find_checkpoints(tmp_path / "gpt2")
    assert str(index) in str(err.value) and repr(key) in str(err.value)


# ---------------------------------------------------------------- torch.distributed.checkpoint


def _dcp_save(state, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP notes that it saves in one process: what is meant
        dcp.save(state, checkpoint_id=str(folder))


def _trained(seed: int):
    """(model, optimizer) after one AdamW step: the optimizer has tensor and non-tensor state."""
    model = _mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_dcp_step_folders_as_torchtitan_writes_them(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    models = []
    for step in (1, 2, 10):
        model, optimizer = _trained(step)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        _dcp_save({"model": model_state, "optimizer": optimizer_state, "train_state": {"step": step}},
                  tmp_path / "checkpoint" / f"step-{step}")
        models.append(model)
    found = find_checkpoints(tmp_path / "checkpoint")
    assert [(c.entry, c.format) for c in found] == [("step-1", "dcp"), ("step-2", "dcp"), ("step-10", "dcp")]
    assert {f.name for f in found[0].all_files} == {".metadata", "__0_0.distcp"}
    store = import_checkpoints(tmp_path / "checkpoint", tmp_path / "store", _mlp())
    torch.testing.assert_close(store.read(), _vectors([m.state_dict() for m in models], _mlp()), rtol=0, atol=0)
    fresh = _mlp()
    fresh.load_state_dict(read_checkpoint(found[2], fresh))  # buffers too, under "model."
    torch.testing.assert_close(fresh.state_dict(), models[2].state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("nest", ["flat", "app"])
def test_a_dcp_folder_is_one_candidate_with_the_models_keys_at_any_depth(tmp_path, nest):
    model, _ = _trained(3)
    state = model.state_dict() if nest == "flat" else {"app": {"model": model.state_dict(), "epoch": 4}}
    _dcp_save(state, tmp_path / "ckpt")
    (found,) = find_checkpoints(tmp_path / "ckpt")
    assert found.format == "dcp" and found.path == tmp_path / "ckpt"
    store = import_checkpoints(tmp_path / "ckpt", tmp_path / "store", _mlp())
    torch.testing.assert_close(store.read()[0], _vector(model.state_dict(), model), rtol=0, atol=0)


def _fsdp2_save(rank: int, world: int, out: str) -> None:
    """FSDP2 (fully_shard) on ``world`` gloo ranks, one SGD step, then every rank's dcp.save of
    the sharded state_dict into one folder; rank 0 also saves the full weights to compare."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in (model[0], model[3]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(rank)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    dcp.save({"model": model.state_dict()}, checkpoint_id=f"{out}/ckpt")
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, f"{out}/full.pt")


def test_an_fsdp2_checkpoint_of_two_ranks_is_consolidated(tmp_path):
    from twa_ray.parallel.local_ranks import spawn_ranks

    spawn_ranks(_fsdp2_save, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    store = import_checkpoints(tmp_path / "ckpt", tmp_path / "store", _mlp())
    torch.testing.assert_close(store.read()[0], _vector(full, _mlp()), rtol=0, atol=0)


class _Payload:
    """Unpickling this runs os.mkdir(marker): code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_dcp_metadata_with_code_is_refused_and_never_runs(tmp_path):
    model, _ = _trained(1)
    _dcp_save(model.state_dict(), tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt/.metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError) as err:
        import_checkpoints(tmp_path / "ckpt", tmp_path / "store", _mlp())
    assert str(tmp_path / "ckpt") in str(err.value) and "mkdir" in str(err.value)
    assert not marker.exists() and not (tmp_path / "store").exists()


def test_a_corrupt_dcp_metadata_is_named(tmp_path):
    model, _ = _trained(1)
    _dcp_save(model.state_dict(), tmp_path / "ckpt")
    metadata = tmp_path / "ckpt/.metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot read") as err:
        import_checkpoints(tmp_path / "ckpt", tmp_path / "store", _mlp())
    assert not isinstance(err.value, UnsafeCheckpointError) and str(tmp_path / "ckpt") in str(err.value)


# ---------------------------------------------------------------- what is no checkpoint


def test_a_folder_of_no_format_is_named(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/events.txt").write_text("x")
    (tmp_path / "logs/runs").mkdir()
    with pytest.raises(CheckpointError, match=f"no checkpoints in {tmp_path / 'logs'}: .*Hugging Face.*distributed"):
        find_checkpoints(tmp_path / "logs")


def test_store_import_names_the_module_for_a_ray_tune_experiment(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp/experiment_state-2026-12-07_10-57-01.json").write_text("{}")  # the marker's name is enough
    with pytest.raises(CheckpointError, match="Ray Tune experiment .*twa_ray.tune.ray_results"):
        find_checkpoints(tmp_path / "exp")


def test_the_store_imports_no_optional_library():
    import subprocess
    import sys

    code = ("import sys, twa_ray.store, twa_ray.store.importers; "
            "bad = [m for m in ('ray', 'lightning', 'transformers', 'torch.distributed.checkpoint') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
