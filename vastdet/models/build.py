"""One builder from configuration to `(model, criterion, postprocessor)`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vastdet.models.backbone import build_backbone
from vastdet.models.criterion import DEFAULT_WEIGHTS, SetCriterion
from vastdet.models.dino import DINO
from vastdet.models.matcher import HungarianMatcher
from vastdet.models.postprocess import PostProcess
from vastdet.models.transformer import DeformableTransformer


@dataclass
class ModelConfig:
    """DINO-4scale's settings by default (R50, 900 queries, 6 + 6 layers, 100 denoising queries)."""

    architecture: str = "dino"
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    train_backbone_from_stage: int = 2
    d_model: int = 256
    heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    d_ffn: int = 2048
    dropout: float = 0.0
    num_levels: int = 4
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 900
    neck_groups: int = 32
    dn_number: int = 100
    label_noise: float = 0.5
    box_noise: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    matcher_costs: tuple[float, float, float] = (2.0, 5.0, 2.0)  # class, L1, GIoU
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    max_detections: int = 300

    def __post_init__(self) -> None:
        if self.architecture != "dino":
            raise ValueError(f"architecture {self.architecture!r} is not available (dino)")
        if self.d_model % self.heads or self.d_model % self.neck_groups:
            raise ValueError(
                f"d_model {self.d_model} must divide by heads {self.heads} and neck_groups {self.neck_groups}"
            )


def build_model(cfg: ModelConfig, category_ids) -> tuple[DINO, SetCriterion, PostProcess]:
    """(model, criterion, postprocessor) for the given category ids (the classifier's columns)."""
    category_ids = torch.as_tensor(sorted(int(c) for c in category_ids), dtype=torch.int64)
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.train_backbone_from_stage)
    transformer = DeformableTransformer(
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
    )
    model = DINO(
        backbone,
        transformer,
        category_ids,
        cfg.num_levels,
        cfg.dn_number,
        cfg.label_noise,
        cfg.box_noise,
        cfg.neck_groups,
    )
    cost_class, cost_bbox, cost_giou = cfg.matcher_costs
    matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, cfg.focal_alpha, cfg.focal_gamma)
    criterion = SetCriterion(matcher, cfg.loss_weights, cfg.focal_alpha, cfg.focal_gamma)
    return model, criterion, PostProcess(cfg.max_detections)
