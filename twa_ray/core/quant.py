"""b-bit quantisation of directions with true bit packing (8/b values per byte).

A row u (m,) is stored as codes q in [0, 2^b - 1] with a scale and an offset:
``u ~ offset + scale * q`` (min-max uniform quantisation, so every entry is within
scale/2 of its float). Codes are packed little-end first: value k of a byte sits in
bits [k*b, (k+1)*b). A row of m entries takes exactly ceil(m*b/8) bytes.
"""
from __future__ import annotations

import torch

BITS = (1, 2, 4, 8, 32)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not one of {list(BITS)}")
    return bits


def quantize(
    u: torch.Tensor, bits: int, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise rows of u (n, m) float -> codes (n, m) uint8, scale (n,), offset (n,).

    A constant row (max == min, e.g. a zero direction) gets scale 0 and codes 0, and
    dequantises exactly to its value. Rows of no entries (m = 0, the block of a
    zero-size parameter) get scale 0 and offset 0.

    ``bounds`` = (lo (n,), hi (n,)) replaces each row's min and max: u holds a part of
    longer rows (a rank's part of a block) whose min and max they are.
    """
    check_bits(bits)
    if bits == 32:
        raise ValueError("bits=32 keeps float32 values: there is nothing to quantise")
    levels = (1 << bits) - 1
    u = u.float()
    if bounds is not None:
        lo, hi = (b.to(u.device, torch.float32) for b in bounds)
    elif u.shape[1] == 0:  # amin/amax have no identity to return for an empty row
        zeros = u.new_zeros(u.shape[0])
        return torch.zeros(u.shape, dtype=torch.uint8, device=u.device), zeros, zeros.clone()
    else:
        lo = u.amin(dim=1)
        hi = u.amax(dim=1)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((u - lo[:, None]) / safe[:, None]).clamp_(0, levels)
    codes = torch.where(scale[:, None] > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """codes (n, m) -> (n, m) float32 = offset + scale * codes."""
    return offset[:, None] + scale[:, None] * codes.float()


def packed_bytes(m: int, bits: int) -> int:
    """Bytes a row of m b-bit codes takes: ceil(m*b/8) (bits=32: 4m, the float32 values).

    The one byte count of the package: projection storage, shard balancing and plans.
    """
    return (m * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (n, m) uint8 in [0, 2^b) -> packed (n, ceil(m*b/8)) uint8."""
    check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per_byte = 8 // bits
    n, m = codes.shape
    nbytes = packed_bytes(m, bits)
    padded = torch.zeros(n, nbytes * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:, :m] = codes
    groups = padded.view(n, nbytes, per_byte)
    out = torch.zeros(n, nbytes, dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        out |= groups[:, :, k] << (k * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, m: int | None = None) -> torch.Tensor:
    """packed (n, B) uint8 -> codes (n, m) uint8 (m defaults to B*8/b)."""
    check_bits(bits)
    if bits == 8:
        return packed if m is None else packed[:, :m]
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(packed.shape[0], packed.shape[1] * per_byte)
    return codes if m is None else codes[:, :m]
