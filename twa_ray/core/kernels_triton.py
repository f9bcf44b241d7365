"""Triton kernels for the projection's two chunk operations on packed b-bit codes: the
implementation behind ``twa_ray.core.kernels.TritonKernel``.

The contract, written in torch by ``reference_grad(bits)`` / ``reference_reconstruct(bits)``: a
chunk of packed bytes raw (n, B) uint8, a byte holding per = 8/b codes, code k of byte j
in bits [k*b, (k+1)*b) and read in place as code_k * 2^(k*b) (``bytes & mask_k``):

    triton_grad:        (raw (n, B), gt (per, B) float32) -> (n,) float32
                        [i] = sum_{j,k} (code_k(raw[i, j]) - 2^(b-1)) * 2^(k*b) * gt[k, j]
                        (gt: the de-interleaved gradient, already scaled by 2^(-k*b))
    triton_reconstruct: (raw (n, B), w (n,) float32) -> (per, B) float32
                        [k, j] = sum_i w[i] * code_k(raw[i, j]) * 2^(k*b)

for b in 1, 2, 4, 8. Codes are unpacked in registers (no float copy of the codes); both
kernels tile over (rows, bytes). The gradient writes one float32 partial sum per
(row, tile of bytes), added in float64 afterwards; reconstruction adds over the rows
inside the kernel. Both are deterministic (no atomics).

Parity-tested against the eager chunk kernels under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors); not yet measured on a GPU:
``benchmarks/gpu_check.py`` measures them (and the tile sizes are untuned) when a GPU
is lent. Triton is imported on first use, so this module imports without it; the
kernels are built on first use too (``triton.jit`` reads ``TRITON_INTERPRET`` when it
decorates), once per mode.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .quant import check_bits

# Bound on first use (_kernels): the kernels below look `tl` up in this module's globals.
tl = None

# Codes per row of a tile (PER * BLOCK_B) and rows per tile: defaults, not yet tuned on a GPU.
TILE_CODES = 1024
TILE_ROWS = 8

_KERNELS: dict[bool, tuple[Callable, Callable]] = {}  # interpreter mode -> (grad, reconstruct)


def _import_triton():
    """The triton module, or an ImportError that says what needs it."""
    try:
        import triton
        import triton.language
    except ImportError as exc:
        raise ImportError(
            f"the 'triton' projection kernel needs the triton package ({exc}); "
            "install it (pip install triton) or use kernel 'eager'"
        ) from exc
    return triton


def _interpreting(triton) -> bool:
    return bool(triton.knobs.runtime.interpret)


def require_triton(device: torch.device | str = "cuda") -> None:
    """Raise ImportError (no triton) or RuntimeError (no way to run it on ``device``).

    The kernels run on CUDA tensors, or on any tensors under the Triton interpreter
    (``TRITON_INTERPRET=1``: the parity tests on CPU).
    """
    triton = _import_triton()
    device = torch.device(device)
    if _interpreting(triton):
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("the 'triton' projection kernel needs a CUDA GPU: torch sees none")
        return
    raise RuntimeError(
        f"the 'triton' projection kernel runs on CUDA tensors, not {device.type} ones "
        "(CPU tensors only under the Triton interpreter, TRITON_INTERPRET=1)"
    )


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the kernels can run on tensors of ``device`` (``require_triton`` says why not)."""
    try:
        require_triton(device)
    except (ImportError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------- the contract, in torch


def reference_grad(bits: int) -> Callable:
    """The contract of ``triton_grad``, in torch: (raw (n, B) uint8, gt (per, B) float:
    de-interleaved, 2^-kb scaled) -> (n,) dot products of the centred codes
    (code - 2^(b-1)) with g."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]
    shifts = [float((1 << (bits - 1)) << (k * bits)) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        acc = ((raw & masks[0]).to(torch.float32) - shifts[0]) * gt[0]
        for k in range(1, len(masks)):
            acc = acc + ((raw & masks[k]).to(torch.float32) - shifts[k]) * gt[k]
        return acc.sum(dim=1)

    return kernel


def reference_reconstruct(bits: int) -> Callable:
    """The contract of ``triton_reconstruct``, in torch: (raw (n, B) uint8, w (n,)) ->
    (per, B): sum_i w_i * code_k(byte j) * 2^(k*b)."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.stack([((raw & m).to(torch.float32) * w[:, None]).sum(dim=0) for m in masks])

    return kernel


# ---------------------------------------------------------------- kernels (decorated on first use)


def _grad_kernel(raw_ptr, gt_ptr, part_ptr, n, B, s_rn, s_rb, s_gk, s_gb, n_tiles,
                 BITS: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    # axis 0 over rows, so the programs that share a tile of gt run one after another (L2)
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ks = tl.arange(0, PER)
    rmask = rows < n
    cmask = cols < B
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    raw = tl.load(raw_ptr + rows64[:, None] * s_rn + cols64[None, :] * s_rb,
                  mask=rmask[:, None] & cmask[None, :], other=0)  # (BLOCK_N, BLOCK_B) uint8
    gt = tl.load(gt_ptr + ks[:, None] * s_gk + cols64[None, :] * s_gb,
                 mask=cmask[None, :], other=0.0)  # (PER, BLOCK_B); 0 past B cancels the padding
    shift = ks * BITS
    masks = tl.full([PER], (1 << BITS) - 1, tl.int32) << shift
    centre = tl.full([PER], 1 << (BITS - 1), tl.int32) << shift
    # (code_k - 2^(b-1)) * 2^(k*b): exact in int32 and in float32
    codes = (raw.to(tl.int32)[:, None, :] & masks[None, :, None]) - centre[None, :, None]
    prod = codes.to(tl.float32) * gt[None, :, :]  # (BLOCK_N, PER, BLOCK_B)
    part = tl.sum(tl.sum(prod, axis=2), axis=1)  # (BLOCK_N,)
    tl.store(part_ptr + rows64 * n_tiles + pid_b, part, mask=rmask)


def _reconstruct_kernel(raw_ptr, w_ptr, out_ptr, n, B, s_rn, s_rb, s_w, s_ok, s_ob,
                        BITS: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_b = tl.program_id(0)
    cols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ks = tl.arange(0, PER)
    cmask = cols < B
    cols64 = cols.to(tl.int64)
    masks = tl.full([PER], (1 << BITS) - 1, tl.int32) << (ks * BITS)
    acc = tl.zeros([PER, BLOCK_B], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        rmask = rows < n
        rows64 = rows.to(tl.int64)
        raw = tl.load(raw_ptr + rows64[:, None] * s_rn + cols64[None, :] * s_rb,
                      mask=rmask[:, None] & cmask[None, :], other=0)  # (BLOCK_N, BLOCK_B) uint8
        w = tl.load(w_ptr + rows64 * s_w, mask=rmask, other=0.0)  # (BLOCK_N,)
        codes = (raw.to(tl.int32)[:, None, :] & masks[None, :, None]).to(tl.float32)  # code_k * 2^(k*b)
        acc += tl.sum(codes * w[:, None, None], axis=0)
    tl.store(out_ptr + ks[:, None] * s_ok + cols64[None, :] * s_ob, acc, mask=cmask[None, :])


def _kernels() -> tuple[Callable, Callable]:
    """(grad, reconstruct) jitted for the current mode (compiled, or the interpreter)."""
    global tl
    triton = _import_triton()
    mode = _interpreting(triton)
    if mode not in _KERNELS:
        tl = triton.language
        _KERNELS[mode] = (triton.jit(_grad_kernel), triton.jit(_reconstruct_kernel))
    return _KERNELS[mode]


# ---------------------------------------------------------------- wrappers


def _tiles(bits: int, block_n: int | None, block_b: int | None) -> tuple[int, int, int]:
    """(per, rows per tile, bytes per tile); tile sizes must be powers of two."""
    if check_bits(bits) == 32:
        raise ValueError("the triton kernels work on packed codes: bits must be 1, 2, 4 or 8")
    per = 8 // bits
    block_n = TILE_ROWS if block_n is None else block_n
    block_b = TILE_CODES // per if block_b is None else block_b
    for name, v in (("block_n", block_n), ("block_b", block_b)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    return per, block_n, block_b


def _check_raw(raw: torch.Tensor) -> None:
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"raw must be (n, B) uint8, got {tuple(raw.shape)} {raw.dtype}")
    require_triton(raw.device)


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_grad(raw: torch.Tensor, gt: torch.Tensor, bits: int, *,
                block_n: int | None = None, block_b: int | None = None) -> torch.Tensor:
    """Dot products of the centred codes with g: raw (n, B) uint8, gt (per, B) float32
    (the de-interleaved g, row k scaled by 2^(-k*b)) -> (n,) float32, as
    ``reference_grad(bits)(raw, gt)``. ``block_n``/``block_b``: tile sizes
    (powers of two; default TILE_ROWS and TILE_CODES / per)."""
    per, block_n, block_b = _tiles(bits, block_n, block_b)
    _check_raw(raw)
    n, cols = raw.shape
    if gt.shape != (per, cols) or gt.dtype != torch.float32 or gt.device != raw.device:
        raise ValueError(f"gt must be ({per}, {cols}) float32 on {raw.device}, "
                         f"got {tuple(gt.shape)} {gt.dtype} on {gt.device}")
    if n == 0 or cols == 0:
        return torch.zeros(n, device=raw.device)
    grid = (-(-n // block_n), -(-cols // block_b))
    part = torch.empty(n, grid[1], device=raw.device)  # one float32 sum per (row, tile of bytes)
    with _on(raw.device):
        _kernels()[0][grid](raw, gt, part, n, cols, raw.stride(0), raw.stride(1), gt.stride(0), gt.stride(1),
                            grid[1], BITS=bits, PER=per, BLOCK_N=block_n, BLOCK_B=block_b)
    return part.sum(dim=1, dtype=torch.float64).float()


def triton_reconstruct(raw: torch.Tensor, w: torch.Tensor, bits: int, *,
                       block_n: int | None = None, block_b: int | None = None) -> torch.Tensor:
    """Weighted sum of the codes: raw (n, B) uint8, w (n,) float32 -> (per, B) float32 with
    [k, j] = sum_i w[i] * code_k(raw[i, j]) * 2^(k*b), as
    ``reference_reconstruct(bits)(raw, w)``. Tile sizes as in ``triton_grad``."""
    per, block_n, block_b = _tiles(bits, block_n, block_b)
    _check_raw(raw)
    n, cols = raw.shape
    if w.shape != (n,) or w.dtype != torch.float32 or w.device != raw.device:
        raise ValueError(f"w must be ({n},) float32 on {raw.device}, got {tuple(w.shape)} {w.dtype} on {w.device}")
    if n == 0 or cols == 0:
        return torch.zeros(per, cols, device=raw.device)
    out = torch.empty(per, cols, device=raw.device)  # the kernel writes every entry
    grid = (-(-cols // block_b),)
    with _on(raw.device):
        _kernels()[1][grid](raw, w, out, n, cols, raw.stride(0), raw.stride(1), w.stride(0),
                            out.stride(0), out.stride(1), BITS=bits, PER=per, BLOCK_N=block_n, BLOCK_B=block_b)
    return out
