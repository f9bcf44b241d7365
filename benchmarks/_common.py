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
import subprocess
import sys
import threading
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


def replace_block(text: str, begin_mark: str, end_mark: str, block: str, path: Path) -> str:
    """``text`` with everything from ``begin_mark`` to ``end_mark`` (both included) replaced by
    ``block`` (which carries the marks again); SystemExit naming ``path`` when a mark is missing."""
    begin, end = text.find(begin_mark), text.find(end_mark)
    if begin < 0 or end < begin:
        raise SystemExit(f"--readme: {path} has no '{begin_mark}' ... '{end_mark}' block to replace")
    return text[:begin] + block + text[end + len(end_mark):]


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class _LoadWatch:
    """The highest 1-minute load average seen since the benchmark started (sampled every
    ``interval_s`` by a daemon thread): a number measured while something else ran shows it,
    even when the machine was idle again by the time the record was written."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.highest = _load_1m()
        self._interval_s = interval_s
        threading.Thread(target=self._run, name="load-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval_s)
            self.seen(_load_1m())

    def seen(self, load: float | None) -> float | None:
        if load is not None and (self.highest is None or load > self.highest):
            self.highest = load
        return self.highest


LOAD_WATCH = _LoadWatch()


def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit (short), with ``+dirty`` when tracked files differ from it; None
    outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine() -> dict:
    """What the numbers ran on (put next to every measurement): the hardware, the commit, the
    load average now and the highest seen during the run."""
    load = _load_1m()
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
        "max_load_avg_1m": None if LOAD_WATCH.seen(load) is None else round(LOAD_WATCH.highest, 2),
        "git_commit": git_commit(),
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
