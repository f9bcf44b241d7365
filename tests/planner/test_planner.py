"""The capacity planner agrees with the runtime: projection shards, parameter counts, traffic."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, small_cnn_shard_twa
from twa_ray.__main__ import main as cli
from twa_ray.core import flatten_params
from twa_ray.core.blocks import make_blocks, plan_ranges
from twa_ray.core.collectives import padded_length
from twa_ray.core.params import ParamLayout
from twa_ray.core.projection import build_projection
from twa_ray.models import build_model
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.planner import model_numels, plan_capacity, plan_for_model



@pytest.mark.parametrize("model, dataset", [("small_cnn", "fashion_mnist"), ("mlp", "fashion_mnist"), ("resnet18", "cifar10")])
def test_parameter_count_is_the_real_models(model, dataset):
    shapes = {"fashion_mnist": (10, 1, 28), "cifar10": (10, 3, 32)}[dataset]
    real = ParamLayout.from_model(build_model(model, *shapes))
    names, numels = model_numels(model, dataset)
    assert names == list(real.names) and numels == real.numels


@pytest.mark.parametrize("model", ["small_cnn", "mlp"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("workers, granularity", [(1, "tensor"), (2, "tensor"), (3, "tensor"), (2, "size:500")])
def test_projection_bytes_equal_the_runtime_shards(model, bits, workers, granularity):
    """Each rank's Projection, built from its columns as the runtime builds it, has the planned bytes."""
    torch.manual_seed(0)
    net = build_model(model, 10, 1, 28)
    layout = ParamLayout.from_model(net)
    n = 3
    cands = flatten_params(net) + 0.1 * torch.randn(n, layout.num_params)
    planned = plan_for_model(model, n, bits, workers, granularity, "fashion_mnist")
    blocks = make_blocks(layout.numels, granularity)
    shards = plan_ranges(blocks, bits, workers)
    assert planned.num_params == layout.num_params and planned.num_blocks == len(blocks)
    for rank in range(workers):
        (l0, l1), (start, end) = shards.block_runs[rank], shards.ranges[rank]
        # the rank's parts of its blocks: what the projection packs (its maths is reduced across ranks)
        proj = build_projection(cands[:, start:end].clone(), list(shards.parts[rank]), "normalized", bits)
        assert len(shards.parts[rank]) == l1 - l0
        assert proj.nbytes == planned.projection_bytes[rank]
        assert planned.coords_per_worker[rank] == end - start == proj.numel
        assert planned.center_bytes[rank] == proj.center.numel() * 4
        scale_offset = 0 if bits == 32 else proj.scale.numel() * 4 + proj.offset.numel() * 4
        assert planned.quant_params_bytes[rank] == scale_offset
    assert planned.projection_total_bytes <= 1.01 * planned.ideal_projection_bytes + 8 * n * len(blocks)
    assert planned.model_bytes == 4 * layout.num_params


def test_traffic_from_padded_shards():
    numels = [1000, 10, 3000, 20, 500, 7]
    for k in (2, 3):
        plan = plan_capacity(numels, candidates=5, bits=4, workers=k)
        ranges = plan_ranges(make_blocks(numels, "tensor"), 4, k).ranges
        pad = padded_length(ranges)
        assert plan.padded_length == pad
        assert plan.payload["total"] == 4 * (k * pad + 5 * len(numels) + pad)
        assert plan.payload["paper"] == 2 * 4 * sum(numels)
        assert plan.wire["total"] == pytest.approx((k - 1) / k * 4 * (2 * k * pad + 2 * 5 * len(numels)))
    single = plan_capacity(numels, candidates=5, bits=4, workers=1)
    assert single.payload["total"] == 0 and single.projection_bytes == [5 * sum((m * 4 + 7) // 8 for m in numels)]


def _traffic_worker(rank, world, grad_clip, out_dir):
    """One rank of a real sharded TWA step (the sharded exchange on gloo): bytes_sent of the step."""
    torch.set_num_threads(1)
    net, twa, comm = small_cnn_shard_twa(rank, world, 4, grad_clip=1.0 if grad_clip else None)
    before = comm.bytes_sent
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(net(x), y).backward()
    twa.step()
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"bytes": comm.bytes_sent - before}))


@pytest.mark.parametrize("grad_clip", [False, True])
def test_traffic_equals_bytes_sent_of_a_two_process_step(tmp_path, grad_clip):
    spawn_ranks(_traffic_worker, 2, grad_clip, str(tmp_path))
    planned = plan_for_model("small_cnn", 4, 4, 2, "tensor", "fashion_mnist", grad_clip=grad_clip)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text())["bytes"] == planned.payload["total"]


def test_cli_json_and_report(capsys):
    assert cli(["plan", "--model", "small_cnn", "--candidates", "6", "--bits", "2", "--workers", "2",
                "--dataset", "fashion_mnist", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["workers"] == 2 and len(plan["projection_bytes"]) == 2
    assert plan["projection_bytes"] == plan_for_model("small_cnn", 6, 2, 2, dataset="fashion_mnist").projection_bytes
    assert {"reduce_scatter", "coef_all_reduce", "all_gather", "total", "ratio_to_all_reduce"} <= set(plan["payload"])
    assert cli(["plan", "--model", "resnet18", "--candidates", "20", "--bits", "4", "--workers", "2"]) == 0
    report = capsys.readouterr().out
    assert "memory per worker" in report and "traffic per step" in report and "11,173,962" in report


def test_cli_errors_name_the_problem(capsys):
    assert cli(["plan", "--model", "no_such_model", "--candidates", "5", "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "resnet18" in err
    assert cli(["plan", "--model", "mlp", "--candidates", "5", "--bits", "4", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["plan", "--model", "mlp", "--candidates", "5", "--bits", "3"])


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "twa_ray", "plan", "--model", "mlp", "--candidates", "4", "--bits", "8", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["projection_bytes"] == [4 * 197322]
