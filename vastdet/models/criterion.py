"""DINO's training objective: matched focal classification, L1 and GIoU on every decoder layer,
on the encoder proposals and on the denoising queries (matched by construction); with PaQ-DETR,
also the quality-aware one-to-many losses of the intermediate layers (varifocal
classification, L1, GIoU) and the pattern diversity loss (eq. 8-9).

Classification targets are formed without a one-hot [B, Q, C] tensor: the loss with target 0
is taken everywhere and corrected at the positive (query, class) entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vastdet.models.box_ops import cxcywh_to_xyxy, elementwise_generalized_box_iou
from vastdet.models.category_queries import ancestor_mask, hierarchy_edges
from vastdet.models.cq_dino import selection_targets, slot_of
from vastdet.models.dino import label_columns
from vastdet.models.losses import asymmetric_loss, sigmoid_focal_loss, varifocal_loss
from vastdet.models.matcher import HungarianMatcher
from vastdet.models.patterns import pattern_diversity
from vastdet.models.quality_assignment import assign_one_to_many, quality_scores

DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_sel": 1.0}
HARD_NEGATIVES = 10  # N_h of eq. 4: the highest-scoring negatives of each matched query


@torch.no_grad()
def gradient_diagnostics(
    logits: torch.Tensor, matches, targets, hard: int = HARD_NEGATIVES
) -> dict[str, torch.Tensor]:
    """CQ-DINO's eq. 3 and 4 on the final layer's classification logits [B, Q, K], over the
    matched queries, with the sigmoid cross-entropy gradient |sigma(z) - y| of eq. 1:

    - `diag_rho`: positive-to-negative gradient ratio, sum over positives of 1 - sigma(z+)
      over the sum over every other column of sigma(z-);
    - `diag_eta`: hard-negative share, the `hard` largest sigma(z-) of each matched query over
      all of its negatives.

    K is every category for DINO and the C' selected slots for CQ-DINO (eq. 5). Queries whose
    target has no column (-1) are left out."""
    rows, cols = [], []
    for b, ((q, j), t) in enumerate(zip(matches, targets)):
        labels = t["labels"][j].to(logits.device)
        keep = labels >= 0
        rows.append(logits[b, q.to(logits.device)[keep]])
        cols.append(labels[keep])
    z = torch.cat(rows).float() if rows else logits.new_zeros(0, logits.shape[-1])
    if z.shape[0] == 0:
        nan = torch.tensor(float("nan"), device=logits.device)
        return {"diag_rho": nan, "diag_eta": nan}
    c = torch.cat(cols)
    p = z.sigmoid()
    positive = 1 - p.gather(1, c[:, None]).squeeze(1)
    negatives = p.scatter(1, c[:, None], 0.0)
    total_neg = negatives.sum()
    top = negatives.topk(min(hard, max(p.shape[1] - 1, 1)), dim=1).values.sum()
    return {"diag_rho": positive.sum() / total_neg, "diag_eta": top / total_neg}


class SelectionCriterion(nn.Module):
    """CQ-DINO's selection loss: the asymmetric loss over every category's selection logit
    [B, C], targets the categories present in the image, the strict ancestors of present
    categories left out of the negatives when a hierarchy is given (§3.4). Summed over
    categories and over the rank's images, as the released code reduces it (`-loss.sum()`).
    Under taxonomy-guided selection (`beam_*` outputs) the same loss covers every node the walk
    scored, an image's categories and all their ancestors being its positives."""

    def __init__(
        self,
        gamma_neg: float = 7.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        hierarchy=None,
    ):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.weights = {"loss_sel": 1.0}
        self.parent = self.child = None  # the hierarchy's edges, deepest parents first
        self.level_sizes: list[int] = []
        if hierarchy is not None:  # a taxonomy.CategoryHierarchy in the model's row order
            self.parent, self.child, self.level_sizes = hierarchy_edges(hierarchy.levels)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        if "beam_logits" in outputs:  # taxonomy-guided selection: every node the walk scored
            rows, logits = outputs["beam_rows"], outputs["beam_logits"]
            padding = rows < 0
            loss = asymmetric_loss(
                logits.masked_fill(padding, 0.0),
                outputs["beam_positive"].to(logits.dtype),
                self.gamma_neg, self.gamma_pos, self.clip, padding,
            )  # fmt: skip
            return {"loss_sel": loss.sum()}
        logits, cats = outputs["selection_logits"], outputs["all_category_ids"]
        present = selection_targets(targets, cats, logits.shape[1])
        mask = None
        if self.level_sizes:
            if self.parent.device != logits.device:
                self.parent, self.child = (
                    self.parent.to(logits.device),
                    self.child.to(logits.device),
                )
            mask = ancestor_mask(present, self.parent, self.child, self.level_sizes)
        loss = asymmetric_loss(
            logits, present.to(logits.dtype), self.gamma_neg, self.gamma_pos, self.clip, mask
        )
        return {"loss_sel": loss.sum()}

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(k, 0.0) * v for k, v in losses.items() if k in self.weights)


def mean_across_ranks(count: float, device) -> float:
    """A per-rank count averaged over ranks, at least 1 (so each rank's loss has one scale).
    Collective: every rank calls it at the same point."""
    n = torch.tensor([float(count)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return max(float(n.item()), 1.0)


def num_boxes_across_ranks(targets: list[dict], device) -> float:
    """Target boxes per rank, averaged over ranks (so each rank's loss is on the same scale)."""
    return mean_across_ranks(sum(len(t["labels"]) for t in targets), device)


def column_targets(outputs: dict, targets: list[dict]) -> list[dict]:
    """Targets with `labels` as the outputs' columns: rows of `category_ids` [C] (every
    image's), or slots of [B, C'] (CQ-DINO's selected categories, -1 where not selected)."""
    cats = outputs["category_ids"]
    return [
        {
            **t,
            "labels": label_columns(t["labels"].to(cats.device), cats)
            if cats.dim() == 1
            else slot_of(t["labels"].to(cats.device), cats[b]),
        }
        for b, t in enumerate(targets)
    ]


class OneToMany:
    """PaQ-DETR's quality-aware one-to-many settings (§3.3-3.4): top-k 4, at least 1
    positive, gamma 0.4, varifocal loss with VarifocalNet's alpha 0.75 and gamma 2."""

    def __init__(
        self,
        topk: int = 4,
        min_positives: int = 1,
        gamma: float = 0.4,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
    ):
        self.topk, self.min_positives, self.gamma = topk, min_positives, gamma
        self.vfl_alpha, self.vfl_gamma = vfl_alpha, vfl_gamma


class SetCriterion(nn.Module):
    def __init__(
        self,
        matcher: HungarianMatcher,
        weights: dict[str, float] | None = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        selection: SelectionCriterion | None = None,
        diagnostics: bool = True,
        one_to_many: OneToMany | None = None,
        diversity_weight: float = 0.2,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {**(weights or DEFAULT_WEIGHTS), "loss_div": diversity_weight}
        self.alpha, self.gamma = alpha, gamma
        self.selection = selection
        self.diagnostics = diagnostics
        self.one_to_many = one_to_many

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
        labelled = c_idx >= 0  # a target with label -1 has no class column: box losses only
        b_idx, q_idx, c_idx = b_idx[labelled], q_idx[labelled], c_idx[labelled]
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

    def one_to_many_losses(self, out: dict, targets, suffix: str) -> dict[str, torch.Tensor]:
        """PaQ-DETR's quality-aware one-to-many losses on one layer's outputs: varifocal
        classification with each positive's IoU as its target (at its ground truth's column;
        none for a ground truth without one), L1 and GIoU on the positives, all over the
        positives' count averaged across ranks. Collective (that average)."""
        logits, boxes, o2m = out["pred_logits"], out["pred_boxes"], self.one_to_many
        matches, b_idx, q_idx, c_idx, quality = [], [], [], [], []
        for b, t in enumerate(targets):
            labels = t["labels"].to(logits.device)
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
                matches.append((empty, empty))
                continue
            s, iou = quality_scores(
                logits[b], boxes[b], labels, t["boxes"].to(logits.device), o2m.gamma
            )
            pred, gt, _ = assign_one_to_many(s, o2m.topk, o2m.min_positives)
            matches.append((pred, gt))
            keep = labels[gt] >= 0
            b_idx.append(torch.full_like(pred[keep], b))
            q_idx.append(pred[keep])
            c_idx.append(labels[gt][keep])
            quality.append(iou[pred, gt][keep])
        num_pos = mean_across_ranks(sum(len(p) for p, _ in matches), logits.device)
        zeros = torch.zeros((), dtype=logits.dtype, device=logits.device).expand_as(logits)
        cls = varifocal_loss(logits, zeros, o2m.vfl_alpha, o2m.vfl_gamma).sum()
        if b_idx and torch.cat(b_idx).numel():
            b_all, q_all, c_all = torch.cat(b_idx), torch.cat(q_idx), torch.cat(c_idx)
            picked = logits[b_all, q_all, c_all]
            target = torch.cat(quality).to(picked.dtype)
            cls = (
                cls
                + (
                    varifocal_loss(picked, target, o2m.vfl_alpha, o2m.vfl_gamma)
                    - varifocal_loss(picked, torch.zeros_like(picked), o2m.vfl_alpha, o2m.vfl_gamma)
                ).sum()
            )
        l1, giou = self.box_losses(boxes, matches, targets, num_pos)
        return {
            f"loss_ce{suffix}": cls / num_pos,
            f"loss_bbox{suffix}": l1,
            f"loss_giou{suffix}": giou,
        }

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms; `weighted_sum` combines them. Targets' labels are category ids;
        `category_ids` is [C] (every image's columns) or [B, C'] (CQ-DINO's selected slots, -1
        for a ground truth whose category was not selected)."""
        cats = outputs["category_ids"]
        raw_targets = targets
        targets = column_targets(outputs, targets)
        num_boxes = num_boxes_across_ranks(targets, cats.device)
        final_matches = self.matcher(outputs, targets)
        losses = self.layer_losses(outputs, targets, final_matches, num_boxes, "")
        if self.selection is not None and "selection_logits" in outputs:
            losses.update(self.selection(outputs, raw_targets))
        if self.diagnostics:
            losses.update(gradient_diagnostics(outputs["pred_logits"], final_matches, targets))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(
                self.layer_losses(aux, targets, self.matcher(aux, targets), num_boxes, f"_{i}")
            )
            if self.one_to_many is not None:  # PaQ-DETR: intermediate layers only
                losses.update(self.one_to_many_losses(aux, targets, f"_o2m_{i}"))
        if "patterns" in outputs:  # PaQ-DETR's eq. 8, weighted by beta
            losses["loss_div"] = pattern_diversity(outputs["patterns"])
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
            if name.startswith("diag_"):
                continue
            kind = "_".join(name.split("_")[:2])
            total = total + self.weights.get(kind, 0.0) * value
        return total
