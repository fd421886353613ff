"""Classification losses against torchvision and hand-derived values."""

from __future__ import annotations

import math

import torch
import torchvision

from vastdet.models.losses import asymmetric_loss, sigmoid_focal_loss, varifocal_loss


def test_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64)
    targets = (torch.rand(4, 7, generator=g) > 0.7).double()
    expected = torchvision.ops.sigmoid_focal_loss(
        logits, targets, alpha=0.25, gamma=2.0, reduction="none"
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)


def test_varifocal_loss_hand_values():
    logit = torch.tensor([0.0, 0.0], dtype=torch.float64)  # p = 0.5
    quality = torch.tensor([0.8, 0.0], dtype=torch.float64)
    loss = varifocal_loss(logit, quality, alpha=0.75, gamma=2.0)
    # positive: -q (q log p + (1 - q) log(1 - p)) = -0.8 log 0.5; negative: -0.75 * 0.25 * log 0.5
    torch.testing.assert_close(
        loss, torch.tensor([0.8 * math.log(2), 0.75 * 0.25 * math.log(2)], dtype=torch.float64)
    )


def test_asymmetric_loss_hand_values_and_mask():
    p = torch.tensor([0.9, 0.3, 0.04], dtype=torch.float64)
    logits = torch.log(p / (1 - p))
    targets = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    loss = asymmetric_loss(logits, targets, gamma_neg=7, gamma_pos=0, clip=0.05)
    pm = 0.3 - 0.05
    expected = torch.tensor([-math.log(0.9), -(pm**7) * math.log(1 - pm), 0.0], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)  # a negative below the margin costs nothing
    masked = asymmetric_loss(logits, targets, mask=torch.tensor([False, True, False]))
    assert masked[1] == 0 and masked[0] == loss[0]


def test_asymmetric_loss_down_weights_easy_negatives_more_than_focal():
    logits = torch.full((1,), -1.0)
    zero = torch.zeros(1)
    assert asymmetric_loss(logits, zero) < sigmoid_focal_loss(logits, zero, alpha=-1)


def test_asymmetric_loss_gradient_treats_the_focusing_weight_as_a_constant():
    """d/dz of -w log(1 - p_m) with w = p_m^gamma held fixed (the ASL reference and CQ-DINO's
    released code): w * p (1 - p) / (1 - p_m) for a negative, -(1 - p)^gamma_pos (1 - p) for a
    positive. With the weight in the graph a negative's gradient would be several times this."""
    p = torch.tensor([0.8, 0.3, 0.07, 0.6], dtype=torch.float64)
    logits = torch.log(p / (1 - p)).requires_grad_()
    targets = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    asymmetric_loss(logits, targets, gamma_neg=7, gamma_pos=1, clip=0.05).sum().backward()
    pm = p - 0.05
    negative = pm**7 * p * (1 - p) / (1 - pm)
    positive = -((1 - p) ** 1) * (1 - p)
    expected = torch.where(targets > 0, positive, negative)
    torch.testing.assert_close(logits.grad, expected)
