"""PaQ-DETR's dynamic queries (§3.2): object content queries as image-conditioned convex
combinations of a small bank of shared patterns.

    Q^C = W^D Q^P,   W^D = softmax_rows(F_w(Z_hat))            (eq. 4-5)

- `Q^P [m, d]`: the pattern bank (m = 50 for 300 queries, 150 for 900 in the paper).
- `WeightGenerator`: the content-aware weight generator over the encoder's output maps:
  per level a 1x1 convolution then a dilated 3x3 convolution with ReLU (feature extraction);
  top-down fusion from the coarsest level to the second (upsample and add), each fused map
  refined by channel attention (ECA) and spatial attention (coordinate attention) with a skip
  connection; masked average pooling (padding excluded) to Z_hat [d]; a two-layer MLP with
  LayerNorm and ReLU to n x m logits; a softmax over each row.

Sizes the paper leaves open, chosen here (config keys in brackets): the dilation, 2
[`paq_dilation`]; the MLP's hidden width, 32 [`paq_hidden`] (its output layer has n x m =
135,000 units at 900 queries, so the width decides most of the module's parameters; the paper's
Table 7 reports +1.8M parameters for PaQ-DINO in all); ECA's kernel from the channel count as in
its paper (k = nearest odd of (log2 d + 1) / 2, so 5 at d = 256); coordinate attention's
reduction to max(8, d / 32) channels; the skip connection adds the fused map before its
attention to the attended one. The finest level is not used: fusion stops at the second, as
§3.2 says (Z is h2 x w2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAttention(nn.Module):
    """ECA (Wang et al. 2020): a 1-D convolution across the channels of the globally pooled
    map gives each channel a sigmoid gate. Pooling leaves out padding."""

    def __init__(self, channels: int):
        super().__init__()
        k = int(abs((math.log2(channels) + 1) / 2))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W]; valid [B, 1, H, W] (1 where the image is, 0 on padding)."""
        pooled = (x * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)  # [B, C]
        return x * self.conv(pooled[:, None]).sigmoid().transpose(1, 2)[..., None]


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al. 2021): the map pooled along each axis (padding left
    out), a shared 1x1 convolution with a per-position LayerNorm (in place of the original's
    batch norm) and ReLU, then one sigmoid gate per row and one per column."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(8, channels // 32)
        self.shared = nn.Conv2d(channels, hidden, 1)
        # normalised per position (the original's batch norm would mix in the padded rows)
        self.norm = nn.LayerNorm(hidden)
        self.rows, self.cols = nn.Conv2d(hidden, channels, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        along_w = (x * valid).sum(3, keepdim=True) / valid.sum(3, keepdim=True).clamp(min=1)
        along_h = (x * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)
        y = self.shared(torch.cat([along_w, along_h.transpose(2, 3)], 2))  # [B, h', H + W, 1]
        y = torch.relu(self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        gate_h, gate_w = y.split([h, w], 2)
        return x * self.rows(gate_h).sigmoid() * self.cols(gate_w.transpose(2, 3)).sigmoid()


class WeightGenerator(nn.Module):
    """Encoder maps -> W^D [B, n, m] (rows on the simplex). See the module docstring."""

    def __init__(
        self,
        d_model: int,
        levels: int,
        num_queries: int,
        num_patterns: int,
        hidden: int = 32,
        dilation: int = 2,
    ):
        super().__init__()
        if levels < 2:
            raise ValueError("the weight generator fuses down to the second level: num_levels >= 2")
        self.num_queries, self.num_patterns = num_queries, num_patterns
        used = levels - 1  # every level but the finest
        self.reduce = nn.ModuleList(nn.Conv2d(d_model, d_model, 1) for _ in range(used))
        self.dilated = nn.ModuleList(
            nn.Conv2d(d_model, d_model, 3, padding=dilation, dilation=dilation) for _ in range(used)
        )
        self.channel = nn.ModuleList(ChannelAttention(d_model) for _ in range(used - 1))
        self.spatial = nn.ModuleList(CoordinateAttention(d_model) for _ in range(used - 1))
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_queries * num_patterns),
        )

    def forward(self, maps: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """maps per level [B, d, H_l, W_l] finest first; masks [B, H_l, W_l] True on padding."""
        maps, masks = maps[1:], masks[1:]
        valid = [(~m)[:, None].to(maps[0].dtype) for m in masks]
        # padding is zeroed before each convolution, so that an image's weights do not depend
        # on how much padding its batch added
        lateral = [
            torch.relu(dilated(reduce(x * v) * v)) * v
            for reduce, dilated, x, v in zip(self.reduce, self.dilated, maps, valid)
        ]
        fused = lateral[-1]
        for k in range(len(lateral) - 2, -1, -1):  # top-down, to the second level
            up = F.interpolate(fused, size=lateral[k].shape[-2:], mode="nearest")
            merged = (up + lateral[k]) * valid[k]
            attended = self.spatial[k](self.channel[k](merged, valid[k]), valid[k])
            fused = (merged + attended) * valid[k]
        pooled = fused.sum((2, 3)) / valid[0].sum((2, 3)).clamp(min=1)  # Z_hat [B, d]
        logits = self.mlp(pooled).view(-1, self.num_queries, self.num_patterns)
        return logits.softmax(-1)


class PatternQueries(nn.Module):
    """Content queries Q^C = W^D Q^P [B, n, d] from the pattern bank and the weight generator
    (eq. 4-5); `forward` also returns W^D [B, n, m]."""

    def __init__(
        self,
        d_model: int,
        levels: int,
        num_queries: int,
        num_patterns: int,
        hidden: int = 32,
        dilation: int = 2,
    ):
        super().__init__()
        self.patterns = nn.Embedding(num_patterns, d_model)  # Q^P, normal init as DINO's queries
        self.generator = WeightGenerator(
            d_model, levels, num_queries, num_patterns, hidden, dilation
        )

    def bank(self) -> torch.Tensor:
        """Q^P [m, d] (the embedding module is called: ZeRO-3 gathers on module calls)."""
        ids = torch.arange(self.patterns.num_embeddings, device=self.patterns.weight.device)
        return self.patterns(ids)

    def forward(self, maps, masks, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the first `count` content queries [B, count, d], W^D [B, n, m], Q^P [m, d])."""
        weights = self.generator(maps, masks)
        patterns = self.bank()
        return weights[:, :count] @ patterns, weights, patterns


def pattern_diversity(patterns: torch.Tensor) -> torch.Tensor:
    """Eq. 8: the mean |cos| between distinct pairs of patterns [m, d] (0 for orthogonal
    patterns, 1 for identical ones)."""
    m = patterns.shape[0]
    if m < 2:
        return patterns.sum() * 0.0
    unit = F.normalize(patterns, dim=-1)
    cos = (unit @ unit.T).abs()
    return (cos.sum() - cos.diagonal().sum()) / (m * (m - 1))
