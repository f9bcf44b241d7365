"""Throughput of the projection kernels against the machine's memcpy, and projection bytes.

    python benchmarks/projection.py [--quick | --smoke] [--kernel all | K ...]
                                    [--threads T] [--bits B ...] [--clock wall|cpu] [--native-isa I]

For bits b in {1, 2, 4, 8, 32}, n in {10, 50} candidates and D in {1e6, 1e7} coordinates
(one block; --quick: D=1e6 only), one JSON line per (b, n, D, kernel) and projection
kernel (coef_grad, reconstruct). ``--kernel`` takes one or more of the projection's
kernels (auto, eager, native, triton), timed in the same rounds; ``all`` (default): every
kernel that runs on the device (eager and native on CPU, eager and triton on CUDA).
``ran`` in the JSON is the kernel that actually ran (``auto`` resolved; eager where a
kernel fell back). Per line:

- ``gbps``: projection bytes streamed per second (the packed Q; median of the repeats;
  ``--clock cpu``: per second of this thread's CPU time, for a machine shared with other jobs),
- ``memcpy_gbps``: torch ``copy_`` of a buffer of the same size, timed in the same rounds
  (bytes copied per second),
- ``ratio_to_memcpy``: median over rounds of the paired ratio (target >= 0.6 at 4 bits),
- ``projection_bytes`` next to ``n*D*b/8`` (target <= 1.01) and to the paper's scheme,
  one byte per value for any b < 32 (``n*D`` bytes; 4*n*D at 32 bits).

A first line per bit width (and kernel) checks the kernels against
``Projection.dequantized()`` on a small multi-block projection (``check_rel_err``).
GB/s are bytes / second of the projection (or of the copied buffer), not counting the
gradient or weight vectors the kernels also read and write.
"""
from __future__ import annotations

import argparse
import time

from _common import common_args, emit, machine, memcpy_fn, median, note, paired_ratio, paired_times, set_threads

import torch  # noqa: E402

from twa_ray.core import native  # noqa: E402
from twa_ray.core.projection import KERNELS, Projection, build_projection, resolve_kernel  # noqa: E402

TARGET_MEMCPY_RATIO = 0.6  # at 4 bits
TARGET_BYTES_RATIO = 1.01


def random_projection(n: int, d: int, bits: int, device: str, kernel: str) -> Projection:
    """A one-block projection with random codes (throughput does not depend on the values)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    center = torch.randn(d, generator=gen).to(device)
    if bits == 32:
        data = torch.randn(n, d, generator=gen).to(device)
        proj = Projection(center, data, [d], 32)
        proj.kernel = kernel
        return proj
    nbytes = (d * bits + 7) // 8
    data = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=gen).to(device)
    scale = torch.rand(n, 1, generator=gen).to(device) * 1e-3
    offset = -0.5 * scale * ((1 << bits) - 1)
    proj = Projection(center, data, [d], bits, scale, offset)
    proj.kernel = kernel
    return proj


def device_kernels(device: str) -> list[str]:
    """The kernels that run on ``device`` without a fallback: eager, plus native (CPU, where
    it builds) or triton (CUDA, where triton is installed)."""
    kernels = ["eager"]
    for kernel in ("native", "triton"):
        try:
            if resolve_kernel(kernel, device, 4) == kernel:
                kernels.append(kernel)
        except ValueError:  # not for this device
            pass
    return kernels


def check(bits: int, kernel: str, device: str) -> float:
    """Largest error of both kernels against the dense reference, relative to its scale."""
    gen = torch.Generator().manual_seed(bits)
    sizes = [3000, 37, 5, 20000, 1, 640, 9, 70000]  # cut blocks, grouped small blocks, padding
    w = torch.randn(6, sum(sizes), generator=gen)
    proj = build_projection(w, sizes, "normalized", bits, max_chunk_bytes=1 << 16)
    proj = proj.to(device)
    proj.kernel = kernel
    p = proj.dequantized()
    g = torch.randn(sum(sizes), generator=gen).to(device)
    x = torch.randn(6, len(sizes), generator=gen).to(device)
    ref_g, ref_w, pos = [], proj.center.clone(), 0
    for l, m in enumerate(sizes):
        ref_g.append(p[:, pos : pos + m] @ g[pos : pos + m])
        ref_w[pos : pos + m] += x[:, l] @ p[:, pos : pos + m]
        pos += m
    ref_g = torch.stack(ref_g, dim=1)
    err_g = float((proj.coef_grad(g) - ref_g).abs().max() / ref_g.abs().max())
    err_w = float((proj.reconstruct(x) - ref_w).abs().max() / ref_w.abs().max())
    return max(err_g, err_w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--kernel", nargs="+", default=["all"], choices=[*KERNELS, "all"],
                        help="kernels to time in the same rounds (default: all that run on the device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--bits", type=int, nargs="*", default=None, help="bit widths (default: all; --smoke: 1 4 32)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time (needs --threads 1 on a CPU device): on a machine shared "
                             "with other jobs, time the kernels ran rather than time they waited for a core")
    parser.add_argument("--native-isa", choices=list(native.ISAS), default="auto",
                        help="the native kernel's code path (default: the best this CPU runs)")
    args = parser.parse_args(argv)
    if args.native_isa != "auto":  # what Projection's calls (isa "auto") run
        native.ISAS["auto"] = native.ISAS[args.native_isa]
    if args.clock == "cpu" and (args.threads != 1 or torch.device(args.device).type != "cpu"):
        parser.error("--clock cpu needs --threads 1 and a CPU device (other threads' time would not count)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    set_threads(args.threads)
    if args.smoke:
        configs, repeats = [(10, 100_000)], 2
        bit_list = [1, 4, 32]
    elif args.quick:
        configs, repeats = [(10, 1_000_000), (50, 1_000_000)], 5
        bit_list = [1, 2, 4, 8, 32]
    else:
        configs, repeats = [(n, d) for d in (1_000_000, 10_000_000) for n in (10, 50)], 7
        bit_list = [1, 2, 4, 8, 32]
    repeats = args.repeats or repeats
    bit_list = args.bits or bit_list
    kernels = device_kernels(args.device) if "all" in args.kernel else list(dict.fromkeys(args.kernel))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    for bits in bit_list:
        for kernel in kernels:
            err = check(bits, kernel, args.device)
            emit({"benchmark": "projection", "measure": "correctness", "kernel": kernel,
                  "ran": resolve_kernel(kernel, args.device, bits), "bits": bits, "check_rel_err": err, "mode": mode})
        for n, d in configs:
            proj = random_projection(n, d, bits, args.device, kernels[0])
            gen = torch.Generator().manual_seed(1)
            g = torch.randn(d, generator=gen).to(args.device)
            x = torch.randn(n, 1, generator=gen).to(args.device)
            out = torch.empty(d, device=args.device)
            nbytes = proj.nbytes

            def with_kernel(kernel, fn):
                def run():
                    proj.kernel = kernel
                    return fn()
                return run

            fns = {"memcpy": memcpy_fn(nbytes, args.device)}
            for kernel in kernels:  # every kernel in the same interleaved rounds as memcpy
                fns[(kernel, "coef_grad")] = with_kernel(kernel, lambda: proj.coef_grad(g))
                fns[(kernel, "reconstruct")] = with_kernel(kernel, lambda: proj.reconstruct(x, out))
            times = paired_times(fns, repeats, args.device, clock=clock)
            ideal = n * d * bits / 8
            paper = n * d * (4 if bits == 32 else 1)
            memcpy_gbps = nbytes / median(times["memcpy"]) / 1e9
            info = machine()
            ran = {k: resolve_kernel(k, args.device, bits) for k in kernels}
            for kernel in ran:
                for name in ("coef_grad", "reconstruct"):
                    t = times[(kernel, name)]
                    ratio = paired_ratio(times["memcpy"], t)
                    emit({
                        "benchmark": "projection", "measure": "throughput", "kernel": kernel,
                        "ran": ran[kernel], "op": name,
                        "isa": (native.isa() if args.native_isa == "auto" else args.native_isa)
                        if ran[kernel] == "native" else None,
                        "bits": bits, "n": n, "D": d, "device": args.device, "mode": mode, "repeats": repeats,
                        "clock": args.clock,
                        "projection_bytes": nbytes,
                        "gbps": nbytes / median(t) / 1e9,
                        "gbps_best": nbytes / min(t) / 1e9,
                        "memcpy_gbps": memcpy_gbps,
                        "ratio_to_memcpy": ratio,
                        "target_ratio_to_memcpy": TARGET_MEMCPY_RATIO if bits == 4 else None,
                        "meets_memcpy_target": (ratio >= TARGET_MEMCPY_RATIO) if bits == 4 else None,
                        "ideal_bytes": ideal,
                        "bytes_ratio_to_ideal": nbytes / ideal,
                        "target_bytes_ratio": TARGET_BYTES_RATIO,
                        "meets_bytes_target": nbytes / ideal <= TARGET_BYTES_RATIO,
                        "paper_bytes": paper,
                        "bytes_ratio_to_paper": nbytes / paper,
                        "machine": info,
                    })
                note(f"{kernel} b={bits} n={n} D={d}: coef_grad {nbytes / median(times[(kernel, 'coef_grad')]) / 1e9:.2f}"
                     f" GB/s ({paired_ratio(times['memcpy'], times[(kernel, 'coef_grad')]):.2f} of memcpy), reconstruct "
                     f"{nbytes / median(times[(kernel, 'reconstruct')]) / 1e9:.2f} GB/s "
                     f"({paired_ratio(times['memcpy'], times[(kernel, 'reconstruct')]):.2f}), memcpy {memcpy_gbps:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
