"""The planner's FSDP2 mode: exact bytes, agreement with real FSDP2 shards, shapes files, the 7B plan."""
import copy
import json

import pytest
import torch
from torch import nn

from conftest import fake_process_group
from twa_ray.__main__ import main as cli
from twa_ray.models import MODELS, build_model
from twa_ray.planner import (fsdp_imbalance, fsdp_units, load_shapes, model_shapes, plan_capacity, plan_fsdp,
                             plan_for_model)
from twa_ray.planner import llama
from twa_ray.planner.llama import llama_shapes
from twa_ray.core.fsdp_rows import fsdp_padded_numel, fsdp_shard


def test_exact_bytes_of_a_tiny_model():
    """k = 2, n = 3, 2 bits, one block per tensor; worked by hand.

    layers.0.weight (5, 4): 5 rows do not split in 2, 4 columns do: cut on dim 1, 2 columns (10 values) each;
                            padded 10
    layers.0.bias   (5,):   dim 0, ceil(5/2) = 3 -> rank 0: 3, rank 1: 2; padded 3
    head.weight     (3, 4): dim 1, 6 values each; padded 6
    """
    names = ["layers.0.weight", "layers.0.bias", "head.weight"]
    plan = plan_fsdp(names, [(5, 4), (5,), (3, 4)], candidates=3, bits=2, workers=2)
    assert plan.coords_per_worker == [19, 18] and plan.padded_coords == 19
    assert plan.parameter_bytes == plan.gradient_bytes == 4 * 19
    assert plan.twa_buffer_bytes == [2 * 4 * 19, 2 * 4 * 18] and plan.center_bytes == [4 * 19, 4 * 18]
    # 2 bits: ceil(m / 4) bytes per block and candidate: 3 + 1 + 2 on either rank
    assert plan.projection_bytes == [3 * 6, 3 * 6]
    assert plan.quant_params_bytes == [2 * 4 * 3 * 3] * 2  # scale and offset per candidate and block
    assert plan.coefficient_bytes == 4 * 3 * 3 * 2  # X and SGD momentum
    assert plan.total_bytes == [76 + 76 + 152 + 76 + 18 + 72 + 72, 76 + 76 + 144 + 72 + 18 + 72 + 72]  # 542, 530
    # one worker: D = 37, projection 3 x (5 + 2 + 3)
    assert plan.single_worker_bytes == 148 + 148 + 296 + 148 + 30 + 72 + 72  # 914
    assert plan.largest_over_even_share == pytest.approx(542 / (914 / 2))
    assert plan.sharded_imbalance == pytest.approx((76 + 76 + 152 + 76 + 18) / ((148 + 148 + 296 + 148 + 30) / 2))
    assert (plan.num_units, plan.largest_unit) == (2, "layers.0")  # modules layers.0 and head
    assert plan.all_gather_bytes == 4 * 2 * (10 + 3) and plan.transient_bytes == 4 * 104
    assert plan.peak_bytes == [542 + 416, 530 + 416]
    # the same state on one worker is the blocks mode's too
    blocks = plan_capacity([20, 5, 12], 3, 2, 2, names=names, shapes=[(5, 4), (5,), (3, 4)])
    assert blocks.single_worker_bytes == plan.single_worker_bytes and blocks.fsdp == plan


def test_units_are_the_modules_holding_parameters():
    names = ["cls_token", "model.embed.weight", "model.layers.0.q.weight", "model.layers.0.q.bias", "fc.bias"]
    assert fsdp_units(names) == {"": [0], "model.embed": [1], "model.layers.0.q": [2, 3], "fc": [4]}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_planned_shards_equal_real_fsdp2_shards(world):
    """fsdp_wrap (the runtime's fully_shard, with its placements) on the quickstart CNN (a fake process
    group, one rank at a time): the planned parameter storage and owned coordinates are the real
    local shards', to the element; its units are the planner's."""
    from torch.distributed.fsdp import FSDPModule

    from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap

    full = build_model("small_cnn", 10, 1, 28)
    names, shapes = model_shapes("small_cnn", "fashion_mnist")
    plan = plan_fsdp(names, shapes, candidates=4, bits=4, workers=world)
    for rank in range(world):
        with fake_process_group(rank, world):
            net = fsdp_wrap(copy.deepcopy(full), world, torch.device("cpu"))
            wrapped = {key for key, m in net.named_modules() if isinstance(m, FSDPModule)}
            assert wrapped == set(fsdp_units(names)) | {""}  # the root is wrapped last, parameters of its own or not
            locals_ = [p.to_local() for p in net.parameters()]
            assert sum(t.numel() for t in locals_) == plan.coords_per_worker[rank]
            assert sum(t.untyped_storage().nbytes() for t in locals_) == plan.parameter_bytes


@pytest.mark.parametrize("workers", [2, 4, 8, 64])
def test_llama_7b_is_even_within_one_percent(workers):
    shapes = llama_shapes()
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 6_738_415_616
    plan = plan_fsdp(list(shapes), list(shapes.values()), candidates=50, bits=2, workers=workers)
    assert plan.sharded_imbalance <= 1.01 and plan.largest_over_even_share <= 1.01
    assert plan.largest_unit == "model.embed_tokens"  # 32000 x 4096, as large as lm_head (the first wins)
    assert plan.all_gather_bytes == 4 * 32000 * 4096


def test_imbalance_is_the_padding_of_tiny_tensors():
    """Where k divides dim 0 or another dim nothing is padded (factor 1 up to the scale/offset and
    coefficients, which every rank holds); in the quickstart CNN only the head's bias (10 values,
    no dim k divides) is padded, to 12 at k = 4 and 16 at k = 8; the head's weight (10, 128) is cut
    on dim 1."""
    names, shapes = model_shapes("small_cnn", "fashion_mnist")
    plans = {k: plan_fsdp(names, shapes, 20, 2, k) for k in (2, 4, 8)}
    total = sum(torch.Size(s).numel() for s in shapes)
    assert plans[2].padded_coords * 2 == total
    assert plans[4].padded_coords == sum(fsdp_padded_numel(s, 4) for s in shapes)
    assert plans[4].padded_coords * 4 == total + 2 and plans[8].padded_coords * 8 == total + 6
    assert plans[2].sharded_imbalance == pytest.approx(1.0, abs=1e-3)
    assert plans[2].sharded_imbalance < plans[4].sharded_imbalance < plans[8].sharded_imbalance < 1.001


# the planner's table of models (README): every registered model, ViT-H/14 and a 7B Llama
TABLE = [(model, "fashion_mnist" if model == "small_cnn" else "cifar10") for model in MODELS]
TABLE.append(("tv:vit_h_14", "cifar10"))


def test_every_table_model_is_balanced_within_one_percent_at_2_4_8_workers(capsys):
    """Model + gradients + TWA buffers + center + projection of the largest worker <= 1.01 x total/k
    (issue 15's target), for the quickstart CNN, the small ViT (whose (1, 65, 192) position embedding
    FSDP2's dim-0 cut pads to 8 x 65 rows at k = 8: 1.050 before) and every other model, as the
    planner prints it; a dim-0-only placement misses it for the small ViT."""
    rows = {}
    for model, dataset in TABLE:
        names, shapes = model_shapes(model, dataset)
        rows[model] = fsdp_imbalance(names, shapes, 20, 4)
    shapes = llama_shapes()
    rows["llama-7b"] = fsdp_imbalance(list(shapes), list(shapes.values()), 50, 2)
    print("\n".join(f"{m:>14}: " + ", ".join(f"k={k} {v:.4f}" for k, v in r.items()) for m, r in rows.items()))
    for model, by_k in rows.items():
        assert list(by_k) == [2, 4, 8]
        assert max(by_k.values()) <= 1.01, (model, by_k)
    # the rule is what does it: FSDP2's default Shard(0) everywhere pads the small ViT's position embedding
    names, shapes = model_shapes("vit_small", "cifar10")
    dim0 = sum(fsdp_shard(s, 0, 8, dim=0).padded_numel for s in shapes)
    assert dim0 * 8 > 1.04 * sum(torch.Size(s).numel() for s in shapes)
    assert cli(["plan", "--model", "vit_small", "--candidates", "20", "--bits", "4", "--workers", "8"]) == 0
    report = capsys.readouterr().out
    assert "sharded state's largest / (total/k) at k = 2: 1.0000, k = 4: 1.0000, k = 8: 1.0000" in report


def test_blocks_mode_is_balanced_within_one_percent_at_2_4_8_workers():
    """The blocks mode's largest projection <= 1.01 x total/k for every table model (issue 24:
    ranges cut through blocks; whole blocks gave 1.597 for the quickstart CNN and 1.13 for
    ResNet-18 at k = 2), with its coordinates within one of D/k, as the planner prints it."""
    rows = {}
    for model, dataset in TABLE:
        rows[model] = {k: plan_for_model(model, 20, 4, k, dataset=dataset) for k in (2, 4, 8)}
    shapes = llama_shapes()
    numels = [torch.Size(s).numel() for s in shapes.values()]
    rows["llama-7b"] = {k: plan_capacity(numels, 50, 2, k) for k in (2, 4, 8)}
    print("\n".join(f"{m:>14}: " + ", ".join(f"k={k} {p.max_over_even_share:.4f}" for k, p in r.items())
                    for m, r in rows.items()))
    for model, by_k in rows.items():
        assert list(by_k) == [2, 4, 8]
        for k, plan in by_k.items():
            assert plan.max_over_even_share <= 1.01, (model, k, plan.max_over_even_share)
            assert max(plan.coords_per_worker) - min(plan.coords_per_worker) <= 1, (model, k)
    assert len(rows) == len(TABLE) + 1


def test_every_planner_model_at_2_4_8_workers():
    """Both modes plan for every registered model; the FSDP mode is far below the replica.
    The blocks mode refuses none (ranges cut through blocks: the MLP's 4 blocks serve 8 workers)."""
    checked, refused = 0, set()
    for model in MODELS:
        for k in (2, 4, 8):
            try:
                plan = plan_for_model(model, 20, 2, k, dataset="cifar10")
            except ValueError as exc:  # the blocks mode needs k <= blocks
                assert "cannot be shared by" in str(exc), exc
                refused.add((model, k))
                continue
            assert plan.fsdp is not None
            assert max(plan.fsdp.total_bytes) < max(plan.total_bytes)
            assert plan.fsdp.largest_over_even_share >= 1.0
            checked += 1
    assert refused == set()  # the MLP's 4 blocks cut into 8 ranges
    assert checked == 3 * len(MODELS) and len(MODELS) >= 7


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


class _Attention(nn.Module):
    """nn.MultiheadAttention holds in_proj_weight itself and reads out_proj.weight in its forward
    without calling out_proj: one FSDP unit with its submodule."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


@pytest.mark.parametrize("world", [2, 4])
def test_multihead_attention_is_one_unit_with_its_out_proj(world):
    from torch.distributed.fsdp import FSDPModule

    from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap

    full = _Attention()
    names = [n for n, _ in full.named_parameters()]
    assert fsdp_units(names) == {"attn": [0, 1, 2, 3], "head": [4, 5]}
    for rank in range(world):
        with fake_process_group(rank, world):
            net = fsdp_wrap(copy.deepcopy(full), world, torch.device("cpu"))
            wrapped = {key for key, m in net.named_modules() if isinstance(m, FSDPModule)}
            assert wrapped == set(fsdp_units(names)) | {""}
            net(torch.randn(2, 5, 8)).sum().backward()  # out_proj's weight is gathered with attn's
            assert all(p.grad is not None for p in net.parameters())
