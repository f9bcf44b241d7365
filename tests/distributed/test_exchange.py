"""twa.exchange: the all_reduce exchange computes what the sharded one does (two gloo ranks)."""
import pytest
import torch
from torch import nn

from conftest import small_cnn_shard_twa
from twa_ray.config import ConfigError, config_from_dict
from twa_ray.core import flatten_params
from twa_ray.distributed.local_ranks import spawn_ranks

RANGES = [(0, 7), (7, 11)]  # uneven: the sharded exchange pads rank 1's 4 values to 7


def _exchange_rank(rank: int, world: int, out: str) -> None:
    from twa_ray.distributed.collectives import TorchCollectives

    result = {}
    for exchange in ("sharded", "all_reduce"):
        comm = TorchCollectives(RANGES, rank, world, exchange=exchange)
        flat = torch.arange(11, dtype=torch.float32) * (rank + 1)
        start, end = RANGES[rank]
        own = comm.reduce_scatter_sum(flat.clone())
        weights = torch.full((11,), -1.0)
        gathered = comm.all_gather(torch.arange(start, end, dtype=torch.float32) + 0.5, weights).clone()
        in_place = torch.full((11,), -1.0)
        in_place[start:end] = torch.arange(start, end, dtype=torch.float32) + 0.5
        comm.all_gather(in_place[start:end], in_place)  # own is a view of out
        # a TWA step of the planner's small CNN, as a worker takes it
        net, twa, _ = small_cnn_shard_twa(rank, world, 8, exchange, lr=0.5)
        x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(rank)), torch.arange(8) % 10
        (nn.functional.cross_entropy(net(x), y) * 0.5).backward()  # half of the global mean loss
        twa.step()
        result[exchange] = {"own": own, "gathered": gathered, "in_place": in_place, "X": twa.X.detach().clone(),
                            "weights": flatten_params(net), "bytes": comm.bytes_sent}
    torch.save(result, f"{out}/rank{rank}.pt")


def test_all_reduce_exchange_equals_the_sharded_one(tmp_path):
    spawn_ranks(_exchange_rank, 2, str(tmp_path))
    full = torch.arange(11, dtype=torch.float32) * 3  # ranks 1x and 2x
    expected_weights = torch.arange(11, dtype=torch.float32) + 0.5
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start, end = RANGES[rank]
        for exchange in ("sharded", "all_reduce"):
            r = got[exchange]
            assert torch.equal(r["own"], full[start:end]), exchange
            assert torch.equal(r["gathered"], expected_weights), exchange  # exact: slices added to zeros
            assert torch.equal(r["in_place"], expected_weights), exchange
        torch.testing.assert_close(got["all_reduce"]["X"], got["sharded"]["X"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["all_reduce"]["weights"], got["sharded"]["weights"], rtol=1e-6, atol=1e-7)
        assert got["all_reduce"]["X"].abs().sum() > 0  # the step moved
        # payload: a padded reduce-scatter (2 x 7) + two all-gathers (7 each), against three all-reduces of 11
        assert got["sharded"]["bytes"] == 4 * (2 * 7 + 7 + 7) and got["all_reduce"]["bytes"] == 4 * 3 * 11


def test_exchange_is_checked_and_auto_follows_the_backend():
    from twa_ray.distributed.collectives import TorchCollectives, resolve_exchange

    assert resolve_exchange("auto", "gloo") == "all_reduce"
    assert resolve_exchange("auto", "nccl") == "sharded"
    assert resolve_exchange("sharded", "gloo") == "sharded"
    with pytest.raises(ValueError, match="twa.exchange: 'ring' is not one of"):
        resolve_exchange("ring", "gloo")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        TorchCollectives(RANGES, 0, 2, exchange="auto")
    with pytest.raises(ConfigError, match="twa.exchange"):
        config_from_dict({"twa": {"exchange": "ring"}})
    assert config_from_dict({}).twa.exchange == "auto"
