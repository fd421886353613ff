"""DINO (Zhang et al. 2023): the all-category baseline both vast-vocabulary methods compare with.

Backbone -> 4-scale neck -> deformable transformer with mixed query selection, contrastive
denoising and look-forward-twice refinement. Classification is one sigmoid per category: the
head's C columns stand for `category_ids` (ascending), and outputs carry that mapping so
post-processing reports real category ids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.transforms import normalize_images
from vastdet.models.backbone import ChannelMapper, downsample_mask
from vastdet.models.denoising import build_denoising
from vastdet.models.position_encoding import SinePositionEncoding
from vastdet.models.transformer import MLP, DeformableTransformer

PRIOR_PROBABILITY = 0.01  # initial foreground probability of every class (focal loss practice)


def label_columns(labels: torch.Tensor, category_ids: torch.Tensor) -> torch.Tensor:
    """Column of each category id in `category_ids` (ascending); names ids outside the vocabulary."""
    cols = torch.searchsorted(category_ids, labels).clamp(max=max(len(category_ids) - 1, 0))
    bad = (
        category_ids[cols] != labels
        if len(category_ids)
        else torch.ones_like(labels, dtype=torch.bool)
    )
    if bad.any():
        raise ValueError(
            f"category ids {labels[bad].unique()[:10].tolist()} are not in the model's vocabulary"
        )
    return cols


class ClassHead(nn.Linear):
    """A linear classifier over every category.

    `best_only=True` returns each token's highest logit [B, S] without holding [B, S, C]: tokens
    are scored in chunks inside this one forward call. One call per use, whatever the number of
    tokens, matters under ZeRO-3: parameters are gathered per module call, and ranks whose
    images differ in size must still make the same calls.
    """

    def __init__(self, in_features: int, num_classes: int, chunk: int = 4096):
        super().__init__(in_features, num_classes)
        self.chunk = chunk

    def forward(self, x: torch.Tensor, best_only: bool = False) -> torch.Tensor:
        if not best_only:
            return super().forward(x)
        return torch.cat(
            [
                F.linear(part, self.weight, self.bias).max(-1).values
                for part in x.split(self.chunk, dim=1)
            ],
            dim=1,
        )


PRIOR_BIAS = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)


def backbone_levels(backbone: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's feature levels; uint8 images are normalised here, on their device."""
    return backbone(normalize_images(images) if images.dtype == torch.uint8 else images)


def per_layer(make, layers: int, shared: bool) -> nn.Module:
    """One module used by every decoder layer (`shared`) or a ModuleList of one per layer."""
    return make() if shared else nn.ModuleList(make() for _ in range(layers))


def layer_module(heads: nn.Module, layer: int) -> nn.Module:
    """Decoder layer `layer`'s module of a `per_layer` head."""
    return heads[layer] if isinstance(heads, nn.ModuleList) else heads


class DeformableDetector(nn.Module):
    """What DINO and CQ-DINO share: backbone, 4-scale neck, positions, the deformable
    transformer, box heads (zero-initialised last layers) and the category-id buffer.

    `share_heads`: one box head (and classifier) for every decoder layer, as DINO's released
    code does, or one per layer, as CQ-DINO's (mmdetection's `share_pred_layer=False`). The
    encoder proposals always have heads of their own."""

    def __init__(
        self,
        backbone: nn.Module,
        transformer: DeformableTransformer,
        category_ids: torch.Tensor,
        num_levels: int = 4,
        dn_number: int = 100,
        label_noise: float = 0.5,
        box_noise: float = 1.0,
        neck_groups: int = 32,
        share_heads: bool = True,
    ):
        super().__init__()
        d = transformer.d_model
        self.share_heads = share_heads
        self.backbone = backbone
        self.neck = ChannelMapper(backbone.channels, d, num_levels, neck_groups)
        self.position = SinePositionEncoding(d // 2)
        self.transformer = transformer
        self.register_buffer(
            "category_ids", torch.as_tensor(category_ids, dtype=torch.int64), persistent=True
        )
        self.bbox_head = per_layer(lambda: MLP(d, d, 4, 3), len(transformer.decoder), share_heads)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.dn_number, self.label_noise, self.box_noise = dn_number, label_noise, box_noise
        for mlp in (*self.box_heads(), self.enc_bbox_head):
            nn.init.constant_(mlp.layers[-1].weight, 0.0)
            nn.init.constant_(mlp.layers[-1].bias, 0.0)

    def box_heads(self) -> list[nn.Module]:
        """The box head of each decoder layer (one module repeated when shared)."""
        return [layer_module(self.bbox_head, i) for i in range(len(self.transformer.decoder))]

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return backbone_levels(self.backbone, images)

    def features(self, images: torch.Tensor, masks: torch.Tensor, backbone_feats=None):
        feats = self.neck(
            backbone_feats if backbone_feats is not None else self.backbone_features(images)
        )
        level_masks = [downsample_mask(masks, f.shape[-2:]) for f in feats]
        return (
            feats,
            level_masks,
            [self.position(m).to(f.dtype) for f, m in zip(feats, level_masks)],
        )

    def detect(self, feats, level_masks, positions, dn, categories=None) -> dict:
        """The transformer and the heads: per-layer outputs with denoising slots split off.
        `class_logits` is the subclass's classifier; `categories` [B, K, D] (CQ-DINO) are fused
        by the transformer and classified against."""
        out = self.transformer(
            feats,
            level_masks,
            positions,
            self.class_logits,
            self.box_heads(),
            self.enc_bbox_head,
            *(dn[:3] if dn is not None else (None, None, None)),
            categories=categories,
        )
        fused = out["categories"]
        logits = [self.class_logits(h, i, categories=fused) for i, h in enumerate(out["hs"])]
        enc_logits = self.class_logits(out["enc_tokens"], -1, categories=fused)
        pad = dn[3].pad_size if dn is not None else 0
        layers = [
            {"pred_logits": lg[:, pad:], "pred_boxes": bx[:, pad:]}
            for lg, bx in zip(logits, out["boxes"])
        ]
        result = {
            **layers[-1],
            "aux_outputs": layers[:-1],
            "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": out["enc_boxes"]},
        }
        if "pattern_weights" in out:  # PaQ-DETR: W^D [B, n, m] and the bank Q^P [m, d]
            result["pattern_weights"] = out["pattern_weights"]
            result["patterns"] = out["patterns"]
        if dn is not None:
            result["dn_outputs"] = [
                {"pred_logits": lg[:, :pad], "pred_boxes": bx[:, :pad]}
                for lg, bx in zip(logits, out["boxes"])
            ]
            result["dn_meta"] = dn[3]
        return result


class DINO(DeformableDetector):
    def __init__(
        self, backbone: nn.Module, transformer: DeformableTransformer, category_ids, *args, **kwargs
    ):
        super().__init__(backbone, transformer, category_ids, *args, **kwargs)
        d, num_classes = transformer.d_model, len(self.category_ids)
        layers = len(transformer.decoder)
        self.class_head = per_layer(lambda: ClassHead(d, num_classes), layers, self.share_heads)
        self.enc_class_head = ClassHead(d, num_classes)
        self.label_embedding = nn.Embedding(num_classes, d)
        for i in range(layers):
            nn.init.constant_(layer_module(self.class_head, i).bias, PRIOR_BIAS)
        nn.init.constant_(self.enc_class_head.bias, PRIOR_BIAS)

    def class_logits(
        self, tokens: torch.Tensor, layer: int, best_only: bool = False, categories=None
    ) -> torch.Tensor:
        """Logits over all categories [..., C] (or each token's best [...] with `best_only`);
        `layer = -1` is the encoder proposals' head."""
        head = self.enc_class_head if layer < 0 else layer_module(self.class_head, layer)
        return head(tokens, best_only)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, targets: list[dict] | None = None
    ) -> dict:
        """images [B, 3, H, W] (uint8 are normalised here), masks [B, H, W] True on padding;
        targets (training) with `labels` as category ids and normalised cxcywh `boxes`."""
        feats, level_masks, positions = self.features(images, masks)
        dn = None
        if self.training and targets is not None:
            cols = [
                label_columns(t["labels"].to(self.category_ids.device), self.category_ids)
                for t in targets
            ]
            dn = build_denoising(
                cols,
                [t["boxes"] for t in targets],
                self.label_embedding,
                self.transformer.num_queries,
                self.dn_number,
                self.label_noise,
                self.box_noise,
            )
        result = self.detect(feats, level_masks, positions, dn)
        result["category_ids"] = self.category_ids
        return result
