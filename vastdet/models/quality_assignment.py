"""PaQ-DETR's quality-aware one-to-many assignment (§3.3), for the intermediate decoder layers.

    s_ij = IoU(b_i, g_j) - gamma * c_i                              (eq. 6, gamma = 0.4)
    k_j  = max(ceil(sum of the top-k s_.j), l)                      (eq. 7, k = 4, l = 1)

Each ground truth takes its k_j best predictions by s. Two readings the paper leaves open, and
the ones taken here:

- c_i, "the classification confidence": the prediction's probability for g_j's class (the
  sigmoid of its logit at g_j's column). Under a vast vocabulary this is the confidence that
  concerns the pair, and it is a gather at the target columns, never a [Q, C] maximum. A ground
  truth without a column (CQ-DINO's unselected categories) has c = 0: s is its IoU.
- A prediction among the positives of several ground truths is a positive of the one where its
  s is highest (the lower ground-truth index on a tie), so no prediction is asked to regress two
  boxes. A ground truth can therefore end with fewer than k_j positives, even none; its
  one-to-one Hungarian loss on the same layer (kept, eq. 9's L_aux) still supervises it.

Ties in s within a ground truth's ranking go to the lower prediction index.
"""

from __future__ import annotations

import math

import torch

from vastdet.models.box_ops import box_iou, cxcywh_to_xyxy


@torch.no_grad()
def quality_scores(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    target_boxes: torch.Tensor,
    gamma: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [Q, T] of eq. 6, IoU [Q, T]) for one image: logits [Q, K], boxes [Q, 4] and
    target_boxes [T, 4] normalised cxcywh, labels [T] columns of K (-1: none)."""
    iou, _ = box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
    confidence = logits[:, labels.clamp(min=0)].float().sigmoid() * (labels >= 0).float()
    return iou - gamma * confidence, iou


@torch.no_grad()
def assign_one_to_many(
    scores: torch.Tensor, topk: int = 4, min_positives: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction indices [P], ground-truth indices [P], k_j [T]) from s [Q, T] (eq. 7 and
    the conflict rule of the module docstring)."""
    q, t = scores.shape
    empty = torch.zeros(0, dtype=torch.int64, device=scores.device)
    if q == 0 or t == 0:
        return empty, empty, torch.zeros(t, dtype=torch.int64, device=scores.device)
    top = scores.topk(min(topk, q), dim=0).values.sum(0)  # [T]
    counts = torch.tensor(
        [min(max(math.ceil(v), min_positives), q) for v in top.tolist()],
        dtype=torch.int64,
        device=scores.device,
    )
    order = torch.argsort(-scores, dim=0, stable=True)  # ties: lower prediction index first
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(q, device=scores.device)[:, None].expand(q, t))
    wanted = rank < counts[None]  # [Q, T]
    claimed = torch.where(wanted, scores, torch.full_like(scores, -math.inf))
    best = claimed.argmax(1)  # the first maximum: the lower ground-truth index on a tie
    predictions = torch.nonzero(wanted.any(1)).squeeze(1)
    return predictions, best[predictions], counts
