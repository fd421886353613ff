"""DINO's training objective: matched focal classification, L1 and GIoU on every decoder layer,
on the encoder proposals and on the denoising queries (matched by construction).

Classification targets are formed without a one-hot [B, Q, C] tensor: the focal loss with target
0 is taken everywhere and corrected at the matched (query, class) entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vastdet.models.box_ops import cxcywh_to_xyxy, elementwise_generalized_box_iou
from vastdet.models.dino import label_columns
from vastdet.models.losses import sigmoid_focal_loss
from vastdet.models.matcher import HungarianMatcher

DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def num_boxes_across_ranks(targets: list[dict], device) -> float:
    """Target boxes per rank, averaged over ranks (so each rank's loss is on the same scale)."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return max(float(n.item()), 1.0)


class SetCriterion(nn.Module):
    def __init__(
        self,
        matcher: HungarianMatcher,
        weights: dict[str, float] | None = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        self.alpha, self.gamma = alpha, gamma

    def classification(
        self, logits: torch.Tensor, matches, targets, num_boxes: float
    ) -> torch.Tensor:
        """Sum of focal terms over [B, Q, C] / num_boxes; positives at matched (query, class)."""
        zeros = torch.zeros((), dtype=logits.dtype, device=logits.device).expand_as(logits)
        loss = sigmoid_focal_loss(logits, zeros, self.alpha, self.gamma).sum()
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)]).to(
            logits.device
        )
        q_idx = torch.cat([q for q, _ in matches]).to(logits.device)
        c_idx = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)]).to(logits.device)
        if q_idx.numel():
            picked = logits[b_idx, q_idx, c_idx]
            ones, none = torch.ones_like(picked), torch.zeros_like(picked)
            loss = (
                loss
                + (
                    sigmoid_focal_loss(picked, ones, self.alpha, self.gamma)
                    - sigmoid_focal_loss(picked, none, self.alpha, self.gamma)
                ).sum()
            )
        return loss / num_boxes

    @staticmethod
    def box_losses(
        boxes: torch.Tensor, matches, targets, num_boxes: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.cat([boxes[b, q] for b, (q, _) in enumerate(matches)])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)]).to(boxes)
        if src.numel() == 0:
            zero = boxes.sum() * 0.0  # keeps the graph (and every rank's collectives) intact
            return zero, zero
        l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = (
            1 - elementwise_generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))
        ).sum() / num_boxes
        return l1, giou

    def layer_losses(
        self, out: dict, targets, matches, num_boxes: float, suffix: str
    ) -> dict[str, torch.Tensor]:
        l1, giou = self.box_losses(out["pred_boxes"], matches, targets, num_boxes)
        return {
            f"loss_ce{suffix}": self.classification(
                out["pred_logits"], matches, targets, num_boxes
            ),
            f"loss_bbox{suffix}": l1,
            f"loss_giou{suffix}": giou,
        }

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms; `weighted_sum` combines them. Targets' labels are category ids."""
        cats = outputs["category_ids"]
        targets = [
            {**t, "labels": label_columns(t["labels"].to(cats.device), cats)} for t in targets
        ]
        num_boxes = num_boxes_across_ranks(targets, cats.device)
        losses = self.layer_losses(outputs, targets, self.matcher(outputs, targets), num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(
                self.layer_losses(aux, targets, self.matcher(aux, targets), num_boxes, f"_{i}")
            )
        enc = outputs["enc_outputs"]
        losses.update(
            self.layer_losses(enc, targets, self.matcher(enc, targets), num_boxes, "_enc")
        )
        meta = outputs.get("dn_meta")
        for i, dn in enumerate(outputs.get("dn_outputs", [])):
            matches = [
                (meta.positive_slots(b), torch.arange(meta.counts[b]).repeat(meta.groups))
                for b in range(len(targets))
            ]
            losses.update(
                self.layer_losses(dn, targets, matches, num_boxes * meta.groups, f"_dn_{i}")
            )
        return losses

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of every term times the weight of its kind (`loss_ce_3` -> `loss_ce`)."""
        total = 0.0
        for name, value in losses.items():
            kind = "_".join(name.split("_")[:2])
            total = total + self.weights.get(kind, 0.0) * value
        return total
