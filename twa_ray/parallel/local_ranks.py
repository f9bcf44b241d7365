"""Ranks of one torch.distributed group as processes on this machine, without Ray.

How the benchmarks and tests run collectives between a few local processes (Ray Train sets up
its own group in its workers). ``spawn_ranks`` starts the processes, forms the group and
tears it down in one place, so that no caller repeats (or forgets) the teardown below.
"""
from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable[..., None], world_size: int, *args, backend: str = "gloo",
                timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes, each one rank of
    a ``backend`` process group on 127.0.0.1; returns when all are done.

    ``fn`` must be picklable by reference (a module-level function), as for
    ``torch.multiprocessing.spawn``. A rank that raises makes this raise
    ``ProcessRaisedException`` with that rank's traceback; the other ranks are terminated.
    With ``nccl``, rank r runs on GPU r (the current CUDA device when ``fn`` starts).
    """
    import torch.multiprocessing as mp

    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank_main, args=(fn, world_size, free_port(), backend, timeout_s, args),
             nprocs=world_size, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world_size: int, port: int, backend: str,
               timeout_s: float, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without Python's finalizer: gloo's worker threads can still be releasing the
    # tensors of the last collectives, and a thread that needs the GIL while the interpreter
    # finalizes calls std::terminate (SIGABRT; seen in about 1 run in 15 on 2 cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
