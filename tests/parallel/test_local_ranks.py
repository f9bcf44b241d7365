"""spawn_ranks: local processes as one gloo group, torn down without Python's finalizer."""
import atexit
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from twa_ray.parallel.local_ranks import free_port, spawn_ranks


def _sum_ranks(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    works = [dist.all_reduce(t.clone(), async_op=True) for _ in range(4)]  # in flight at once
    for w in works:
        w.wait()
    dist.all_reduce(t)
    # os._exit skips atexit: a finalizer that ran would race gloo's threads (SIGABRT)
    atexit.register(Path(out, f"finalized{rank}").write_text, "ran")
    Path(out, f"rank{rank}").write_text(f"{dist.get_rank()} {dist.get_world_size()} {t.item():g}")


def _fails(rank: int, world: int) -> None:
    # every rank: one that failed alone could be reported second, after its peer's lost connection
    raise ValueError(f"rank {rank} of {world} was told to fail")


def test_every_rank_joins_one_group_and_leaves_without_finalizing(tmp_path):
    spawn_ranks(_sum_ranks, 3, str(tmp_path))
    assert [Path(tmp_path, f"rank{r}").read_text() for r in range(3)] == [f"{r} 3 6" for r in range(3)]
    assert not list(tmp_path.glob("finalized*"))


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(mp.ProcessRaisedException, match=r"ValueError: rank [01] of 2 was told to fail"):
        spawn_ranks(_fails, 2, timeout_s=20)


def test_free_port_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
