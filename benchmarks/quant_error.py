"""How faithful the projection's b-bit directions are, on a real candidate store.

    python benchmarks/quant_error.py --store runs/head_stage/candidates [--bits 1 2 4 8] [--basis normalized]
    python benchmarks/quant_error.py --smoke          # a synthetic store (the tests)

TWA builds the basis as it trains (``core.subspace.build_basis``, one block per tensor), then
quantises each direction block-wise with min-max codes (``core.quant``). Per width b, one JSON
line: over all directions and blocks, weighted by block size,

- ``norm_ratio``: ||dequantised|| / ||direction||: how much longer a b-bit direction is, so how
  much further one coefficient step moves the weights than at 32 bits;
- ``cosine``: cos(dequantised, direction): the share of a step that goes where it should;
- ``rel_err``: ||dequantised - direction|| / ||direction||.

At 1 bit min-max codes put every entry at its block's min or max, so a step lands far from
the direction (the reason 1-bit TWA does not train: README, Results).
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from _common import emit, machine, note

from twa_ray.core.blocks import make_blocks
from twa_ray.core.quant import dequantize, quantize
from twa_ray.core.subspace import build_basis
from twa_ray.store import CandidateStore


def direction_fidelity(u: torch.Tensor, sizes: list[int], bits: int) -> dict:
    """Basis (n, D) with blocks ``sizes`` -> norm_ratio, cosine, rel_err of its b-bit codes
    (block-size-weighted means over every direction and block)."""
    total, acc = 0, {"norm_ratio": 0.0, "cosine": 0.0, "rel_err": 0.0}
    pos = 0
    for m in sizes:
        block = u[:, pos:pos + m].double()
        pos += m
        norms = block.norm(dim=1)
        keep = norms > 0
        if m == 0 or not keep.any():
            continue
        block, norms = block[keep], norms[keep]
        deq = dequantize(*quantize(block.float(), bits)).double()
        acc["norm_ratio"] += float((deq.norm(dim=1) / norms).sum()) * m
        acc["cosine"] += float(((deq * block).sum(dim=1) / (deq.norm(dim=1).clamp_min(1e-300) * norms)).sum()) * m
        acc["rel_err"] += float(((deq - block).norm(dim=1) / norms).sum()) * m
        total += int(keep.sum()) * m
    return {k: v / total for k, v in acc.items()}


def synthetic_store(path: str) -> str:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    store = CandidateStore.create_for_model(path, model)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        store.append_model(model, {})
    return store.uri


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="a candidate store (path or URI)")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--basis", default="normalized")
    parser.add_argument("--smoke", action="store_true", help="a small synthetic store (the tests)")
    args = parser.parse_args(argv)
    if not args.smoke and not args.store:
        parser.error("--store is required (or --smoke)")
    with tempfile.TemporaryDirectory() as tmp:
        uri = synthetic_store(f"{tmp}/store") if args.smoke else args.store
        store = CandidateStore.open(uri)
        w = store.read()
        numels = [int(torch.Size(s).numel()) for s in store.shapes]
        sizes = make_blocks(numels, "tensor").sizes
        note(f"{uri}: {w.shape[0]} candidates x {w.shape[1]} values, {len(sizes)} blocks")
        _, u = build_basis(w, sizes, args.basis)
        for bits in args.bits:
            emit({"benchmark": "quant_error", "store": uri if not args.smoke else "synthetic",
                  "candidates": w.shape[0], "params": w.shape[1], "basis": args.basis, "granularity": "tensor",
                  "bits": bits, **direction_fidelity(u, sizes, bits), "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
