"""A small Vision Transformer for 32x32 / 28x28 images: patch 4, pre-norm encoder, class token."""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    """Input (B, in_channels, image_size, image_size); output (B, num_classes).

    image_size must be divisible by patch_size; (image_size / patch_size)^2 tokens plus a
    class token go through ``depth`` pre-norm transformer layers; the head reads the class token.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch_size: int = 4,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT image_size {image_size} is not divisible by patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens)[:, 0]))  # (B, num_classes)


def vit_small(num_classes: int, in_channels: int, image_size: int, **kwargs) -> ViT:
    return ViT(num_classes, in_channels, image_size, **kwargs)
