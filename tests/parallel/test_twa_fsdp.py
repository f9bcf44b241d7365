"""TWA on FSDP2-sharded models (``twa.sharding: fsdp``) against the one-process core: two
gloo ranks without Ray (several bases, bit widths and granularities, uneven and empty row
shards), and the Ray Train run users start, with a lost worker."""
import os

import pytest
import torch
from torch import nn

from conftest import UnevenNet, train_twa_steps, uneven_store
from twa_ray.config import ConfigError, TWAConfig, config_from_dict
from twa_ray.core import TWA, ScheduleSpec, flatten_params
from twa_ray.core.blocks import make_blocks
from twa_ray.core.params import ParamLayout
from twa_ray.core.quant import packed_bytes
from twa_ray.parallel.checkpoint_files import read_sharded
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.parallel.sharding.fsdp_rows import RowLayout, build_fsdp_twa
from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap, local_param_bytes
from twa_ray.store import CandidateStore

WORLD = 2
STEPS = 6
# (bits, basis, granularity, grad_clip)
CASES = [
    (8, "normalized", "tensor", None),
    (32, "normalized", "tensor", None),
    (4, "normalized", "size:20", 0.05),  # the clipping norm is summed over ranks
    (32, "orthonormal", "tensor", None),
    (2, "orthonormal-global", "model", None),
]


def _cfg(bits, basis, granularity, grad_clip) -> TWAConfig:
    return TWAConfig(bits=bits, basis=basis, granularity=granularity, grad_clip=grad_clip, lr=0.2, epochs=1,
                     sharding="fsdp")


def _rank_main(rank: int, world: int, out: str, store_uri: str) -> None:
    store = CandidateStore.open(store_uri)
    results = []
    for case in CASES:
        model = fsdp_wrap(UnevenNet(), world, torch.device("cpu"))
        twa = build_fsdp_twa(model, store, store.candidate_indices(), _cfg(*case), STEPS, rank, world).twa
        train_twa_steps(model, twa, STEPS, rank, world)
        grads = [p.grad.to_local() for p in model.parameters()]
        results.append({
            "X": twa.X.detach().clone(), "weights": twa.weights().clone(), "q": twa.projection.dequantized(),
            # what FSDP all-gathers for the next forward pass
            "full": torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]),
            "projection_bytes": twa.projection.nbytes, "param_bytes": local_param_bytes(model),
            "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
        })
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """Five candidates around the net's initial weights; the gain is the same in all of them."""
    return uneven_store(tmp_path_factory.mktemp("fsdp") / "store")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, store_uri):
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_rank_main, WORLD, str(out), store_uri)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _reference(store_uri, case):
    """The same TWA in one process with the core API."""
    cfg = _cfg(*case)
    model = UnevenNet()
    twa = TWA.from_candidates(
        model, CandidateStore.open(store_uri).read(), bits=cfg.bits, granularity=cfg.granularity, basis=cfg.basis,
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, grad_clip=cfg.grad_clip,
        schedule=ScheduleSpec(kind=cfg.schedule, total_steps=STEPS, warmup_frac=cfg.warmup, epochs=cfg.epochs),
    )
    q = twa.projection.dequantized()
    train_twa_steps(model, twa, STEPS)
    return twa, q


@pytest.mark.parametrize("case", range(len(CASES)))
def test_coefficients_and_weights_equal_the_one_process_core(two_ranks, store_uri, case):
    ref, q = _reference(store_uri, CASES[case])
    rows = RowLayout(ParamLayout.from_model(UnevenNet()), WORLD)
    assert ref.X.abs().sum() > 0
    for rank, results in enumerate(two_ranks):
        got = results[case]
        torch.testing.assert_close(got["X"], ref.X.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["weights"], flatten_params(ref.model), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["full"], got["weights"], rtol=0, atol=0)  # written into FSDP's shards
        torch.testing.assert_close(got["q"], rows.take(q, rank), rtol=0, atol=1e-6)  # this rank's rows of Q


def test_each_rank_holds_its_rows_of_model_gradient_and_projection(two_ranks):
    layout = ParamLayout.from_model(UnevenNet())
    rows = RowLayout(layout, WORLD)
    assert [rows.numel(r) for r in range(WORLD)] == [5 * 3 + 3 + 2 * 5 + 2 + 1, 5 * 3 + 2 + 1 * 5 + 1 + 0]
    for case, (bits, _, granularity, _) in enumerate(CASES):
        blocks = make_blocks(layout.numels, granularity)
        for rank, results in enumerate(two_ranks):
            got = results[case]
            assert got["param_bytes"] == got["grad_bytes"] == 4 * rows.numel(rank)
            own = [sum(rows.numels(rank)[a:b]) for a, b in blocks.tensor_ranges]
            assert got["projection_bytes"] == 5 * sum(packed_bytes(m, bits) for m in own)
    assert sum(r[0]["param_bytes"] for r in two_ranks) == 4 * layout.num_params


def test_fsdp_refuses_what_it_does_not_support():
    base = {"twa": {"sharding": "fsdp"}}
    with pytest.raises(ConfigError, match=r"twa.sharding: 'fsdp' does not support twa.basis: checkpoints"):
        config_from_dict({"twa": {**base["twa"], "basis": "checkpoints"}})
    with pytest.raises(ConfigError, match="twa.sharding: 'fsdp' does not support twa.select_eval"):
        config_from_dict({"twa": {**base["twa"], "select_eval": True}})
    with pytest.raises(ConfigError, match="twa.sharding: 'fsdp' does not support twa.exchange: all_reduce"):
        config_from_dict({"twa": {**base["twa"], "exchange": "all_reduce"}})
    with pytest.raises(ConfigError, match="twa.sharding: 'rows' is not one of"):
        config_from_dict({"twa": {"sharding": "rows"}})
    assert config_from_dict({}).twa.sharding == "blocks"


# ---------------------------------------------------------------- the Ray Train run


def _ray_cfg(out, **twa):
    return config_from_dict({
        "name": "fsdp", "output_dir": str(out), "seed": 3,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 32,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 3, "channels": 1, "image_size": 4}},
        "model": {"name": "mlp", "kwargs": {"hidden": [16, 15]}},  # 15 rows: uneven shards
        "twa": {"workers": 2, "sharding": "fsdp", "bits": 8, "granularity": "tensor", "epochs": 2, "lr": 0.2, **twa},
    })


def _ray_store(cfg, path) -> CandidateStore:
    """Four candidates around a model of ``cfg``."""
    from twa_ray.data.from_config import splits_from_config
    from twa_ray.models.from_config import model_from_config

    torch.manual_seed(0)
    model = model_from_config(cfg, splits_from_config(cfg))
    store = CandidateStore.create_for_model(str(path), model)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        store.append_flat(flatten_params(model) + 0.2 * torch.randn(store.num_params, generator=gen))
    return store


@pytest.mark.ray
def test_ray_run_equals_the_core_and_resumes_after_a_lost_worker(ray_local, tmp_path):
    """Two rounds of two candidates on two workers; one worker is lost in round 2 and the run
    resumes from the last checkpoint, whose origin of round 2 (round 1's w(X)) is every rank's
    rows (DCP), not rank 0's state file. The run ends where the single-process core, round by
    round on the same global batches, does."""
    from twa_ray.core.projection import build_projection
    from twa_ray.data.from_config import splits_from_config
    from twa_ray.models.from_config import model_from_config
    from twa_ray.parallel.batches import ShardedBatchSampler, batches_per_epoch, loader_for
    from twa_ray.parallel.checkpoint_files import load_checkpoint
    from twa_ray.runtime.twa_train import run_twa

    cfg = _ray_cfg(tmp_path / "run", candidates_per_round=2, checkpoint_every_steps=2)
    splits = splits_from_config(cfg)
    store = _ray_store(cfg, tmp_path / "store")
    steps = batches_per_epoch(len(splits.train), 32) * 2  # a round: 2 epochs
    assert steps == 8
    cfg.debug.fail_at_step = 13  # round 2: resumes from the checkpoint at the end of its first epoch (step 12)
    result = run_twa(cfg, store.uri)
    assert (tmp_path / "run" / "debug" / "twa-failed-at-step-13").exists()

    # the single-process core, round by round: round 2 starts at (X = 0 is) round 1's w(X)
    torch.manual_seed(cfg.seed)
    ref_model = model_from_config(cfg, splits)
    layout = ParamLayout.from_model(ref_model)
    blocks, candidates, center, ref_x = make_blocks(layout.numels, "tensor"), store.read(), None, []
    for r, chosen in enumerate(([0, 1], [2, 3])):
        proj = build_projection(candidates[chosen].clone(), blocks.sizes, "normalized", 8, center=center)
        twa = TWA(ref_model, proj, len(blocks), lr=0.2, schedule=ScheduleSpec(cfg.twa.schedule, steps))
        for epoch in range(2):
            sampler = ShardedBatchSampler(len(splits.train), 32, 0, 1, cfg.seed, 1000 * r + epoch)
            for x, y in loader_for(splits.train, sampler):
                ref_model.zero_grad()
                nn.functional.cross_entropy(ref_model(x), y).backward()
                twa.step()
        ref_x.append(twa.X.detach().clone())
        center = flatten_params(ref_model)
    assert len(result.coefficients) == 2 and ref_x[1].abs().sum() > 0
    for got, want in zip(result.coefficients, ref_x):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.weights, flatten_params(ref_model), rtol=0, atol=1e-5)
    assert [h["step"] for h in result.history] == [steps // 2, steps] * 2  # steps within its round

    # each worker holds its rows: about half of the parameters and of the projection
    rows = RowLayout(layout, 2)
    assert result.param_bytes == [4 * rows.numel(r) for r in range(2)]
    assert sum(result.param_bytes) == 4 * store.num_params
    assert sum(result.projection_bytes) == 2 * store.num_params  # 8 bits: one byte per value, 2 candidates
    assert max(result.projection_bytes) <= 0.55 * sum(result.projection_bytes)

    folder = result.checkpoint_path
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(folder))
    assert load_checkpoint(folder)["center"] is None  # rank 0 holds no (D,) vector
    center = read_sharded(folder, "center", dict(zip(layout.names, layout.shapes)))  # both ranks' rows: the weights
    torch.testing.assert_close(torch.cat([center[n].reshape(-1) for n in layout.names]), result.weights, rtol=0, atol=0)
