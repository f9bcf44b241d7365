"""The checks that need a GPU, on a machine with one CUDA device, in under 5 minutes.

    python benchmarks/gpu_check.py [--smoke] [--parts tests,quickstart,projection,step] [--out PATH]

Parts, in this order (each writes one JSON line or more, ``"check": <part>``):

- ``tests``: ``pytest -m gpu tests``, the tests marked ``gpu`` (skipped without CUDA):
  the projection kernels on CUDA against the CPU ones, TWA on a GPU, two NCCL ranks when
  the machine has two GPUs.
- ``quickstart``: the main job (``jobs/cifar_twa.py --config configs/quickstart.yaml``) in
  a fresh output dir, ``runs/gpu_check/<UTC time>``, with the GPU detected: base training's
  log line must say it took one (``GPU_LOG_MARK``). Records its test accuracies and times.
- ``projection``: the projection kernels' GB/s (projection bytes per second) against the
  device's copy bandwidth, with benchmarks/projection.py's ``device_kernels``,
  ``random_projection`` and ``check``: a copy of the same bytes timed in the same rounds
  (``ratio_to_memcpy``), and a 1 GiB copy (``device_copy_gbps``, bytes copied per second).
  Every kernel that runs on the device (eager, triton), n = 20, D = 1e7 at 1, 2, 4, 8, 32
  bits, and D = 1e8 at 4 bits. Target at 4 bits: >= 0.7 of the copy.
- ``step``: benchmarks/step_overhead.py on the device: ResNet-18 (its defaults; again with
  the triton kernel when it runs there) and the quickstart's small CNN (batch 128); the
  TWA step against the SGD step, interleaved.

Writes the JSON lines to benchmarks/results/gpu_check.jsonl (``--out``) and prints a
summary. Exit status: 0 when every check ran and passed, 1 when one failed, 2 without a
CUDA device (unless --smoke).

--smoke: the same machinery at the smallest sizes, on the CPU when there is no GPU (the
tests: only tests/gpu, skipped without CUDA; projection n = 4, D = 1e5 at 1, 4, 32 bits,
eager; step_overhead --smoke; no quickstart). For the tests of this script.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable

from _common import ROOT, machine, median, memcpy_fn, note, paired_ratio, paired_times, utc_date, write_jsonl

import torch  # noqa: E402

PARTS = ("tests", "quickstart", "projection", "step")
SMOKE_PARTS = ("tests", "projection", "step")
GPU_LOG_MARK = "+ 1 GPU"  # twa_ray/runtime/trainer.py words it, base training logs it when it takes a GPU
TARGET_COPY_RATIO = 0.7  # projection kernels at 4 bits, of the device's copy bandwidth (issue 16)
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b")
PYTEST_SKIP = re.compile(r"^SKIPPED \[(\d+)\] ([^:]+(?::\d+)?): (.*)$")  # pytest -rs: "SKIPPED [2] file:152: reason"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes, CPU allowed (tests of this script)")
    parser.add_argument("--parts", default=None,
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all; --smoke: {','.join(SMOKE_PARTS)})")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.jsonl"), help="JSON lines file")
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for pytest -m gpu")
    parser.add_argument("--quickstart-timeout", type=float, default=240.0, help="seconds for the quickstart job")
    args = parser.parse_args(argv)
    parts = (args.parts.split(",") if args.parts else list(SMOKE_PARTS if args.smoke else PARTS))
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]  # always in the documented order
    return args


def device_record() -> dict:
    """The device the checks run on."""
    if not torch.cuda.is_available():
        return {"check": "device", "ok": True, "device": "cpu", "name": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {"check": "device", "ok": True, "device": "cuda", "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "device_count": torch.cuda.device_count(), "cuda": torch.version.cuda, "torch": torch.__version__}


# ---------------------------------------------------------------- tests


def parse_pytest_counts(output: str) -> dict[str, int]:
    """Counts of pytest's final line ("3 passed, 1 skipped, 240 deselected in 9.1s"), every
    outcome present (0 when absent); "error" and "errors" both count as ``errors``."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "deselected", "errors", "xfailed", "xpassed")}
    lines = [line for line in output.splitlines() if line.strip()]
    for n, outcome in PYTEST_COUNT.findall(lines[-1] if lines else ""):
        counts["errors" if outcome.startswith("error") else outcome] += int(n)
    return counts


def parse_pytest_skips(output: str) -> list[dict]:
    """The skipped tests of a ``pytest -rs`` run, from its short summary: each as
    {"count", "where", "reason"} (pytest groups the skips of one place and reason)."""
    return [{"count": int(n), "where": where, "reason": reason}
            for n, where, reason in (m.groups() for m in map(PYTEST_SKIP.match, output.splitlines()) if m)]


def check_tests(smoke: bool, cuda: bool, timeout: float) -> dict:
    target = ROOT / "tests" / ("gpu" if smoke else "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", str(target)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = parse_pytest_counts(proc.stdout)
    ok = proc.returncode == 0 and not counts["failed"] and not counts["errors"] and (counts["passed"] > 0 or not cuda)
    record = {"check": "tests", "ok": ok, "returncode": proc.returncode, **counts,
              "skipped_tests": parse_pytest_skips(proc.stdout), "seconds": time.perf_counter() - started, "command": " ".join(cmd[1:])}
    if not ok:
        record["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return record


# ---------------------------------------------------------------- quickstart


def check_quickstart(timeout: float) -> dict:
    out_dir = ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cmd = [sys.executable, str(ROOT / "jobs" / "cifar_twa.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"output_dir={out_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of this machine
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    used_gpu = GPU_LOG_MARK in log
    ok = proc.returncode == 0 and summary is not None and used_gpu
    record = {"check": "quickstart", "ok": ok, "returncode": proc.returncode, "used_gpu": used_gpu,
              "seconds": time.perf_counter() - started, "output_dir": str(out_dir), "command": " ".join(cmd[1:])}
    if summary is not None:
        record.update(test_acc=summary.get("test_acc"), time_s=summary.get("time_s"),
                      cost_ratio=summary.get("cost_ratio"), wall_ratio=summary.get("wall_ratio"))
    if not ok:
        record["output_tail"] = log[-3000:]
    return record


# ---------------------------------------------------------------- projection kernels


def copy_gbps(nbytes: int, device: str, repeats: int) -> float:
    """Bytes copied per second by a torch copy_ of ``nbytes`` on ``device``, median of the repeats."""
    times = paired_times({"copy": memcpy_fn(nbytes, device)}, repeats, device)
    return nbytes / median(times["copy"]) / 1e9


def check_projection(smoke: bool, device: str) -> list[dict]:
    import projection as bench  # benchmarks/projection.py

    n, d, big = (4, 100_000, None) if smoke else (20, 10_000_000, 100_000_000)
    widths = (1, 4, 32) if smoke else (1, 2, 4, 8, 32)
    repeats, copy_bytes = (2, 8 << 20) if smoke else (10, 1 << 30)
    device_copy = copy_gbps(copy_bytes, device, repeats)
    records = [{"check": "projection", "ok": True, "measure": "device_copy", "bytes": copy_bytes, "gbps": device_copy}]
    for kernel in ["eager"] if smoke else bench.device_kernels(device):
        for bits in widths:
            try:
                err = bench.check(bits, kernel, device)
                for dim in [d] + ([big] if big and bits == 4 else []):
                    records += _projection_throughput(bench, kernel, bits, n, dim, device, repeats, device_copy, err)
            except Exception as exc:  # noqa: BLE001 - one kernel failing on this device must not hide the others
                records.append({"check": "projection", "ok": False, "measure": "throughput", "kernel": kernel,
                                "bits": bits, "error": f"{type(exc).__name__}: {exc}"})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return records


def _projection_throughput(bench, kernel: str, bits: int, n: int, d: int, device: str, repeats: int,
                           device_copy: float, check_err: float) -> list[dict]:
    proj = bench.random_projection(n, d, bits, device, kernel)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(d, generator=gen).to(device)
    x = torch.randn(n, 1, generator=gen).to(device)
    out = torch.empty(d, device=device)
    fns: dict[str, Callable[[], object]] = {
        "memcpy": memcpy_fn(proj.nbytes, device),
        "coef_grad": lambda: proj.coef_grad(g),
        "reconstruct": lambda: proj.reconstruct(x, out),
    }
    times = paired_times(fns, repeats, device)
    records = []
    for op in ("coef_grad", "reconstruct"):
        gbps = proj.nbytes / median(times[op]) / 1e9
        ratio = paired_ratio(times["memcpy"], times[op])
        records.append({
            "check": "projection", "ok": check_err < 1e-4, "measure": "throughput", "kernel": kernel, "op": op,
            "bits": bits, "n": n, "D": d, "device": device, "projection_bytes": proj.nbytes,
            "max_chunk_bytes": proj.max_chunk_bytes, "check_rel_err": check_err, "gbps": gbps,
            "memcpy_gbps": proj.nbytes / median(times["memcpy"]) / 1e9,
            "ratio_to_memcpy": ratio, "device_copy_gbps": device_copy, "ratio_to_device_copy": gbps / device_copy,
            "target_ratio": TARGET_COPY_RATIO if bits == 4 else None,
            "meets_target": ratio >= TARGET_COPY_RATIO if bits == 4 else None,
        })
    return records


# ---------------------------------------------------------------- TWA step against SGD step


def captured_records(main: Callable[[list[str]], int], argv: list[str]) -> list[dict]:
    """Run a benchmark's ``main(argv)`` here; the JSON lines it printed on stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(argv)
    if status:
        raise RuntimeError(f"{main.__module__}.main({argv}) returned {status}")
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def check_step(smoke: bool, device: str) -> list[dict]:
    import projection as bench  # benchmarks/projection.py
    import step_overhead  # benchmarks/step_overhead.py

    runs = [["--smoke"]] if smoke else [[], ["--model", "small_cnn", "--batch", "128"]]
    if not smoke and "triton" in bench.device_kernels(device):
        runs.append(["--kernel", "triton"])
    records = []
    for extra in runs:
        try:
            for r in captured_records(step_overhead.main, ["--device", device, *extra]):
                records.append({"check": "step", "ok": True, **{k: v for k, v in r.items() if k != "benchmark"}})
        except Exception as exc:  # noqa: BLE001 - recorded, and the check fails
            records.append({"check": "step", "ok": False, "argv": extra, "error": f"{type(exc).__name__}: {exc}"})
    return records


# ---------------------------------------------------------------- summary


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_lines(records: list[dict]) -> list[str]:
    """The records of one run as a few human lines: per check ok/FAILED and its numbers."""
    by_check: dict[str, list[dict]] = {}
    for r in records:
        by_check.setdefault(r["check"], []).append(r)
    lines = []
    for check, rows in by_check.items():
        skips = [s for r in rows for s in r.get("skipped_tests", ())]
        status = "FAILED" if not all(r["ok"] for r in rows) else "skipped" if skips else "ok"
        if check == "device":
            r = rows[0]
            detail = r["name"] + (f", {r['memory_gib']} GiB, CUDA {r['cuda']}, torch {r['torch']}" if r["device"] == "cuda" else "")
        elif check == "tests":
            r = rows[0]
            detail = r.get("error") or ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if r.get(k)) \
                or "no tests ran"
            detail += f" ({r['seconds']:.0f} s)" if "seconds" in r else ""
            detail += "".join(f"; skipped {s['count']} at {s['where']}: {s['reason']}" for s in skips)
        elif check == "quickstart":
            r = rows[0]
            acc = r.get("test_acc") or {}
            detail = r.get("error") or (
                f"{'GPU used' if r['used_gpu'] else 'GPU NOT used'}; test acc "
                + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items() if v is not None)
                + f"; {r['seconds']:.0f} s, {r['output_dir']}")
        elif check == "projection":
            copy = next((r for r in rows if r.get("measure") == "device_copy"), None)
            parts = [f"device copy {copy['gbps']:.0f} GB/s"] if copy else []
            for r in rows:
                if r.get("error"):
                    parts.append(f"{r['kernel']} {r['bits']} bits: {r['error']}")
                elif r.get("measure") == "throughput" and r["bits"] == 4:
                    parts.append(f"4 bits {r['kernel']} {r['op']} D={r['D']:.0e}: {r['gbps']:.0f} GB/s = "
                                 f"{_ratio(r['ratio_to_memcpy'])} of copy "
                                 f"({'met' if r['meets_target'] else 'not met'}: >= {r['target_ratio']})")
            detail = "; ".join(parts)
        elif check == "step":
            detail = "; ".join(
                r.get("error") or f"{r['model']} batch {r['batch']}: TWA/SGD {_ratio(r['ratio_twa_to_sgd'])} "
                f"({'met' if r['meets_target'] else 'not met'}: <= {r['target_ratio']}), "
                f"SGD {1e3 * r['sgd_step_s']:.1f} ms, TWA {1e3 * r['twa_step_s']:.1f} ms"
                for r in rows)
        else:
            detail = rows[0].get("error", "")
        lines.append(f"  {check:<11} {status:<7} {detail}")
    failed = [c for c, rows in by_check.items() if not all(r["ok"] for r in rows)]
    skipped = sum(s["count"] for r in records for s in r.get("skipped_tests", ()))
    lines.append(f"FAILED: {', '.join(failed)}" if failed else
                 f"all checks that ran passed; {skipped} test(s) skipped, see above" if skipped else "all checks passed")
    return lines


# ---------------------------------------------------------------- main


def run_part(part: str, args, cuda: bool, device: str) -> list[dict]:
    """The records of one part; an exception becomes one failed record."""
    try:
        if part == "tests":
            return [check_tests(args.smoke, cuda, args.tests_timeout)]
        if part == "quickstart":
            return [check_quickstart(args.quickstart_timeout)]
        if part == "projection":
            return check_projection(args.smoke, device)
        return check_step(args.smoke, device)
    except Exception as exc:  # noqa: BLE001 - a timeout or crash of one part: recorded, the others still run
        return [{"check": part, "ok": False, "error": f"{type(exc).__name__}: {exc}"}]


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}: "
              "torch.cuda.is_available() is False). Run it on a machine with a GPU, or with --smoke for the "
              "parts a CPU can run.", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    mode = "smoke" if args.smoke else "full"
    started, date, info = time.perf_counter(), utc_date(), machine()
    records = [device_record()]
    for part in args.parts:
        note(f"gpu_check: {part} ...")
        part_started = time.perf_counter()
        records += run_part(part, args, cuda, device)
        note(f"gpu_check: {part} done in {time.perf_counter() - part_started:.0f} s")
    total = time.perf_counter() - started
    records = [{"benchmark": "gpu_check", "mode": mode, "date": date, **r, "machine": info} for r in records]
    path = write_jsonl(args.out, records)
    print(f"gpu_check ({mode}) on {records[0]['name']}, {date}, {total:.0f} s:")
    print("\n".join(summary_lines(records)))
    print(f"JSON lines: {path}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
