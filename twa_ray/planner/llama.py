"""A Llama-like transformer's parameter shapes (7B by default), to plan at a scale this machine
cannot build::

    python -m twa_ray.planner.llama llama7b.json            # 32 layers, d = 4096, ffn 11008, vocab 32000
    python -m twa_ray plan --model llama7b.json --candidates 50 --bits 2 --workers 64
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from .shapes import write_shapes

__all__ = ["llama_shapes", "main"]


def llama_shapes(layers: int = 32, dim: int = 4096, ffn: int = 11008, vocab: int = 32000) -> dict[str, list[int]]:
    """Parameter shapes of a Llama-style decoder (Hugging Face names, nn.Linear (out, in) layout).

    Per layer: q, k, v, o projections (dim, dim), gate and up (ffn, dim), down (dim, ffn),
    two RMSNorm weights (dim,); plus the token embedding and the untied LM head (vocab, dim)
    and the final norm. The defaults give Llama-7B's 6,738,415,616 parameters.
    """
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, dim]}
    for i in range(layers):
        pre = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{pre}.self_attn.{proj}.weight"] = [dim, dim]
        shapes[f"{pre}.mlp.gate_proj.weight"] = [ffn, dim]
        shapes[f"{pre}.mlp.up_proj.weight"] = [ffn, dim]
        shapes[f"{pre}.mlp.down_proj.weight"] = [dim, ffn]
        shapes[f"{pre}.input_layernorm.weight"] = [dim]
        shapes[f"{pre}.post_attention_layernorm.weight"] = [dim]
    shapes["model.norm.weight"] = [dim]
    shapes["lm_head.weight"] = [vocab, dim]
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a Llama-like transformer's parameter shapes as JSON "
                                                 "for `python -m twa_ray plan --model FILE.json`.")
    parser.add_argument("out", help="output JSON file")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    shapes = llama_shapes(args.layers, args.dim, args.ffn, args.vocab)
    write_shapes(args.out, shapes)
    total = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {args.out}: {len(shapes)} tensors, {total:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
