"""CQ-DINO (Sun et al.): classification as contrastive matching between object queries and
learnable category queries, with image-guided query selection (§3.2-3.4).

- `ImageGuidedSelection`: category queries attend to image tokens (the last backbone level plus
  a pooled global token); a scorer gives logits over every category [B, C]. Categories are
  scored in chunks inside one call; with gradients on, each chunk is recomputed in the backward
  pass instead of kept, so a step's memory holds [B, C] scores, not [B, heads, C, tokens].
- `select_categories`: the top-C' category rows per image (optionally forcing the ground-truth
  categories in during training).
- `ContrastiveAlignment`: logits [B, Q, C'] = object query . selected category query / sqrt(D)
  + a learnable bias, shared by every decoder layer and the encoder proposals.
- `CategorySelector`: stage 1 (backbone, category queries, selector) alone.
- `CQDINO`: the whole detector; the selected queries go through the feature enhancer, steer
  the proposals (language-guided query selection) and the cross-modality decoder.

Outputs carry `category_ids` [B, C'] (the ids the slots stand for), `selection_logits`
[B, C], `all_category_ids` [C] and `selected_rows` [B, C'].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vastdet.models.backbone import downsample_mask
from vastdet.models.category_queries import CategoryQueries
from vastdet.models.denoising import build_denoising
from vastdet.models.dino import PRIOR_BIAS, DeformableDetector, backbone_levels, label_columns
from vastdet.models.transformer import DeformableTransformer


def slot_of(labels: torch.Tensor, selected_ids: torch.Tensor) -> torch.Tensor:
    """Each label's slot in an image's selected category ids [T], -1 where not selected."""
    if labels.numel() == 0:
        return labels.new_zeros(0)
    eq = labels[:, None] == selected_ids[None, :].to(labels.device)
    return torch.where(eq.any(1), eq.to(torch.int64).argmax(1), torch.full_like(labels, -1))


class ImageGuidedSelection(nn.Module):
    """Category-to-image cross-attention and a scorer: logits over every category [B, C]."""

    def __init__(self, in_channels: int, d_model: int, heads: int = 8, chunk: int = 4096):
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.input_proj = nn.Linear(in_channels, d_model)
        self.token_norm = nn.LayerNorm(d_model)
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.scorer = nn.Linear(d_model, 1)
        nn.init.constant_(self.scorer.bias, PRIOR_BIAS)  # every category starts at p = 0.01

    def tokens(self, feature: torch.Tensor, mask: torch.Tensor):
        """Image tokens [B, 1 + HW, D] (a masked-mean global token first) and their padding mask."""
        x = self.input_proj(feature.flatten(2).transpose(1, 2))
        flat = mask.flatten(1)
        keep = (~flat).to(x.dtype)[..., None]
        pooled = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        tokens = self.token_norm(torch.cat([pooled, x], 1))
        return tokens, torch.cat([flat.new_zeros(flat.shape[0], 1), flat], 1)

    def _score(self, cats, k, v, bias):
        """Scores of one chunk of categories [B, c] (cats [c, D]; k, v [B, h, T, dh])."""
        b, h, _, dh = k.shape
        q = self.q_proj(cats).view(-1, h, dh).transpose(0, 1)[None]  # [1, h, c, dh]
        attn = (q @ k.transpose(-1, -2) / math.sqrt(dh) + bias).softmax(-1)  # [B, h, c, T]
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(b, -1, h * dh))
        return self.scorer(self.norm(out + cats[None])).squeeze(-1)

    def forward(
        self, categories: torch.Tensor, feature: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """categories [C, D]; feature [B, C_in, H, W] (last backbone level); mask [B, H, W]."""
        tokens, pad = self.tokens(feature, mask)
        b, t, d = tokens.shape
        k = self.k_proj(tokens).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v_proj(tokens).view(b, t, self.heads, -1).transpose(1, 2)
        bias = torch.zeros(b, 1, 1, t, dtype=tokens.dtype, device=tokens.device)
        bias = bias.masked_fill(pad[:, None, None, :], float("-inf"))
        parts = []
        for chunk in categories.split(self.chunk):
            if torch.is_grad_enabled() and len(categories) > self.chunk:
                parts.append(checkpoint(self._score, chunk, k, v, bias, use_reentrant=False))
            else:
                parts.append(self._score(chunk, k, v, bias))
        return torch.cat(parts, 1)


@torch.no_grad()
def select_categories(
    logits: torch.Tensor, k: int, forced: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """The top-k category rows per image [B, k'] (k' = min(k, C)), best first. Rows in
    `forced[b]` (ground-truth categories during training) are kept whatever their score."""
    scores = logits.detach().float().clone()
    if forced is not None:
        for b, rows in enumerate(forced):
            scores[b, rows.to(scores.device)] = float("inf")
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


class ContrastiveAlignment(nn.Module):
    """logits = objects [B, N, D] . categories [B, K, D]^T / sqrt(D) + bias -> [B, N, K]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(d_model)
        self.bias = nn.Parameter(torch.tensor([PRIOR_BIAS]))  # [1]: DeepSpeed broadcasts views

    def forward(self, objects: torch.Tensor, categories: torch.Tensor, best_only: bool = False):
        logits = objects @ categories.transpose(1, 2) * self.scale + self.bias
        return logits.max(-1).values if best_only else logits


class SelectionMixin:
    """Selection as stage 1 and the detector both run it (on `category_queries`, `selector`,
    `category_ids`, `num_selected`, `force_gt_categories`)."""

    def select(self, backbone_feats, masks, targets):
        """(all category queries [C, D], selection logits [B, C], selected rows [B, C'])."""
        cats = self.category_queries()
        last = backbone_feats[-1]
        logits = self.selector(cats, last, downsample_mask(masks, last.shape[-2:]))
        forced = None
        if self.training and self.force_gt_categories and targets is not None:
            forced = [
                label_columns(t["labels"].to(self.category_ids.device), self.category_ids)
                for t in targets
            ]
        return cats, logits, select_categories(logits, self.num_selected, forced)

    def selection_outputs(self, logits, rows) -> dict:
        return {
            "selection_logits": logits,
            "selected_rows": rows,
            "category_ids": self.category_ids[rows],
            "all_category_ids": self.category_ids,
        }


class CategorySelector(SelectionMixin, nn.Module):
    """Stage 1: backbone, category queries and the image-guided selector. Its parameter names
    are those of the same parts of `CQDINO`, so stage 2 loads them as they are."""

    def __init__(
        self,
        backbone: nn.Module,
        category_queries: CategoryQueries,
        selector: ImageGuidedSelection,
        category_ids: torch.Tensor,
        num_selected: int = 100,
        force_gt_categories: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.category_queries = category_queries
        self.selector = selector
        self.register_buffer(
            "category_ids", torch.as_tensor(category_ids, dtype=torch.int64), persistent=True
        )
        self.num_selected = num_selected
        self.force_gt_categories = force_gt_categories

    def forward(self, images, masks, targets=None) -> dict:
        _, logits, rows = self.select(backbone_levels(self.backbone, images), masks, targets)
        return self.selection_outputs(logits, rows)


class CQDINO(SelectionMixin, DeformableDetector):
    def __init__(
        self,
        backbone: nn.Module,
        transformer: DeformableTransformer,
        category_ids,
        category_queries: CategoryQueries,
        selector: ImageGuidedSelection,
        num_selected: int = 100,
        force_gt_categories: bool = False,
        **kwargs,
    ):
        super().__init__(backbone, transformer, category_ids, **kwargs)
        if transformer.enhancer is None:
            raise ValueError("CQ-DINO's transformer needs category_fusion=True")
        self.category_queries = category_queries
        self.selector = selector
        self.alignment = ContrastiveAlignment(transformer.d_model)
        self.num_selected = num_selected
        self.force_gt_categories = force_gt_categories

    def class_logits(self, tokens, layer: int, best_only: bool = False, categories=None):
        """Alignment logits against the (fused) selected category queries [..., C']."""
        return self.alignment(tokens, categories, best_only)

    def forward(self, images, masks, targets=None) -> dict:
        backbone_feats = self.backbone_features(images)
        cats, sel_logits, rows = self.select(backbone_feats, masks, targets)
        selected = cats[rows]  # [B, C', D]: only these rows get gradient from the detector
        feats, level_masks, positions = self.features(images, masks, backbone_feats)
        dn = None
        if self.training and targets is not None:
            selected_ids = self.category_ids[rows]
            slots = [
                slot_of(t["labels"].to(rows.device), selected_ids[b]) for b, t in enumerate(targets)
            ]
            d = selected.shape[-1]

            def embed(labels: torch.Tensor) -> torch.Tensor:
                return torch.gather(selected, 1, labels[..., None].expand(-1, -1, d))

            dn = build_denoising(
                slots,
                [t["boxes"] for t in targets],
                embed,
                self.transformer.num_queries,
                self.dn_number,
                self.label_noise,
                self.box_noise,
                num_classes=rows.shape[1],
            )
        result = self.detect(feats, level_masks, positions, dn, categories=selected)
        result.update(self.selection_outputs(sel_logits, rows))
        return result


def selection_targets(
    targets: list[dict], category_ids: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """[B, C] bool: the categories present in each image (rows of `category_ids`)."""
    present = torch.zeros(len(targets), num_rows, dtype=torch.bool, device=category_ids.device)
    for b, t in enumerate(targets):
        present[b, label_columns(t["labels"].to(category_ids.device), category_ids)] = True
    return present
