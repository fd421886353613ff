"""CQ-DINO (Sun et al.): classification as contrastive matching between object queries and
learnable category queries, with image-guided query selection (§3.2-3.4).

- `ImageGuidedSelection`: category queries attend to image tokens (the last backbone level plus
  a pooled global token) through a Query2Label-style head; a scorer gives logits over every
  category [B, C]. Categories are scored in chunks inside one call; with gradients on, each
  chunk is recomputed in the backward pass instead of kept, so a step's memory holds [B, C]
  scores, not [B, heads, C, tokens].
- `select_categories`: the top-C' category rows per image (optionally forcing the ground-truth
  categories in during training).
- `ContrastiveAlignment`: logits [B, Q, C'] = object query . selected category query / sqrt(D)
  + a learnable bias (Grounding DINO's contrastive embedding with log_scale `auto`), one per
  decoder layer or shared (`share_heads`).
- `CategorySelector`: stage 1 (backbone, category queries, selector) alone.
- `CQDINO`: the whole detector; the selector's image-conditioned outputs for the selected
  categories go through the feature enhancer, steer the proposals (language-guided query
  selection) and the cross-modality decoder.

Outputs carry `category_ids` [B, C'] (the ids the slots stand for), `selection_logits`
[B, C], `all_category_ids` [C] and `selected_rows` [B, C'].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from vastdet.models.backbone import downsample_mask
from vastdet.models.category_queries import CategoryQueries, select_rows
from vastdet.models.denoising import build_denoising
from vastdet.models.dino import (
    PRIOR_BIAS,
    DeformableDetector,
    backbone_levels,
    label_columns,
    layer_module,
    per_layer,
)
from vastdet.models.transformer import DeformableTransformer


def slot_of(labels: torch.Tensor, selected_ids: torch.Tensor) -> torch.Tensor:
    """Each label's slot in an image's selected category ids [T], -1 where not selected."""
    if labels.numel() == 0:
        return labels.new_zeros(0)
    eq = labels[:, None] == selected_ids[None, :].to(labels.device)
    return torch.where(eq.any(1), eq.to(torch.int64).argmax(1), torch.full_like(labels, -1))


class SelectorLayer(nn.Module):
    """One layer of the selector head (Query2Label's decoder without self-attention, as the
    released code uses it): category queries cross-attend to the image tokens, then an FFN;
    post-norm residuals with dropout, BERT's layout and initialisation. Categories do not see
    each other, so any subset of them can be run on its own."""

    def __init__(self, width: int, image_width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"selector width {width} must divide by its heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.k, self.v = nn.Linear(image_width, width), nn.Linear(image_width, width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.norm2 = nn.LayerNorm(width, eps=1e-12)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens [B, T, W_img] -> keys and values [B, h, T, W / h]."""
        b, t, _ = tokens.shape
        k = self.k(tokens).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(tokens).view(b, t, self.heads, -1).transpose(1, 2)
        return k, v

    def forward(self, cats: torch.Tensor, k, v, bias: torch.Tensor) -> torch.Tensor:
        """cats [1 or B, c, W] -> [B, c, W]; bias [B, 1, 1, T] is -inf on padded tokens."""
        b, h, _, dh = k.shape
        c = cats.shape[1]
        q = self.q(cats).view(cats.shape[0], c, h, dh).transpose(1, 2)  # [1|B, h, c, dh]
        attn = (q @ k.transpose(-1, -2) / math.sqrt(dh) + bias).softmax(-1)  # [B, h, c, T]
        attn = F.dropout(attn, self.dropout, self.training)
        x = self.out((attn @ v).transpose(1, 2).reshape(b, c, h * dh))
        x = self.norm1(cats + F.dropout(x, self.dropout, self.training))
        return self.norm2(x + F.dropout(self.ffn(x), self.dropout, self.training))


class ImageGuidedSelection(nn.Module):
    """Image-guided query selection (§3.3): category queries [C, W] attend to the image
    tokens through `layers` selector layers (the released code: 2 layers, width 768, 4 heads,
    FFN 3072, dropout 0.1, image tokens mapped to 512); a linear scorer gives each category's
    logit [B, C].

    Image tokens are the last backbone level's positions plus a global token first, their
    masked mean. `mask_padding=False` does as the released code does: it averages over the
    padding too and attends to padded positions (a batch's padding then changes each image's
    scores). Scoring all C categories runs in chunks inside one call;
    with gradients on, each chunk is recomputed in the backward pass instead of kept, so a
    step holds [B, C] scores, never [B, heads, C, tokens]. `encode` runs the same layers with
    gradient for the few selected rows, whose image-conditioned outputs the detector uses."""

    def __init__(
        self,
        in_channels: int,
        width: int = 768,
        image_width: int = 512,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 3072,
        dropout: float = 0.1,
        chunk: int = 4096,
        mask_padding: bool = True,
    ):
        super().__init__()
        self.chunk, self.mask_padding = chunk, mask_padding
        # training scores every category through `ChunkedScores` (one gradient buffer for the
        # queries); False: one checkpoint per chunk (ZeRO-3, which gathers per module call)
        self.lean = True
        self.image_proj = nn.Linear(in_channels, image_width)
        self.layers = nn.ModuleList(
            SelectorLayer(width, image_width, heads, ffn, dropout) for _ in range(layers)
        )
        self.scorer = nn.Linear(width, 1)

    def tokens(self, feature: torch.Tensor, mask: torch.Tensor):
        """(keys and values per layer, attention bias [B, 1, 1, 1 + HW]) of the image tokens of
        `feature` [B, C_in, H, W] with padding `mask` [B, H, W]."""
        x = feature.flatten(2).transpose(1, 2)
        flat = mask.flatten(1) if self.mask_padding else torch.zeros_like(mask.flatten(1))
        keep = (~flat).to(x.dtype)[..., None]
        pooled = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        tokens = self.image_proj(torch.cat([pooled, x], 1))
        pad = torch.cat([flat.new_zeros(flat.shape[0], 1), flat], 1)
        bias = torch.zeros(pad.shape, dtype=tokens.dtype, device=tokens.device)
        bias = bias.masked_fill(pad, float("-inf"))[:, None, None, :]
        return [layer.keys_values(tokens) for layer in self.layers], bias

    def _hidden(self, cats: torch.Tensor, kv, bias) -> torch.Tensor:
        x = cats
        for layer, (k, v) in zip(self.layers, kv):
            x = layer(x, k, v, bias)
        return x

    def _score(self, cats: torch.Tensor, kv, bias) -> torch.Tensor:
        return self.scorer(self._hidden(cats[None], kv, bias)).squeeze(-1)

    def score(self, categories: torch.Tensor, kv, bias) -> torch.Tensor:
        """Logits [B, C] of every category query [C, W]."""
        if self.lean and torch.is_grad_enabled() and len(categories) > self.chunk:
            params = [p for p in (*self.layers.parameters(), *self.scorer.parameters())]
            flat = [t for pair in kv for t in pair]
            return ChunkedScores.apply(self, len(params), categories, bias, *flat, *params)
        parts = []
        for chunk in categories.split(self.chunk):
            if torch.is_grad_enabled() and len(categories) > self.chunk:
                parts.append(checkpoint(self._score, chunk, kv, bias, use_reentrant=False))
            else:
                parts.append(self._score(chunk, kv, bias))
        return torch.cat(parts, 1)

    def encode(self, selected: torch.Tensor, kv, bias) -> torch.Tensor:
        """The selector's outputs for each image's selected queries [B, C', W] -> [B, C', W]."""
        return self._hidden(selected, kv, bias)

    def forward(
        self, categories: torch.Tensor, feature: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """categories [C, W]; feature [B, C_in, H, W] (last backbone level); mask [B, H, W]."""
        return self.score(categories, *self.tokens(feature, mask))


class ChunkedScores(torch.autograd.Function):
    """Every category's logit [B, C], `chunk` queries at a time, nothing of the chunks kept: the
    backward pass recomputes each chunk and writes its queries' gradient into one [C, W]
    tensor (a checkpoint per chunk would hold every chunk's gradient and then their
    concatenation, two [C, W] tensors more at the moment the step peaks), summing the image
    tokens' and the head's gradients over the chunks."""

    @staticmethod
    def forward(ctx, selector, num_params, categories, bias, *tensors):
        flat = tensors[: len(tensors) - num_params]
        ctx.selector, ctx.num_params = selector, num_params
        # queries of a lean encoding: their gradient before the norm is written over them
        ctx.lean = getattr(categories, "lean_queries", None)
        ctx.save_for_backward(categories, bias, *tensors)
        # dropout: the recomputation draws the same masks (torch's checkpoint helpers)
        ctx.rng = (torch.get_rng_state(), *get_device_states(categories))
        kv = list(zip(flat[0::2], flat[1::2]))
        parts = [selector._score(c, kv, bias) for c in categories.split(selector.chunk)]
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        categories, bias, *tensors = ctx.saved_tensors
        selector, num_params = ctx.selector, ctx.num_params
        flat, params = tensors[: len(tensors) - num_params], tensors[len(tensors) - num_params :]
        lean = ctx.lean
        g_cats = categories if lean is not None else torch.empty_like(categories)
        g_flat = [torch.zeros_like(t) for t in flat]
        g_params = [torch.zeros_like(p) for p in params]
        start = 0
        cpu_state, devices, device_states = ctx.rng
        with torch.random.fork_rng(devices=devices, device_type=categories.device.type):
            torch.set_rng_state(cpu_state)
            set_device_states(devices, device_states, device_type=categories.device.type)
            for chunk in categories.split(selector.chunk):
                start = _chunk_backward(
                    selector, chunk, start, flat, params, bias, grad, g_cats, g_flat, g_params,
                    lean,
                )  # fmt: skip
        if lean is not None:
            lean.buffer, g_cats = categories, None
        return None, None, g_cats, None, *g_flat, *g_params


def _chunk_backward(
    selector, chunk, start, flat, params, bias, grad, g_cats, g_flat, g_params, lean=None
):
    """One chunk of `ChunkedScores.backward`: recompute it, write its queries' gradient into
    `g_cats` (with a `LeanQueries` handle: the gradient before the norm, over the chunk's
    queries) and add the tokens' and parameters' in; returns the next chunk's first row."""
    with torch.enable_grad():
        c = chunk.detach().requires_grad_()
        leaves = [t.detach().requires_grad_() for t in flat]
        out = selector._score(c, list(zip(leaves[0::2], leaves[1::2])), bias)
        found = torch.autograd.grad(
            out, [c, *leaves, *params], grad[:, start : start + len(chunk)], allow_unused=True
        )
    end = start + len(chunk)
    g_cats[start:end] = (
        found[0] if lean is None else lean.norm_backward(found[0], chunk, slice(start, end))
    )
    for total, part in zip(g_flat + g_params, found[1:]):
        if part is not None:
            total += part
    return start + len(chunk)


DN_LABELS = ("learned", "category")


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


UNSCORED = -1.0e4  # the dense selection logit of a category beam selection did not reach


class SelectionMixin:
    """Selection as stage 1 and the detector both run it (on `category_queries`, `selector`,
    `category_ids`, `num_selected`, `force_gt_categories`, and `beam`: a
    `vastdet.models.beam.BeamTree` for taxonomy-guided selection, None for the paper's flat
    selection)."""

    def select(self, backbone_feats, masks, targets):
        """(category queries [C, W], image tokens (keys/values, bias), selection logits [B, C],
        selected rows [B, C'], beam outputs (empty for flat selection))."""
        cats = self.category_queries()
        last = backbone_feats[-1]
        kv, bias = self.selector.tokens(last, downsample_mask(masks, last.shape[-2:]))
        extra = {}
        if self._modules.get("beam") is None:
            logits = self.selector.score(cats, kv, bias)
        else:
            logits, extra = self.beam_select(cats, kv, bias, targets)
        forced = None
        if self.training and self.force_gt_categories and targets is not None:
            forced = [
                label_columns(t["labels"].to(self.category_ids.device), self.category_ids)
                for t in targets
            ]
        return cats, (kv, bias), logits, select_categories(logits, self.num_selected, forced), extra

    def beam_select(self, cats, kv, bias, targets) -> tuple[torch.Tensor, dict]:
        """Taxonomy-guided selection (`vastdet.models.beam`): dense logits [B, C] holding the
        scored categories' logits (`UNSCORED` elsewhere, detached), and the walk's rows, logits
        and, given targets, positives [B, K] for the selection loss."""
        batch, num_cats = kv[0][0].shape[0], cats.shape[0]
        positive = None
        if targets is not None:
            present = selection_targets(targets, self.category_ids, num_cats)
            positive = self.beam.positives(present)
        inner = self.beam.node_queries(cats)  # the non-category nodes' queries

        def score(rows: torch.Tensor) -> torch.Tensor:
            hidden = self.selector.encode(self.beam.gather(cats, inner, rows), kv, bias)
            return self.selector.scorer(hidden).squeeze(-1)

        rows, logits = self.beam.walk(score, batch, positive if self.training else None)
        is_cat = (rows >= 0) & (rows < num_cats)
        dense = logits.new_full((batch, num_cats + 1), UNSCORED)
        dense.scatter_(
            1, torch.where(is_cat, rows, num_cats), logits.detach().masked_fill(~is_cat, UNSCORED)
        )
        extra = {"beam_rows": rows, "beam_logits": logits}
        if positive is not None:
            extra["beam_positive"] = positive.gather(1, rows.clamp(min=0)) & (rows >= 0)
        return dense[:, :num_cats], extra

    def selection_outputs(self, logits, rows, extra=None) -> dict:
        return {
            "selection_logits": logits,
            "selected_rows": rows,
            "category_ids": self.category_ids[rows],
            "all_category_ids": self.category_ids,
            **(extra or {}),
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
        _, _, logits, rows, extra = self.select(
            backbone_levels(self.backbone, images), masks, targets
        )
        return self.selection_outputs(logits, rows, extra)


class CQDINO(SelectionMixin, DeformableDetector):
    """The whole detector. The selected categories' image-conditioned selector outputs
    [B, C', W] (the paper's Q'_cat) are mapped to the model width by `category_proj` (the
    released code's `text_feat_map`) and go through the feature enhancer, steer the proposals
    (language-guided query selection) and the cross-modality decoder; the detector's loss
    reaches the selector through them."""

    def __init__(
        self,
        backbone: nn.Module,
        transformer: DeformableTransformer,
        category_ids,
        category_queries: CategoryQueries,
        selector: ImageGuidedSelection,
        num_selected: int = 100,
        force_gt_categories: bool = False,
        dn_labels: str = "learned",
        **kwargs,
    ):
        super().__init__(backbone, transformer, category_ids, **kwargs)
        if dn_labels not in DN_LABELS:
            raise ValueError(f"dn_labels must be one of {DN_LABELS}, not {dn_labels!r}")
        if transformer.enhancer is None:
            raise ValueError("CQ-DINO's transformer needs category_fusion=True")
        d = transformer.d_model
        self.category_queries = category_queries
        self.selector = selector
        self.category_proj = nn.Linear(selector.scorer.in_features, d)
        nn.init.xavier_uniform_(self.category_proj.weight)
        nn.init.zeros_(self.category_proj.bias)
        layers = len(transformer.decoder)
        self.alignment = per_layer(lambda: ContrastiveAlignment(d), layers, self.share_heads)
        # the proposals' own classifier when layers have their own (the released code's
        # cls_branches[num_layers]); with shared heads every classification shares one
        self.enc_alignment = None if self.share_heads else ContrastiveAlignment(d)
        self.num_selected = num_selected
        self.force_gt_categories = force_gt_categories
        # denoising content queries: a learned embedding per slot index, as the released code's
        # Grounding DINO denoising embeds each label's index in the image's prompt; or the
        # selected categories' own features (`category`)
        self.dn_label_embedding = nn.Embedding(num_selected, d) if dn_labels == "learned" else None

    def class_logits(self, tokens, layer: int, best_only: bool = False, categories=None):
        """Alignment logits against the (fused) selected category queries [..., C']."""
        if layer < 0 and self.enc_alignment is not None:
            return self.enc_alignment(tokens, categories, best_only)
        return layer_module(self.alignment, max(layer, 0))(tokens, categories, best_only)

    def forward(self, images, masks, targets=None) -> dict:
        backbone_feats = self.backbone_features(images)
        cats, image_tokens, sel_logits, rows, extra = self.select(backbone_feats, masks, targets)
        hidden = self.selector.encode(
            select_rows(cats, rows), *image_tokens
        )  # [B, C', W], image-conditioned
        selected = self.category_proj(hidden)  # [B, C', D]
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
                self.dn_label_embedding if self.dn_label_embedding is not None else embed,
                self.transformer.num_queries,
                self.dn_number,
                self.label_noise,
                self.box_noise,
                num_classes=rows.shape[1],
            )
        result = self.detect(feats, level_masks, positions, dn, categories=selected)
        result.update(self.selection_outputs(sel_logits, rows, extra))
        return result


def selection_targets(
    targets: list[dict], category_ids: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """[B, C] bool: the categories present in each image (rows of `category_ids`)."""
    present = torch.zeros(len(targets), num_rows, dtype=torch.bool, device=category_ids.device)
    for b, t in enumerate(targets):
        present[b, label_columns(t["labels"].to(category_ids.device), category_ids)] = True
    return present
