"""DINO's deformable transformer: encoder, two-stage query selection, refining decoder.

- Encoder: deformable self-attention over all levels' tokens.
- Mixed query selection (DINO): every encoder token proposes a box (anchor of size 0.05 * 2^level
  at its centre + a predicted delta); the top-k tokens by best class score give the decoder's
  initial reference boxes; the content queries are learned embeddings.
- Decoder: self-attention (with the denoising attention mask), deformable cross-attention
  around each query's reference box, FFN; every layer refines the boxes. Look-forward-twice: a
  layer's box prediction uses the previous layer's refined box *before* it is detached, so the
  gradient of layer i's loss also reaches layer i-1's refinement.

With `category_fusion` (CQ-DINO, after Grounding DINO) the selected category queries [B, K, D]
take part: a feature enhancer before every encoder layer (bi-directional image<->category
attention, then category self-attention and FFN), and a category cross-attention in every
decoder layer between its self-attention and its deformable image cross-attention.

At vast vocabularies the class scores of all tokens ([B, S, C]: a gigabyte at 13k classes and
800 px) are never held: selection needs only each token's best score, computed in chunks
without gradient; class logits with gradient are computed for the selected tokens alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vastdet.models.deformable_attention import MSDeformAttn
from vastdet.models.patterns import PatternQueries


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] (DINO's eps, 1e-3)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def box_sine_embedding(boxes: torch.Tensor, d_model: int) -> torch.Tensor:
    """Sine embedding of normalised cxcywh boxes [..., 4] -> [..., 2 * d_model] (DINO's
    query positional encoding; temperature 10,000)."""
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    parts = []
    for k in (1, 0, 2, 3):  # y, x, w, h as DINO orders them
        pos = boxes[..., k, None] * (2 * math.pi) / dim_t
        parts.append(torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """Valid (unpadded) width and height fraction of each level [B, L, 2] as (w, h)."""
    ratios = []
    for m in masks:
        h, w = m.shape[-2:]
        vh = (~m[:, :, 0]).sum(1).float() / h
        vw = (~m[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([vw, vh], -1))
    return torch.stack(ratios, 1)


def feed_forward(d_model: int, d_ffn: int, dropout: float) -> nn.Sequential:
    """The transformer layers' FFN: Linear -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
    )


class EncoderLayer(nn.Module):
    def __init__(
        self, d_model: int, d_ffn: int, heads: int, levels: int, points: int, dropout: float
    ):
        super().__init__()
        self.attn = MSDeformAttn(d_model, levels, heads, points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, d_ffn, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, refs, shapes, mask):
        src = self.norm1(src + self.dropout(self.attn(src + pos, refs, src, shapes, mask)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class BiAttention(nn.Module):
    """Bi-directional image<->category attention over one similarity tensor [B, h, S, K]:
    softmax over categories updates image tokens, softmax over (unpadded) tokens updates
    categories (GLIP's and Grounding DINO's feature-enhancer attention), computed at width
    `embed_dim` (1024 with 4 heads in CQ-DINO's released configs), dropout on both
    attention maps."""

    def __init__(self, d_model: int, embed_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"fusion width {embed_dim} must divide by its heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.img_q, self.cat_k = nn.Linear(d_model, embed_dim), nn.Linear(d_model, embed_dim)
        self.img_v, self.cat_v = nn.Linear(d_model, embed_dim), nn.Linear(d_model, embed_dim)
        self.img_out, self.cat_out = nn.Linear(embed_dim, d_model), nn.Linear(embed_dim, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, img, cats, img_mask):
        """img [B, S, D], cats [B, K, D], img_mask [B, S] True on padding -> (delta img, delta cats)."""
        b = img.shape[0]
        q, k = self._heads(self.img_q(img)), self._heads(self.cat_k(cats))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, h, S, K]
        to_img = F.dropout(logits.softmax(-1), self.dropout, self.training)
        to_img = to_img @ self._heads(self.cat_v(cats))
        to_cat = logits.masked_fill(img_mask[:, None, :, None], float("-inf")).softmax(-2)
        to_cat = F.dropout(to_cat, self.dropout, self.training).transpose(-1, -2)
        to_cat = to_cat @ self._heads(self.img_v(img))
        merge = lambda x: x.transpose(1, 2).reshape(b, x.shape[2], -1)  # noqa: E731
        return self.img_out(merge(to_img)), self.cat_out(merge(to_cat))


class FeatureEnhancerLayer(nn.Module):
    """Image<->category fusion before a deformable encoder layer; layer scales start at 1e-4
    so that fusion starts as a near identity. CQ-DINO's released encoder fuses and nothing
    more; `category_layers` adds Grounding DINO's category self-attention and FFN after the
    fusion."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        heads: int,
        dropout: float,
        fusion_dim: int,
        fusion_heads: int,
        fusion_dropout: float,
        category_layers: bool = False,
    ):
        super().__init__()
        self.img_norm, self.cat_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.bi_attn = BiAttention(d_model, fusion_dim, fusion_heads, fusion_dropout)
        self.img_scale = nn.Parameter(torch.full((d_model,), 1e-4))
        self.cat_scale = nn.Parameter(torch.full((d_model,), 1e-4))
        self.category_layers = category_layers
        if category_layers:
            self.self_attn = nn.MultiheadAttention(
                d_model, heads, dropout=dropout, batch_first=True
            )
            self.norm1 = nn.LayerNorm(d_model)
            self.ffn = feed_forward(d_model, d_ffn, dropout)
            self.norm2 = nn.LayerNorm(d_model)

    def forward(self, img, cats, img_mask):
        d_img, d_cat = self.bi_attn(self.img_norm(img), self.cat_norm(cats), img_mask)
        img = img + self.img_scale * d_img
        cats = cats + self.cat_scale * d_cat
        if self.category_layers:
            cats = self.norm1(cats + self.self_attn(cats, cats, cats, need_weights=False)[0])
            cats = self.norm2(cats + self.ffn(cats))
        return img, cats


class DecoderLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        heads: int,
        levels: int,
        points: int,
        dropout: float,
        category_attn: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        if category_attn:  # CQ-DINO's cross-modality decoder
            self.category_attn = nn.MultiheadAttention(
                d_model, heads, dropout=dropout, batch_first=True
            )
            self.norm_cat = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, levels, heads, points)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, d_ffn, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, refs, memory, shapes, memory_mask, attn_mask, cats=None):
        q = k = tgt + query_pos
        tgt = self.norm1(
            tgt
            + self.dropout(self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0])
        )
        if cats is not None:
            attended = self.category_attn(tgt + query_pos, cats, cats, need_weights=False)[0]
            tgt = self.norm_cat(tgt + self.dropout(attended))
        tgt = self.norm2(
            tgt + self.dropout(self.cross_attn(tgt + query_pos, refs, memory, shapes, memory_mask))
        )
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class DeformableTransformer(nn.Module):
    """Encoder + mixed query selection + decoder; the heads are passed in by the detector.

    `class_logits(tokens, layer, best_only=False)` gives class logits of decoder-layer `layer`'s
    outputs
    (`layer = -1`: the encoder proposals' head); `bbox_heads` refine boxes per decoder layer.
    """

    def __init__(
        self,
        d_model: int = 256,
        heads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        d_ffn: int = 2048,
        dropout: float = 0.0,
        levels: int = 4,
        enc_points: int = 4,
        dec_points: int = 4,
        num_queries: int = 900,
        category_fusion: bool = False,
        fusion_dim: int = 1024,
        fusion_heads: int = 4,
        fusion_dropout: float = 0.1,
        fusion_category_layers: bool = False,
        num_patterns: int = 0,
        pattern_hidden: int = 32,
        pattern_dilation: int = 2,
    ):
        super().__init__()
        self.d_model, self.levels, self.num_queries = d_model, levels, num_queries
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, d_ffn, heads, levels, enc_points, dropout)
            for _ in range(enc_layers)
        )
        self.enhancer = (
            nn.ModuleList(
                FeatureEnhancerLayer(
                    d_model,
                    d_ffn,
                    heads,
                    dropout,
                    fusion_dim,
                    fusion_heads,
                    fusion_dropout,
                    fusion_category_layers,
                )
                for _ in range(enc_layers)
            )
            if category_fusion
            else None
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, d_ffn, heads, levels, dec_points, dropout, category_fusion)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.level_embed = nn.Parameter(torch.empty(levels, d_model).normal_())
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        if num_patterns > 0:  # PaQ-DETR: content queries mixed from shared patterns per image
            self.content_queries = PatternQueries(
                d_model, levels, num_queries, num_patterns, pattern_hidden, pattern_dilation
            )
        else:  # DINO: static learned content queries
            self.content_queries = nn.Embedding(num_queries, d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    # ---------------------------------------------------------------- encoder
    @staticmethod
    def encoder_reference_points(shapes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """Each token's centre, normalised by the valid area, seen from every level [B, S, L, 2]."""
        refs = []
        for lvl, (h, w) in enumerate(shapes.tolist()):
            ys, xs = torch.meshgrid(
                torch.arange(h, device=ratios.device) + 0.5,
                torch.arange(w, device=ratios.device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack([xs, ys], -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]

    def encode(self, src, pos, shapes, mask, ratios, cats=None):
        """(memory [B, S, D], categories [B, K, D] after fusion, or None)."""
        refs = self.encoder_reference_points(shapes, ratios)
        for i, layer in enumerate(self.encoder):
            if self.enhancer is not None:
                src, cats = self.enhancer[i](src, cats, mask)
            src = layer(src, pos, refs, shapes, mask)
        return src, cats

    # ---------------------------------------------------------------- query selection
    def proposals(self, memory: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor):
        """(transformed memory [B, S, D], proposal boxes in logit space [B, S, 4]); padded or
        out-of-range positions get memory 0 and box +inf so they are never selected."""
        b = memory.shape[0]
        boxes, start = [], 0
        for lvl, (h, w) in enumerate(shapes.tolist()):
            m = mask[:, start : start + h * w].view(b, h, w)
            vh, vw = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(
                torch.arange(h, device=memory.device),
                torch.arange(w, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([xs, ys], -1).float()[None] + 0.5
            grid = grid / torch.stack([vw, vh], -1).view(b, 1, 1, 2)
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            boxes.append(torch.cat([grid, wh], -1).view(b, -1, 4))
            start += h * w
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
        logits = inverse_sigmoid(boxes).masked_fill(mask[..., None] | ~valid, float("inf"))
        out = memory.masked_fill(mask[..., None] | ~valid, 0.0)
        return self.enc_output_norm(self.enc_output(out)), logits

    @staticmethod
    @torch.no_grad()
    def best_scores(tokens: torch.Tensor, class_logits: Callable, cats=None) -> torch.Tensor:
        """Each token's highest class logit [B, S]; the head computes it in chunks, in one call."""
        return class_logits(tokens, -1, best_only=True, categories=cats)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        features,
        masks,
        positions,
        class_logits: Callable,
        bbox_heads: nn.ModuleList,
        enc_bbox_head: nn.Module,
        dn_queries=None,
        dn_refs=None,
        attn_mask=None,
        categories=None,
    ):
        """features/masks/positions: per level [B, D, H, W] / [B, H, W] / [B, D, H, W];
        `categories` [B, K, D] with `category_fusion` (returned fused, as `categories`).

        Returns a dict: `hs` per decoder layer [B, N, D], `boxes` per layer (normalised cxcywh,
        look-forward-twice), `enc_tokens` and `enc_boxes` of the selected proposals.
        """
        shapes = torch.tensor([f.shape[-2:] for f in features], device=features[0].device)
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                for lvl, p in enumerate(positions)
            ],
            1,
        )
        ratios = valid_ratios(masks)
        if (categories is None) != (self.enhancer is None):
            raise ValueError("categories are given exactly when the transformer fuses them")
        memory, cats = self.encode(src, pos, shapes, mask, ratios, categories)

        tokens, anchor_logits = self.proposals(memory, mask, shapes)
        scores = self.best_scores(tokens, class_logits, cats).masked_fill(
            torch.isinf(anchor_logits[..., 0]), float("-inf")
        )
        k = min(self.num_queries, scores.shape[1])
        top = scores.topk(k, dim=1).indices
        picked = torch.gather(tokens, 1, top[..., None].expand(-1, -1, self.d_model))
        picked_anchor = torch.gather(anchor_logits, 1, top[..., None].expand(-1, -1, 4))
        enc_boxes = (enc_bbox_head(picked) + picked_anchor).sigmoid()
        refs = enc_boxes.detach()
        extra = {}
        if isinstance(self.content_queries, PatternQueries):
            maps, start = [], 0
            for h, w in shapes.tolist():
                level = memory[:, start : start + h * w].transpose(1, 2)
                maps.append(level.reshape(memory.shape[0], self.d_model, h, w))
                start += h * w
            tgt, weights, patterns = self.content_queries(maps, masks, k)
            extra = {"pattern_weights": weights, "patterns": patterns}
        else:  # the embedding module is called, not read: ZeRO-3 gathers on module calls
            ids = torch.arange(k, device=memory.device)
            tgt = self.content_queries(ids)[None].expand(memory.shape[0], -1, -1)
        if dn_queries is not None:
            tgt = torch.cat([dn_queries, tgt], 1)
            refs = torch.cat([dn_refs, refs], 1)
        hs, boxes = self.decode(
            tgt, refs, memory, shapes, mask, ratios, bbox_heads, attn_mask, cats
        )
        return {
            "categories": cats,
            "hs": hs,
            "boxes": boxes,
            "enc_tokens": picked,
            "enc_boxes": enc_boxes,
            "memory": memory,
            "memory_mask": mask,
            "spatial_shapes": shapes,
            **extra,
        }

    def decode(self, tgt, refs, memory, shapes, mask, ratios, bbox_heads, attn_mask, cats=None):
        """Per layer: the normed output (what the heads classify) and its boxes.

        As DINO does: the query's position is the sine embedding of its reference box scaled
        by the first level's valid ratios; the reference for the next layer is refined from
        the layer's output before the final norm and detached; the layer's box prediction
        takes the normed output and the previous layer's refinement *before* it was detached
        (look forward twice), so layer i's loss also trains layer i-1's refinement."""
        hs, boxes = [], []
        previous = refs  # the initial references: the encoder's boxes, detached
        scale = torch.cat([ratios, ratios], -1)[:, None]  # [B, 1, L, 4]
        last = len(self.decoder) - 1
        for i, (layer, head) in enumerate(zip(self.decoder, bbox_heads)):
            layer_refs = refs[:, :, None] * scale
            query_pos = self.ref_point_head(box_sine_embedding(layer_refs[:, :, 0], self.d_model))
            tgt = layer(tgt, query_pos, layer_refs, memory, shapes, mask, attn_mask, cats)
            out = self.decoder_norm(tgt)
            hs.append(out)
            boxes.append((head(out) + inverse_sigmoid(previous)).sigmoid())
            if i < last:  # the last layer's refinement would feed no layer
                previous = (head(tgt) + inverse_sigmoid(refs)).sigmoid()
                refs = previous.detach()
        return hs, boxes
