"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Each query attends to `n_points` sampled locations per head and per feature level, around its
reference point; values are read by bilinear interpolation (`grid_sample`, zero outside the map)
and mixed by attention weights normalised over levels x points. No compiled op: the same code
runs on CPU and any accelerator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and mix values.

    value [B, S, H, Dh] (S = sum of H_l * W_l, levels flattened in order); spatial_shapes [L, 2]
    as (H_l, W_l); sampling_locations [B, Q, H, L, P, 2] as (x, y) in [0, 1] of each level's map
    (pixel centres at (i + 0.5) / W); attention_weights [B, Q, H, L, P].
    Returns [B, Q, H * Dh].
    """
    b, _, heads, dh = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention, align_corners=False
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * heads, dh, int(h), int(w))
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P, 2]
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, Dh, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1).view(b, heads * dh, q)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """The deformable attention module: offsets and weights predicted from the query."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: head h's points start on a ray at angle 2*pi*h/H,
        point p at distance p + 1, so heads look in different directions from the start."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, D]; reference_points [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h),
        normalised; value [B, S, D]; padding_mask [B, S] True on padding. Returns [B, Q, D]."""
        b, q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
        weights = weights.view(b, q, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(
                offsets.dtype
            )
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normaliser[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / points * size * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, not {reference_points.shape[-1]}"
            )
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))
