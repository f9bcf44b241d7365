"""twa.exchange: one class per exchange (``parallel.exchanges.EXCHANGES``); the all_reduce and
ring exchanges compute what the sharded one does (gloo ranks)."""
import pytest
import torch
from torch import nn

from conftest import small_cnn_shard_twa
from twa_ray.config import ConfigError, config_from_dict
from twa_ray.core import flatten_params
from twa_ray.parallel.local_ranks import spawn_ranks

RANGES = [(0, 7), (7, 11)]  # uneven: the sharded exchange pads rank 1's 4 values to 7
EXCHANGES = ("sharded", "all_reduce", "ring")


def _exchange_rank(rank: int, world: int, out: str) -> None:
    from twa_ray.parallel.exchanges import make_exchange

    result = {}
    for exchange in EXCHANGES:
        comm = make_exchange(exchange, RANGES, rank, world)
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


def test_all_reduce_and_ring_exchanges_equal_the_sharded_one(tmp_path):
    spawn_ranks(_exchange_rank, 2, str(tmp_path))
    full = torch.arange(11, dtype=torch.float32) * 3  # ranks 1x and 2x
    expected_weights = torch.arange(11, dtype=torch.float32) + 0.5
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start, end = RANGES[rank]
        for exchange in EXCHANGES:
            r = got[exchange]
            assert torch.equal(r["own"], full[start:end]), exchange
            assert torch.equal(r["gathered"], expected_weights), exchange  # exact: slices added to zeros
            assert torch.equal(r["in_place"], expected_weights), exchange
        for exchange in ("all_reduce", "ring"):
            torch.testing.assert_close(got[exchange]["X"], got["sharded"]["X"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got[exchange]["weights"], got["sharded"]["weights"], rtol=1e-6, atol=1e-7)
            assert got[exchange]["X"].abs().sum() > 0  # the step moved
        # payload: a padded reduce-scatter (2 x 7) + two all-gathers (7 each), against three all-reduces of 11;
        # ring: the other rank's range out (reduce-scatter), then its own range, twice (two all-gathers)
        other = 11 - (RANGES[rank][1] - RANGES[rank][0])
        assert got["sharded"]["bytes"] == 4 * (2 * 7 + 7 + 7) and got["all_reduce"]["bytes"] == 4 * 3 * 11
        assert got["ring"]["bytes"] == 4 * (other + 2 * (11 - other))


RING3 = [(0, 5), (5, 6), (6, 13)]  # three ranks, uneven: each range crosses the ring once per collective


class _OneWorkForTheBatch:
    """What ``batch_isend_irecv`` returns on a backend that coalesces (NCCL): one work object
    for the whole batch, whose ``wait`` waits for every op."""

    def __init__(self, works) -> None:
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


def _batch_as_nccl_does(ops):
    return [_OneWorkForTheBatch(_REAL_BATCH_ISEND_IRECV(ops))]


_REAL_BATCH_ISEND_IRECV = torch.distributed.batch_isend_irecv


def _ring3_rank(rank: int, world: int, out: str, one_work: bool = False) -> None:
    from twa_ray.parallel import exchanges

    if one_work:  # gloo answering as NCCL does: one work for the batch
        exchanges.dist.batch_isend_irecv = _batch_as_nccl_does

    # float64 pieces of 2 values: ranges of 5, 1 and 7 values go as 3, 1 and 4 pieces
    comm = exchanges.RingExchange(RING3, rank, world, ring_piece_bytes=16)
    gen = torch.Generator().manual_seed(rank)
    flat = torch.randn(13, generator=gen, dtype=torch.float64)
    own = comm.reduce_scatter_sum(flat.clone()).clone()
    again = comm.reduce_scatter_sum(flat.clone()).clone()  # the receive buffer is reused
    start, end = RING3[rank]
    weights = torch.full((13,), float("nan"), dtype=torch.float64)
    gathered = comm.all_gather(torch.arange(start, end, dtype=torch.float64) * 10 + rank, weights).clone()
    bytes_sent, calls = comm.bytes_sent, []
    weights.fill_(float("nan"))
    overlapped = comm.all_gather(torch.arange(start, end, dtype=torch.float64) * 10 + rank, weights,
                                 in_flight=lambda: calls.append(weights[start:end].clone())).clone()
    torch.save({"flat": flat, "own": own, "again": again, "gathered": gathered, "bytes": bytes_sent,
                "overlapped": overlapped, "in_flight": calls}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("one_work", [False, True], ids=["work_per_op", "one_work_per_batch"])
def test_ring_exchange_on_three_ranks(tmp_path, one_work):
    """With one work per op (gloo) and with one work for the whole batch (NCCL's coalescing:
    the reduce-scatter used to add nothing then)."""
    spawn_ranks(_ring3_rank, 3, str(tmp_path), one_work)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    total = sum(g["flat"] for g in got)  # float64: the order of the sums hardly matters
    expected = torch.cat([torch.arange(s, e, dtype=torch.float64) * 10 + r for r, (s, e) in enumerate(RING3)])
    for rank, g in enumerate(got):
        start, end = RING3[rank]
        torch.testing.assert_close(g["own"], total[start:end], rtol=1e-12, atol=1e-12)
        assert torch.equal(g["again"], g["own"])
        assert torch.equal(g["gathered"], expected)
        # in_flight ran once, after this rank's own slice was in place, and changed nothing
        assert torch.equal(g["overlapped"], expected)
        assert len(g["in_flight"]) == 1 and torch.equal(g["in_flight"][0], expected[start:end])
        # two reduce-scatters: every range but this rank's; all-gather: every range but the next rank's
        nxt = RING3[(rank + 1) % 3]
        assert g["bytes"] == 8 * (2 * (13 - (end - start)) + (13 - (nxt[1] - nxt[0])))


def test_exchange_is_checked_and_auto_follows_the_backend():
    from twa_ray.core.collectives import EXCHANGES as CONFIG_VALUES
    from twa_ray.parallel.exchanges import AUTO, EXCHANGES, make_exchange, resolve_exchange

    assert list(EXCHANGES) == ["sharded", "all_reduce", "ring"]  # twa.exchange -> its class
    assert all(cls.name == name for name, cls in EXCHANGES.items())
    assert CONFIG_VALUES == (AUTO, *EXCHANGES)  # what the config accepts: a class each, and auto
    assert resolve_exchange("auto", "gloo") == "ring"
    assert resolve_exchange("auto", "nccl") == "sharded"
    assert resolve_exchange("sharded", "gloo") == "sharded"
    with pytest.raises(ValueError, match=r"twa.exchange: 'tree' is not one of \['auto', 'sharded', 'all_reduce', 'ring'"):
        resolve_exchange("tree", "gloo")
    with pytest.raises(ValueError, match="twa.exchange: 'tree' is not one of"):
        make_exchange("tree", RANGES, 0, 2, backend="gloo")
    assert type(make_exchange("auto", RANGES, 0, 2, backend="gloo")).__name__ == "RingExchange"
    assert type(make_exchange("auto", RANGES, 0, 2, backend="nccl")).__name__ == "ShardedExchange"
    with pytest.raises(ValueError, match=r"in_flight needs the ring exchange on 2\+ ranks, not 'sharded'"):
        EXCHANGES["sharded"](RANGES, 0, 2).all_gather(torch.zeros(7), torch.zeros(11), in_flight=print)
    with pytest.raises(ValueError, match="2 ranges for 3 ranks"):
        EXCHANGES["ring"](RANGES, 0, 3)
    with pytest.raises(ConfigError, match="twa.exchange"):
        config_from_dict({"twa": {"exchange": "tree"}})
    assert config_from_dict({}).twa.exchange == "auto"
