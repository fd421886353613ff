"""One builder from configuration to `(model, criterion, postprocessor)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from taxonomy.hierarchy import ALPHA_RULES
from vastdet.config import at_least
from vastdet.models.backbone import build_backbone, resolve_norm
from vastdet.models.category_queries import CORRELATIONS, CategoryQueries, initial_embeddings
from vastdet.models.cq_dino import CQDINO, DN_LABELS, CategorySelector, ImageGuidedSelection
from vastdet.models.criterion import (
    DEFAULT_WEIGHTS,
    OneToMany,
    SelectionCriterion,
    SetCriterion,
)
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
    are the paper's where it gives them (C' = 100 selected categories, tree construction with
    eq. 7's alpha, ASL with gamma_neg 7, gamma_pos 0, clip 0.05, loss weights selection 1,
    alignment 1, L1 5, GIoU 2) and the released code's where it is silent (the selector head's
    sizes, the category width 768, the feature enhancer's fusion at width 1024 with 4 heads).
    The README's table lists where the two differ and which one each switch takes."""

    architecture: str = "dino"
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    # where a detector's checkpoint keeps the backbone (`backbone.`, ...); None: detected
    backbone_weights_prefix: str | None = None
    # ResNet: frozen_bn | group_norm | auto (frozen over pretrained weights, GroupNorm from
    # scratch); resolved when the config is read, so a run's config.json says which it trained
    backbone_norm: str = "auto"
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
    share_heads: bool = True  # one box head/classifier for all decoder layers (DINO) or one each
    backbone_drop_path: float | None = at_least(0.0, None)  # Swin stochastic depth; None: 0.2
    # CQ-DINO
    category_embeddings: str | None = None  # `vastdet taxonomy embed` output; none: random
    text_dim: int = at_least(1, 768)  # embedding width (CLIP ViT-L/14's; the file's wins)
    correlation: str = "tree"  # tree | self_attention | none
    correlation_heads: int = at_least(1, 8)  # the self-attention correlation's heads (paper)
    tree_alpha: str = "paper"  # eq. 7 as printed, or `official` (the released code's rule)
    tree_weight: float | None = at_least(0.0, None)  # w of eq. 7; None: the rule's (0.3 / 0.4)
    category_width: int = at_least(1, 768)  # W: category queries and selector (released: 768)
    num_selected: int = at_least(1, 100)  # C'
    force_gt_categories: bool = False  # training: ground-truth categories always selected
    selector_layers: int = at_least(1, 2)  # the released code's Query2Label head: 2 layers,
    selector_heads: int = at_least(1, 4)  # 4 heads,
    selector_ffn: int = at_least(1, 3072)  # an FFN of 3072,
    selector_dropout: float = at_least(0.0, 0.1)  # dropout 0.1,
    selector_image_width: int = at_least(1, 512)  # image tokens mapped to 512
    selector_chunk: int = at_least(1, 4096)  # categories scored per chunk (recomputed in backward)
    selector_masks_padding: bool = True  # False: pool and attend over padding (released code)
    dn_labels: str = "learned"  # denoising content: learned per slot (released) or `category`
    fusion_dim: int = at_least(1, 1024)  # feature enhancer's bi-attention width (released code)
    fusion_heads: int = at_least(1, 4)
    fusion_dropout: float = at_least(0.0, 0.1)
    fusion_category_layers: bool = False  # Grounding DINO's category self-attention + FFN too
    asl: tuple[float, float, float] = (7.0, 0.0, 0.05)  # gamma_neg, gamma_pos, clip
    # flat: score every category per image (paper); beam: walk the taxonomy top-down, keeping
    # the beam_width best nodes per level (ours, `vastdet.models.beam`)
    selection: str = "flat"
    beam_width: int = at_least(1, 16)
    init_from: str | None = None  # stage 2: a stage-1 run folder or exported file
    # PaQ-DETR (the paper's settings: 50 patterns for 300 queries, 150 for 900)
    patterns: int = at_least(0, 0)  # m of Q^P; 0: DINO's static content queries ("D" off)
    pattern_hidden: int = at_least(1, 32)  # the weight generator MLP's hidden width (ours)
    pattern_dilation: int = at_least(1, 2)  # its dilated 3x3 convolutions' dilation (ours)
    diversity_weight: float = at_least(0.0, 0.2)  # beta of eq. 9
    one_to_many: bool = False  # quality-aware one-to-many on intermediate layers ("Q")
    o2m_topk: int = at_least(1, 4)  # k of eq. 7
    o2m_min_positives: int = at_least(1, 1)  # l of eq. 7
    o2m_gamma: float = at_least(0.0, 0.4)  # gamma of eq. 6
    vfl_alpha: float = at_least(0.0, 0.75)  # varifocal loss (VarifocalNet's values)
    vfl_gamma: float = at_least(0.0, 2.0)
    diagnostics: bool = True  # log rho (eq. 3) and eta (eq. 4) on the classification logits

    def __post_init__(self) -> None:
        self.backbone_norm = resolve_norm(self.backbone, self.backbone_norm, self.backbone_weights)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not available ({', '.join(ARCHITECTURES)})"
            )
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, not {self.correlation!r}")
        if self.dn_labels not in DN_LABELS:
            raise ValueError(f"dn_labels must be one of {DN_LABELS}, not {self.dn_labels!r}")
        if self.selection not in ("flat", "beam"):
            raise ValueError(f"selection must be flat or beam, not {self.selection!r}")
        if self.tree_alpha not in ALPHA_RULES:
            raise ValueError(
                f"tree_alpha must be one of {sorted(ALPHA_RULES)}, not {self.tree_alpha!r}"
            )
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
    backbone = build_backbone(
        cfg.backbone,
        cfg.backbone_weights,
        cfg.train_backbone_from_stage,
        cfg.backbone_drop_path,
        cfg.backbone_norm,
        cfg.backbone_weights_prefix,
    )
    if cfg.architecture == "dino":
        return _build_dino(cfg, backbone, category_ids)
    hierarchy = None
    if taxonomy is not None:
        from taxonomy.hierarchy import CategoryHierarchy

        hierarchy = CategoryHierarchy.from_taxonomy(taxonomy, cfg.tree_weight, cfg.tree_alpha)
        if not torch.equal(torch.as_tensor(hierarchy.category_ids), category_ids):
            raise ValueError("the taxonomy's categories are not the model's category ids")
    init = None if restoring else initial_embeddings(cfg.category_embeddings, category_ids)
    queries = CategoryQueries(
        len(category_ids),
        cfg.category_width,
        init.shape[1] if init is not None else cfg.text_dim,
        cfg.correlation,
        cfg.correlation_heads,
        init,
        hierarchy,
        require_hierarchy=not restoring,
    )
    selector = ImageGuidedSelection(
        backbone.channels[-1],
        cfg.category_width,
        cfg.selector_image_width,
        cfg.selector_layers,
        cfg.selector_heads,
        cfg.selector_ffn,
        cfg.selector_dropout,
        cfg.selector_chunk,
        cfg.selector_masks_padding,
    )
    selection = SelectionCriterion(*cfg.asl, hierarchy=hierarchy)
    beam = _beam(cfg, taxonomy, category_ids, restoring)
    if cfg.architecture == "cq_selector":
        model = CategorySelector(
            backbone, queries, selector, category_ids, cfg.num_selected, cfg.force_gt_categories
        )
        model.beam = beam
        return model, selection, None
    model = CQDINO(
        backbone,
        _transformer(cfg, category_fusion=True),
        category_ids,
        queries,
        selector,
        cfg.num_selected,
        cfg.force_gt_categories,
        cfg.dn_labels,
        num_levels=cfg.num_levels,
        dn_number=cfg.dn_number,
        label_noise=cfg.label_noise,
        box_noise=cfg.box_noise,
        neck_groups=cfg.neck_groups,
        share_heads=cfg.share_heads,
    )
    model.beam = beam
    return model, _criterion(cfg, selection), PostProcess(cfg.max_detections)


def _beam(cfg: ModelConfig, taxonomy, category_ids: torch.Tensor, restoring: bool):
    """The taxonomy-guided selection's tree (`selection: beam`), or None (flat selection)."""
    if cfg.selection == "flat":
        return None
    from vastdet.models.beam import BeamTree

    if taxonomy is None:
        if not restoring:
            raise ValueError("selection: beam walks the category tree: give the taxonomy")
        return BeamTree(None, cfg.beam_width)  # its buffers come with the weights
    from taxonomy.hierarchy import SelectionTree

    tree = SelectionTree.from_taxonomy(taxonomy)
    if tree.num_categories != len(category_ids):
        raise ValueError("the taxonomy's categories are not the model's category ids")
    return BeamTree(tree, cfg.beam_width)


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
        cfg.fusion_dim,
        cfg.fusion_heads,
        cfg.fusion_dropout,
        cfg.fusion_category_layers,
        cfg.patterns,
        cfg.pattern_hidden,
        cfg.pattern_dilation,
    )


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    """The one-to-one matcher with the model's costs (training, and query use in evaluation)."""
    cost_class, cost_bbox, cost_giou = cfg.matcher_costs
    return HungarianMatcher(cost_class, cost_bbox, cost_giou, cfg.focal_alpha, cfg.focal_gamma)


def _criterion(cfg: ModelConfig, selection=None) -> SetCriterion:
    one_to_many = None
    if cfg.one_to_many:
        one_to_many = OneToMany(
            cfg.o2m_topk, cfg.o2m_min_positives, cfg.o2m_gamma, cfg.vfl_alpha, cfg.vfl_gamma
        )
    return SetCriterion(
        build_matcher(cfg),
        cfg.loss_weights,
        cfg.focal_alpha,
        cfg.focal_gamma,
        selection,
        cfg.diagnostics,
        one_to_many,
        cfg.diversity_weight,
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
        cfg.share_heads,
    )
    return model, _criterion(cfg), PostProcess(cfg.max_detections)
