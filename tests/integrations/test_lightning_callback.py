"""twa_ray.integrations.lightning.TWACallback in a real lightning.Trainer (CPU, a tiny MLP with BatchNorm)."""
import copy
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_module  # noqa: E402

require_module("lightning")  # skipped without it, except under CI=true

import lightning_task as task  # noqa: E402  (tests/integrations, beside this file)
from conftest import ROOT, free_port  # noqa: E402
from twa_ray.core import recalibrate_bn  # noqa: E402
from twa_ray.core.params import ParamLayout, assign_flat, flatten_params, flatten_state  # noqa: E402
from twa_ray.integrations.lightning import TWACallback  # noqa: E402
from twa_ray.store import CandidateStore  # noqa: E402

HERE = Path(__file__).resolve().parent


def fit(tmp_path, callback, max_epochs=4, **trainer_kwargs):
    data = task.points()
    model = task.TinyClassifier()
    trainer = task.trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=str(tmp_path), **trainer_kwargs)
    trainer.fit(model, task.loader(data))
    return model, trainer, data


def recalibrated_loss(model, weights, data):
    """Eval loss of a copy of ``model`` at ``weights`` (D,) with BatchNorm recalibrated on ``data``."""
    other = copy.deepcopy(model)
    assign_flat(other, weights)
    recalibrate_bn(other, task.loader(data))
    return task.mean_loss(other, data)


def test_candidates_every_epoch_then_model_holds_twa_weights(tmp_path):
    callback = TWACallback(every_n_epochs=1, twa_epochs=2, lr=0.5)
    model, trainer, data = fit(tmp_path, callback)

    # one candidate per epoch, in the default store under the log folder (no logger: default_root_dir)
    store = CandidateStore.open(tmp_path / "twa_candidates")
    infos = [c.info for c in store.list_candidates()]
    assert [i["kind"] for i in infos] == ["epoch"] * 4
    assert [i["epoch"] for i in infos] == [1, 2, 3, 4] and [i["step"] for i in infos] == [8, 16, 24, 32]
    assert infos[-1]["source"] == "lightning" and "train_loss" in infos[-1]["metrics"]
    assert callback.candidate_indices == [0, 1, 2, 3]

    # the raw final weights: kept whole, and they are the last candidate (the last epoch's end)
    layout = ParamLayout.from_model(model)
    raw = flatten_state(callback.raw_state_dict, layout)
    assert callback.raw_index == 3 and torch.equal(raw, store.read_flat(3))
    assert set(callback.raw_state_dict) == set(model.state_dict())  # BatchNorm buffers too

    # the model holds w(X): not the raw weights, not the SWA point; the coefficients moved
    twa = flatten_params(model)
    swa = store.read(candidates=callback.candidate_indices).mean(0)
    assert not torch.allclose(twa, raw) and not torch.allclose(twa, swa)
    assert callback.coefficients.shape == (4, len(layout.names)) and callback.coefficients.abs().max() > 0
    assert [h["epoch"] for h in callback.history] == [1, 2] and callback.history[-1]["steps"] == 16
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in callback.history)

    # BatchNorm recalibrated at w(X): the running mean is the data's mean before the BatchNorm
    with torch.no_grad():
        pre_bn = model.net[0](data.tensors[0])
    torch.testing.assert_close(model.net[1].running_mean, pre_bn.mean(0), atol=1e-5, rtol=1e-4)

    # TWA starts at the SWA point and trains on the training loss: it ends no worse there
    assert task.mean_loss(model, data) <= recalibrated_loss(model, swa, data) + 1e-6
    assert callback.shard.world == 1 and callback.shard.coordinates == (0, layout.num_params)


def test_step_cadence_keeps_raw_weights_and_ignores_older_candidates(tmp_path):
    store_path = tmp_path / "my_store"
    older = CandidateStore.create_for_model(store_path, task.TinyClassifier(seed=1))
    older.append_flat(torch.full((ParamLayout.from_model(task.TinyClassifier()).num_params,), 100.0))  # not this fit's
    callback = TWACallback(every_n_steps=5, start_step=10, twa_epochs=1, store=str(store_path), bits=4)
    model, trainer, data = fit(tmp_path, callback)  # 4 epochs of 8 steps

    store = CandidateStore.open(store_path)
    infos = {c.index: c.info for c in store.list_candidates()}
    # steps 10, 15, 20, 25, 30, then the final weights at step 32 (off the cadence)
    assert callback.candidate_indices == [1, 2, 3, 4, 5, 6]
    assert [infos[i]["step"] for i in callback.candidate_indices] == [10, 15, 20, 25, 30, 32]
    assert [infos[i]["kind"] for i in callback.candidate_indices] == ["step"] * 5 + ["final"]
    assert infos[2]["epoch"] == pytest.approx(15 / 8)
    assert callback.raw_index == 6
    assert torch.equal(store.read_flat(6), flatten_state(callback.raw_state_dict, ParamLayout.from_model(model)))
    assert flatten_params(model).abs().max() < 50  # the older candidate (all 100) took no part

    # a checkpoint saved after fit: the TWA weights as state_dict, the raw ones beside them
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    ckpt = torch.load(tmp_path / "after.ckpt", weights_only=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][name], value)
        torch.testing.assert_close(ckpt["twa_raw_state_dict"][name], callback.raw_state_dict[name])
    assert ckpt["twa_coefficients"].shape == (6, 6)


def test_resumed_fit_averages_the_candidates_of_both_parts(tmp_path):
    """The callback's state rides in Lightning's checkpoints: a fit resumed from one goes on
    with the candidates saved before the interruption."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = task.points()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    first = task.trainer(max_epochs=2, callbacks=[TWACallback(every_n_epochs=1), saver], enable_checkpointing=True,
                         default_root_dir=str(tmp_path))
    first.fit(task.TinyClassifier(), task.loader(data))  # "interrupted" after 2 epochs (its TWA ran too)
    callback = TWACallback(every_n_epochs=1, twa_epochs=1)
    second = task.trainer(max_epochs=4, callbacks=[callback], default_root_dir=str(tmp_path))
    second.fit(task.TinyClassifier(), task.loader(data), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert callback.candidate_indices == [0, 1, 2, 3]
    infos = [c.info for c in CandidateStore.open(tmp_path / "twa_candidates").list_candidates()]
    assert [i["step"] for i in infos] == [8, 16, 24, 32]
    assert callback.coefficients.shape[0] == 4


def test_too_few_candidates_fail_before_training(tmp_path):
    callback = TWACallback(every_n_epochs=1, start_epoch=2)
    model = task.TinyClassifier()
    before = flatten_params(model)
    trainer = task.trainer(max_epochs=2, callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"every_n_epochs=1 from start_epoch=2 saves 1 candidate.*at least 2"):
        trainer.fit(model, task.loader(task.points()))
    assert torch.equal(flatten_params(model), before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(every_n_epochs=1, every_n_steps=10), r"every_n_epochs=1 and every_n_steps=10: give one cadence"),
    (dict(every_n_steps=10, start_epoch=2), r"start_epoch=2 goes with every_n_epochs"),
    (dict(every_n_epochs=0), r"every_n_epochs=0 is not an integer >= 1"),
    (dict(start_step=-1, every_n_steps=3), r"start_step=-1"),
    (dict(bits=3), r"TWACallback: bits: 3 is not one of"),
    (dict(twa_epochs=0), r"TWACallback: twa_epochs: 0 is too small"),
    (dict(granularity="blocks"), r"TWACallback: granularity: granularity 'blocks'"),
    (dict(optimizer="lion", lr=-1.0), r"optimizer: 'lion'(.|\n)*lr: -1.0 is not > 0"),
    (dict(start="last"), r"start: 'last' needs basis: checkpoints"),
])
def test_argument_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TWACallback(**kwargs)


def test_arguments_are_plain_values():
    """LightningCLI (jsonargparse) configures a callback from its signature: plain defaults only."""
    for name, p in inspect.signature(TWACallback).parameters.items():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p.default is None or type(p.default) in (int, float, str, bool), name


def test_ddp_two_ranks_shard_the_projection_and_end_identical(tmp_path):
    """strategy="ddp", 2 CPU processes (gloo): Lightning's launcher re-runs the script for rank 1."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, str(HERE / "lightning_ddp_fit.py"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["batches_per_epoch"] for r in ranks] == [4, 4]  # 256 points / 32 per batch / 2 ranks

    # only rank 0 wrote: one candidate per epoch, the same indices on both ranks
    store = CandidateStore.open(ranks[0]["store"])
    assert store.candidate_indices() == [0, 1, 2] and ranks[0]["candidates"] == ranks[1]["candidates"] == [0, 1, 2]

    # the projection was sharded: each rank held its own run of blocks, together all of D
    shards = [r["shard"] for r in ranks]
    D = shards[0]["num_params"]
    assert [s["rank"] for s in shards] == [0, 1]
    assert shards[0]["coordinates"][0] == 0 and shards[0]["coordinates"][1] == shards[1]["coordinates"][0]
    assert shards[1]["coordinates"][1] == D
    assert all(0 < s["coordinates"][1] - s["coordinates"][0] < D for s in shards)
    assert all(0 < s["projection_bytes"] for s in shards)

    # both ranks end with the same TWA weights, BatchNorm statistics and coefficients
    for name, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][name]), name
    assert torch.equal(ranks[0]["coefficients"], ranks[1]["coefficients"])
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 2
    model = task.TinyClassifier()
    layout = ParamLayout.from_model(model)
    raw = flatten_state(ranks[0]["raw_state_dict"], layout)
    assert torch.equal(raw, flatten_state(ranks[1]["raw_state_dict"], layout))  # DDP kept the parameters equal
    assert torch.equal(raw, store.read_flat(2))
    assert not torch.allclose(flatten_state(ranks[0]["state_dict"], layout), raw)
