"""Sine position encoding of feature maps (DETR), with DINO's per-axis temperatures."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """[B, 2 * num_feats, H, W] from a padding mask [B, H, W] (True on padding).

    Coordinates are cumulative counts of valid pixels, normalised to (0, 2*pi] per image, so an
    image's encoding does not depend on how much padding its batch added; no half-pixel offset
    (DINO's and CQ-DINO's released code; Deformable DETR subtracts 0.5). DINO uses temperature
    20 on both axes (DETR used 10,000).
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_feats, self.temperature_h, self.temperature_w = (
            num_feats,
            temperature_h,
            temperature_w,
        )
        self.scale, self.eps = scale, eps

    def _encode(self, coords: torch.Tensor, temperature: float) -> torch.Tensor:
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=coords.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos = coords[..., None] / dim_t
        return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=4).flatten(3)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        y = y / (y[:, -1:, :] + self.eps) * self.scale
        x = x / (x[:, :, -1:] + self.eps) * self.scale
        pos = torch.cat(
            [self._encode(y, self.temperature_h), self._encode(x, self.temperature_w)], dim=3
        )
        return pos.permute(0, 3, 1, 2)
