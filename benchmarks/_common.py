"""Shared helpers of the benchmarks: JSON lines, paired timing, the machine, memcpy.

Every benchmark prints one JSON object per measurement on stdout (progress goes to
stderr). Ratios are taken inside one run, from timings interleaved with their
reference, so a busy or throttled machine slows both sides of a ratio alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout: python benchmarks/NAME.py

import torch  # noqa: E402


def emit(record: dict) -> None:
    """One measurement as one JSON line on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def utc_date() -> str:
    """Now, as the records date their runs (minutes, UTC)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write ``records`` to ``path`` (replacing it; its folder made), one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def machine() -> dict:
    """What the numbers ran on (put next to every measurement)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "load_avg_1m": None if load is None else round(load, 2),
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device="cpu", clock: Callable[[], float] = time.perf_counter) -> float:
    sync(device)
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def paired_times(fns: dict[str, Callable[[], object]], repeats: int, device="cpu", warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run each function once per round, rounds interleaved; seconds per function and round
    (``clock``: wall time; ``time.thread_time`` counts only this thread's CPU time)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn, device, clock))
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (the two were timed next to each other)."""
    return median([a / b for a, b in zip(num, den)])


def memcpy_fn(nbytes: int, device="cpu") -> Callable[[], object]:
    """A torch copy_ of an nbytes buffer (the machine's memcpy; GB/s = nbytes / time)."""
    src = torch.empty(max(1, nbytes), dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    return lambda: dst.copy_(src)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a subset that runs in under 2 minutes")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (tests): seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
