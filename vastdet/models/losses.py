"""Classification losses on logits, element-wise (the criterion decides how to reduce).

- `sigmoid_focal_loss` (Lin et al. 2017), DINO's classification loss: alpha 0.25, gamma 2.
- `varifocal_loss` (Zhang et al. 2021), PaQ-DETR's IoU-aware loss: positives weighted by their
  quality target q, negatives by alpha * p^gamma (VarifocalNet's alpha 0.75, gamma 2).
- `asymmetric_loss` (Ridnik et al. 2021), CQ-DINO's selection loss: gamma_neg 7, gamma_pos 0 and
  probability margin (clip) 0.05 as the official CQ-DINO code uses; `mask` drops entries (the
  ancestors of present categories) from the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), element-wise; alpha < 0 disables alpha_t."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def varifocal_loss(
    logits: torch.Tensor, quality: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0
) -> torch.Tensor:
    """VFL(p, q) = -q (q log p + (1 - q) log(1 - p)) where q > 0, else -alpha p^gamma log(1 - p).

    `quality` holds q: the IoU of the prediction with its matched target at the target's class,
    0 everywhere else.
    """
    p = logits.sigmoid()
    positive = (quality > 0).to(logits.dtype)
    weight = quality * positive + alpha * p.detach().pow(gamma) * (1 - positive)
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * weight


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 7.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """ASL, element-wise: positives -(1 - p)^gamma_pos log p; negatives -p_m^gamma_neg log(1 - p_m)
    with the shifted probability p_m = max(p - clip, 0). Entries where `mask` is True count 0.

    The focusing weights (1 - p)^gamma_pos and p_m^gamma_neg are constants to the gradient, as
    in the ASL reference and CQ-DINO's released code (`disable_torch_grad_focal_loss=True`):
    a negative's gradient is p_m^gamma_neg * p (1 - p) / (1 - p_m), not that plus the weight's
    own derivative, which at gamma_neg = 7 would multiply it several times over."""
    p = logits.sigmoid()
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    log_pos = torch.log(p.clamp(min=eps))
    log_neg = torch.log((1 - p_neg).clamp(min=eps))
    with torch.no_grad():
        weight = targets * (1 - p).pow(gamma_pos) + (1 - targets) * p_neg.pow(gamma_neg)
    loss = -(targets * log_pos + (1 - targets) * log_neg) * weight
    if mask is not None:
        loss = loss.masked_fill(mask, 0.0)
    return loss
