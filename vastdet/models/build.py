"""One builder from configuration to `(model, criterion, postprocessor)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vastdet.config import at_least
from vastdet.models.backbone import build_backbone
from vastdet.models.category_queries import CORRELATIONS, CategoryQueries, initial_embeddings
from vastdet.models.cq_dino import CQDINO, CategorySelector, ImageGuidedSelection
from vastdet.models.criterion import DEFAULT_WEIGHTS, SelectionCriterion, SetCriterion
from vastdet.models.dino import DINO
from vastdet.models.matcher import HungarianMatcher
from vastdet.models.postprocess import PostProcess
from vastdet.models.transformer import DeformableTransformer

ARCHITECTURES = ("dino", "cq_dino", "cq_selector")
log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """DINO-4scale's settings by default (R50, 900 queries, 6 + 6 layers, 100 denoising queries).

    `cq_dino` is CQ-DINO (stage 2, the whole detector); `cq_selector` its stage 1 (backbone,
    category queries and selector, trained with the selection loss alone). CQ-DINO's defaults
    are the paper's: C' = 100 selected categories, tree construction with w = 0.3, ASL with
    gamma_neg 7, gamma_pos 0, clip 0.05, loss weights selection 1, alignment 1, L1 5, GIoU 2."""

    architecture: str = "dino"
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    train_backbone_from_stage: int = at_least(0, 2)
    d_model: int = at_least(1, 256)
    heads: int = at_least(1, 8)
    enc_layers: int = at_least(1, 6)
    dec_layers: int = at_least(1, 6)
    d_ffn: int = at_least(1, 2048)
    dropout: float = at_least(0.0, 0.0)
    num_levels: int = at_least(1, 4)
    enc_points: int = at_least(1, 4)
    dec_points: int = at_least(1, 4)
    num_queries: int = at_least(1, 900)
    neck_groups: int = at_least(1, 32)
    dn_number: int = at_least(0, 100)
    label_noise: float = at_least(0.0, 0.5)
    box_noise: float = at_least(0.0, 1.0)
    focal_alpha: float = at_least(0.0, 0.25)
    focal_gamma: float = at_least(0.0, 2.0)
    matcher_costs: tuple[float, float, float] = (2.0, 5.0, 2.0)  # class, L1, GIoU
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    max_detections: int = at_least(1, 300)
    # CQ-DINO
    category_embeddings: str | None = None  # `vastdet taxonomy embed` output; none: random
    text_dim: int = at_least(1, 768)  # embedding width (CLIP ViT-L/14's; the file's wins)
    correlation: str = "tree"  # tree | self_attention | none
    tree_weight: float = at_least(0.0, 0.3)  # w of eq. 7
    num_selected: int = at_least(1, 100)  # C'
    force_gt_categories: bool = False  # training: ground-truth categories always selected
    selector_heads: int = at_least(1, 8)
    selector_chunk: int = at_least(1, 4096)  # categories scored per chunk (recomputed in backward)
    asl: tuple[float, float, float] = (7.0, 0.0, 0.05)  # gamma_neg, gamma_pos, clip
    init_from: str | None = None  # stage 2: a stage-1 run folder or exported file
    diagnostics: bool = True  # log rho (eq. 3) and eta (eq. 4) on the classification logits

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not available ({', '.join(ARCHITECTURES)})"
            )
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, not {self.correlation!r}")
        if self.d_model % self.heads or self.d_model % self.neck_groups:
            raise ValueError(
                f"d_model {self.d_model} must divide by heads {self.heads} and neck_groups {self.neck_groups}"
            )


def build_model(
    cfg: ModelConfig,
    category_ids,
    taxonomy=None,
    restoring: bool = False,
    weights_follow: bool = False,
):
    """(model, criterion, postprocessor) for the given category ids (the classifier's columns,
    ascending). `taxonomy` gives CQ-DINO its hierarchy (tree construction and the selection
    loss's ancestor mask); `restoring`: the weights (tree buffers included) come next from a
    saved state, so no hierarchy is needed. `weights_follow`: trained weights will be loaded
    (a resumed run, a stage-1 model), so the log does not warn that parts without an initial
    weights file are random. A stage-1 model has no postprocessor (None)."""
    category_ids = torch.as_tensor(sorted(int(c) for c in category_ids), dtype=torch.int64)
    if not (restoring or weights_follow):
        _warn_random_parts(cfg)
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.train_backbone_from_stage)
    if cfg.architecture == "dino":
        return _build_dino(cfg, backbone, category_ids)
    hierarchy = None
    if taxonomy is not None:
        from taxonomy.hierarchy import CategoryHierarchy

        hierarchy = CategoryHierarchy.from_taxonomy(taxonomy, cfg.tree_weight)
        if not torch.equal(torch.as_tensor(hierarchy.category_ids), category_ids):
            raise ValueError("the taxonomy's categories are not the model's category ids")
    init = None if restoring else initial_embeddings(cfg.category_embeddings, category_ids)
    queries = CategoryQueries(
        len(category_ids),
        cfg.d_model,
        init.shape[1] if init is not None else cfg.text_dim,
        cfg.correlation,
        cfg.selector_heads,
        init,
        hierarchy,
        require_hierarchy=not restoring,
    )
    selector = ImageGuidedSelection(
        backbone.channels[-1], cfg.d_model, cfg.selector_heads, cfg.selector_chunk
    )
    selection = SelectionCriterion(*cfg.asl, hierarchy=hierarchy)
    if cfg.architecture == "cq_selector":
        model = CategorySelector(
            backbone, queries, selector, category_ids, cfg.num_selected, cfg.force_gt_categories
        )
        return model, selection, None
    model = CQDINO(
        backbone,
        _transformer(cfg, category_fusion=True),
        category_ids,
        queries,
        selector,
        cfg.num_selected,
        cfg.force_gt_categories,
        num_levels=cfg.num_levels,
        dn_number=cfg.dn_number,
        label_noise=cfg.label_noise,
        box_noise=cfg.box_noise,
        neck_groups=cfg.neck_groups,
    )
    return model, _criterion(cfg, selection), PostProcess(cfg.max_detections)


def _warn_random_parts(cfg: ModelConfig) -> None:
    """Say which parts start from random weights because no file names their weights."""
    if not cfg.backbone_weights:
        log.warning("backbone %s has no weights file: randomly initialised", cfg.backbone)
    if cfg.architecture != "dino" and not cfg.category_embeddings:
        log.warning("no category embedding file: category queries are randomly initialised")


def _transformer(cfg: ModelConfig, category_fusion: bool = False) -> DeformableTransformer:
    return DeformableTransformer(
        cfg.d_model,
        cfg.heads,
        cfg.enc_layers,
        cfg.dec_layers,
        cfg.d_ffn,
        cfg.dropout,
        cfg.num_levels,
        cfg.enc_points,
        cfg.dec_points,
        cfg.num_queries,
        category_fusion,
    )


def _criterion(cfg: ModelConfig, selection=None) -> SetCriterion:
    cost_class, cost_bbox, cost_giou = cfg.matcher_costs
    matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, cfg.focal_alpha, cfg.focal_gamma)
    return SetCriterion(
        matcher, cfg.loss_weights, cfg.focal_alpha, cfg.focal_gamma, selection, cfg.diagnostics
    )


def _build_dino(cfg: ModelConfig, backbone, category_ids):
    model = DINO(
        backbone,
        _transformer(cfg),
        category_ids,
        cfg.num_levels,
        cfg.dn_number,
        cfg.label_noise,
        cfg.box_noise,
        cfg.neck_groups,
    )
    return model, _criterion(cfg), PostProcess(cfg.max_detections)
