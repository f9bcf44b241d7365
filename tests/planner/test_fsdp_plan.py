"""The planner's FSDP2 mode: exact bytes, agreement with real FSDP2 shards, shapes files, the 7B plan."""
import copy
import json

import pytest
import torch

from twa_ray.__main__ import main as cli
from twa_ray.models import MODELS, build_model
from twa_ray.planner import fsdp_units, load_shapes, model_shapes, plan_capacity, plan_fsdp, plan_for_model
from twa_ray.planner import llama
from twa_ray.planner.llama import llama_shapes
from twa_ray.store import fsdp_padded_numel


def test_exact_bytes_of_a_tiny_model():
    """k = 2, n = 3, 2 bits, one block per tensor; worked by hand.

    layers.0.weight (5, 4): ceil(5/2) = 3 rows -> rank 0 rows 0-2 (12 values), rank 1 rows 3-4 (8); padded 12
    layers.0.bias   (5,):   rank 0: 3, rank 1: 2; padded 3
    head.weight     (3, 4): rank 0 rows 0-1 (8), rank 1 row 2 (4); padded 8
    """
    names = ["layers.0.weight", "layers.0.bias", "head.weight"]
    plan = plan_fsdp(names, [(5, 4), (5,), (3, 4)], candidates=3, bits=2, workers=2)
    assert plan.coords_per_worker == [23, 14] and plan.padded_coords == 23
    assert plan.parameter_bytes == plan.gradient_bytes == 4 * 23
    assert plan.twa_buffer_bytes == [2 * 4 * 23, 2 * 4 * 14] and plan.center_bytes == [4 * 23, 4 * 14]
    # 2 bits: ceil(m / 4) bytes per block and candidate: rank 0 3 + 1 + 2, rank 1 2 + 1 + 1
    assert plan.projection_bytes == [3 * 6, 3 * 4]
    assert plan.quant_params_bytes == [2 * 4 * 3 * 3] * 2  # scale and offset per candidate and block
    assert plan.coefficient_bytes == 4 * 3 * 3 * 2  # X and SGD momentum
    assert plan.total_bytes == [92 + 92 + 184 + 92 + 18 + 72 + 72, 92 + 92 + 112 + 56 + 12 + 72 + 72]  # 622, 508
    # one worker: D = 37, projection 3 x (5 + 2 + 3)
    assert plan.single_worker_bytes == 148 + 148 + 296 + 148 + 30 + 72 + 72  # 914
    assert plan.largest_over_even_share == pytest.approx(622 / (914 / 2))
    assert plan.sharded_imbalance == pytest.approx((92 + 92 + 184 + 92 + 18) / ((148 + 148 + 296 + 148 + 30) / 2))
    assert (plan.num_units, plan.largest_unit) == (2, "layers.0")  # modules layers.0 and head
    assert plan.all_gather_bytes == 4 * 2 * (12 + 3) and plan.transient_bytes == 4 * 120
    assert plan.peak_bytes == [622 + 480, 508 + 480]
    # the same state on one worker is the blocks mode's too
    blocks = plan_capacity([20, 5, 12], 3, 2, 2, names=names, shapes=[(5, 4), (5,), (3, 4)])
    assert blocks.single_worker_bytes == plan.single_worker_bytes and blocks.fsdp == plan


def test_units_are_the_modules_holding_parameters():
    names = ["cls_token", "model.embed.weight", "model.layers.0.q.weight", "model.layers.0.q.bias", "fc.bias"]
    assert fsdp_units(names) == {"": [0], "model.embed": [1], "model.layers.0.q": [2, 3], "fc": [4]}


def _fake_group(rank: int, world: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


@pytest.mark.parametrize("world", [2, 4])
def test_planned_shards_equal_real_fsdp2_shards(world):
    """fully_shard on the quickstart CNN (a fake process group, one rank at a time): the planned
    parameter storage and owned coordinates are the real local shards', to the element."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = build_model("small_cnn", 10, 1, 28)
    names, shapes = model_shapes("small_cnn", "fashion_mnist")
    plan = plan_fsdp(names, shapes, candidates=4, bits=4, workers=world)
    for rank in range(world):
        _fake_group(rank, world)
        try:
            net = copy.deepcopy(full)
            mesh = init_device_mesh("cpu", (world,))
            for key in fsdp_units(names):
                if key:
                    fully_shard(net.get_submodule(key), mesh=mesh)
            fully_shard(net, mesh=mesh)
            locals_ = [p.to_local() for p in net.parameters()]
            assert sum(t.numel() for t in locals_) == plan.coords_per_worker[rank]
            assert sum(t.untyped_storage().nbytes() for t in locals_) == plan.parameter_bytes
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("workers", [2, 4, 8, 64])
def test_llama_7b_is_even_within_one_percent(workers):
    shapes = llama_shapes()
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 6_738_415_616
    plan = plan_fsdp(list(shapes), list(shapes.values()), candidates=50, bits=2, workers=workers)
    assert plan.sharded_imbalance <= 1.01 and plan.largest_over_even_share <= 1.01
    assert plan.largest_unit == "model.embed_tokens"  # 32000 x 4096, as large as lm_head (the first wins)
    assert plan.all_gather_bytes == 4 * 32000 * 4096


def test_imbalance_is_the_padding_of_tiny_tensors():
    """Where dim 0 divides by k nothing is padded (factor 1 up to the scale/offset and coefficients,
    which every rank holds); the quickstart CNN's head (10 rows) is padded to 12 at k = 4, 16 at k = 8."""
    names, shapes = model_shapes("small_cnn", "fashion_mnist")
    plans = {k: plan_fsdp(names, shapes, 20, 2, k) for k in (2, 4, 8)}
    assert plans[2].padded_coords * 2 == sum(torch.Size(s).numel() for s in shapes)
    assert plans[4].padded_coords == sum(fsdp_padded_numel(s, 4) for s in shapes)
    assert plans[2].sharded_imbalance == pytest.approx(1.0, abs=1e-3)
    assert plans[2].sharded_imbalance < plans[4].sharded_imbalance < plans[8].sharded_imbalance


def test_every_planner_model_at_2_4_8_workers():
    """Both modes plan for every registered model; the FSDP mode is far below the replica."""
    for model in MODELS:
        for k in (2, 4, 8):
            try:
                plan = plan_for_model(model, 20, 2, k, dataset="cifar10")
            except ValueError:  # the blocks mode needs k <= tensors
                continue
            assert plan.fsdp is not None
            assert max(plan.fsdp.total_bytes) < max(plan.total_bytes)
            assert plan.fsdp.largest_over_even_share >= 1.0


def test_shapes_file_and_cli(tmp_path, capsys):
    path = tmp_path / "llama7b.json"
    assert llama.main([str(path)]) == 0  # python -m twa_ray.planner.llama llama7b.json
    assert "6,738,415,616 parameters" in capsys.readouterr().out
    names, shapes = load_shapes(path)
    assert names[0] == "model.embed_tokens.weight" and shapes[0] == (32000, 4096) and len(names) == 2 + 32 * 9 + 1
    assert cli(["plan", "--model", str(path), "--candidates", "50", "--bits", "2", "--workers", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_params"] == 6_738_415_616 and plan["dataset"] is None
    assert plan["fsdp"]["workers"] == 64 and len(plan["fsdp"]["total_bytes"]) == 64
    assert cli(["plan", "--model", str(path), "--candidates", "50", "--bits", "2", "--workers", "64"]) == 0
    report = capsys.readouterr().out
    assert "twa.sharding: blocks vs fsdp" in report and "/ (total/k)" in report and "6,738,415,616" in report


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ("[[3, 4]]", "expected a non-empty JSON object"),
    ("{}", "expected a non-empty JSON object"),
    ('{"a.weight": [3, 4], "a.bias": [3, 0]}', "parameter 'a.bias': shape must be a non-empty list of positive"),
    ('{"a.weight": "3x4"}', "parameter 'a.weight'"),
    ('{"a.weight": []}', "parameter 'a.weight'"),
])
def test_bad_shapes_file_names_file_and_field(tmp_path, capsys, content, problem):
    path = tmp_path / "model.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="model.json") as info:
        load_shapes(path)
    assert problem in str(info.value)
    assert cli(["plan", "--model", str(path), "--candidates", "5", "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err
