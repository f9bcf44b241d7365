"""train.candidates_from: ema saves the EMA of the weights as each candidate, at the same steps
as the weights would be; the default (weights) saves the iterate."""
import pytest
import torch

from twa_ray.config import ConfigError, config_from_dict
from twa_ray.core.baselines import ema_decay
from twa_ray.core.params import ParamLayout
from twa_ray.runtime.base_train import read_final
from twa_ray.store import CandidateStore

STEPS_PER_EPOCH = 4  # 160 synthetic images, 20% val -> 128 train, batches of 32


def tiny_raw(out, **train) -> dict:
    """8x8 synthetic images, an MLP; a candidate after every step (and the initial weights)."""
    return {
        "name": "tiny", "output_dir": str(out), "seed": 0,
        "data": {"name": "synthetic", "batch_size": 32, "val_ratio": 0.2,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 4, "channels": 1, "image_size": 8}},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "baselines": {"ema_decay": 0.9},
        "train": {"epochs": 2, "budget_epochs": 2, "schedule": "linear", "lr": 0.1, "workers": 1,
                  "save_initial": True, "save_every_steps": 1, **train},
    }


def test_candidates_from_defaults_to_weights_and_names_a_wrong_value():
    assert config_from_dict(tiny_raw("out")).train.candidates_from == "weights"
    assert config_from_dict(tiny_raw("out", candidates_from="ema")).train.candidates_from == "ema"
    with pytest.raises(ConfigError, match=r"train\.candidates_from.*'average' is not one of \['weights', 'ema'\]"):
        config_from_dict(tiny_raw("out", candidates_from="average"))


@pytest.mark.ray
def test_ema_candidates_are_the_ema_at_the_steps_the_weights_are_saved(ray_local, tmp_path):
    """Two base trainings of the same seed: one saves the weights after every step, the other
    the EMA. The EMA recomputed from the first's iterates (the loop's decay rule) equals the
    second's candidates at every step, and its last candidate is the EMA baseline."""
    from twa_ray.runtime.base_train import run_base_training

    weights = run_base_training(config_from_dict(tiny_raw(tmp_path / "weights")))
    ema = run_base_training(config_from_dict(tiny_raw(tmp_path / "ema", candidates_from="ema")))
    w_store, e_store = CandidateStore.open(weights.store_uri), CandidateStore.open(ema.store_uri)
    steps = [c.info["step"] for c in w_store.list_candidates()]
    assert steps == list(range(2 * STEPS_PER_EPOCH + 1))  # 0 .. 8: the same steps either way
    assert [c.info["step"] for c in e_store.list_candidates()] == steps
    w, e = w_store.read(), e_store.read()  # (9, D) each
    expected = [w[0]]  # the EMA starts at the initial weights
    for k in range(1, len(steps)):  # the update after step k, as base_loop makes it
        d = ema_decay(k - 1, 0.9, True)
        expected.append(d * expected[-1] + (1 - d) * w[k])
    expected = torch.stack(expected)
    assert (e - expected).abs().max() <= 1e-5
    assert not torch.allclose(e[2:], w[2:])  # the EMA lags the iterate
    layout = ParamLayout(tuple(w_store.names), tuple(map(tuple, w_store.shapes)))
    last_w, _ = read_final(weights.checkpoint_path, layout)
    _, final_ema = read_final(ema.checkpoint_path, layout)
    assert torch.equal(w[-1], last_w)  # the default: the iterate itself
    assert torch.equal(e[-1], final_ema)  # the last EMA candidate is the EMA baseline's weights


def _fsdp_rank_main(rank: int, world: int, out: str, store_uri: str) -> None:
    """Each rank saves its rows of an EMA-like list (half the weights) in place of the weights:
    once written in pieces, once gathered on rank 0 (a store that cannot be written in pieces)."""
    import fsspec
    import pyarrow.fs as pafs

    from conftest import UnevenNet, SavesEveryStep
    from twa_ray.parallel.sharding.fsdp_candidates import RowCandidateWriter
    from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap, local_shard

    model = fsdp_wrap(UnevenNet(gain=False), world, torch.device("cpu"))
    ema = [local_shard(p).detach() * 0.5 for p in model.parameters()]  # this rank's rows
    store = CandidateStore.open(store_uri)
    writer = RowCandidateWriter(SavesEveryStep(store) if rank == 0 else None, store_uri, rank, world, torch.device("cpu"))
    writer.save(model, kind="epoch", step=1, lr=0.1, metrics={}, weights=ema)
    remote = CandidateStore.open(store.path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file"))))
    gathering = RowCandidateWriter(SavesEveryStep(remote) if rank == 0 else None, store_uri, rank, world,
                                   torch.device("cpu"))
    gathering.save(model, kind="epoch", step=2, lr=0.1, metrics={}, weights=ema)
    writer.save(model, kind="epoch", step=3, lr=0.1, metrics={})  # no weights: the model's own


def test_fsdp_ranks_write_their_rows_of_the_given_weights(tmp_path):
    from conftest import UnevenNet
    from twa_ray.parallel.local_ranks import spawn_ranks

    net = UnevenNet(gain=False)  # the same initial weights as every rank's (seeded in the model)
    store = CandidateStore.create_for_model(str(tmp_path / "store"), net)
    spawn_ranks(_fsdp_rank_main, 2, str(tmp_path), store.uri)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert len(store) == 3
    torch.testing.assert_close(store.read_flat(0), 0.5 * flat)  # in pieces
    torch.testing.assert_close(store.read_flat(1), 0.5 * flat)  # gathered
    torch.testing.assert_close(store.read_flat(2), flat)
