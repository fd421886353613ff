"""DINO's contrastive denoising queries (Zhang et al. 2023, §3.3).

Each group holds a positive and a negative copy of every ground truth: positives get box noise
below half the box size (they must reconstruct the box), negatives between one and two times it
(they must predict "no object"); labels are flipped to a random class with probability
`label_noise / 2`. The number of groups comes from the batch's largest target set
(`denoising_groups`: about 2 * `dn_number` queries in all, as DINO builds them). The attention mask keeps the matching queries from seeing any denoising query
and every group from seeing the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vastdet.models.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh


@dataclass
class DenoisingMeta:
    """Where each image's denoising queries sit: `pad_size` slots, `groups` of 2 * `single_pad`."""

    pad_size: int
    groups: int
    single_pad: int
    counts: list[int]

    def positive_slots(self, image: int) -> torch.Tensor:
        """Slots of image `image`'s positive queries, group-major: [groups * T]."""
        t = self.counts[image]
        base = torch.arange(self.groups)[:, None] * 2 * self.single_pad
        return (base + torch.arange(t)[None]).flatten()


def denoising_groups(dn_number: int, largest: int) -> int:
    """DINO's group count (`prepare_for_cdn`): it doubles `dn_number` (a positive and a negative
    query per ground truth) and divides by twice the largest target count, so that about
    2 * dn_number denoising queries run; below 100 doubled queries the doubled number itself
    is the group count. Each group holds 2 * `largest` queries."""
    doubled = 2 * dn_number
    if largest == 0:
        return 1
    return max(1, doubled // (2 * largest) if doubled >= 100 else doubled)


def build_denoising(
    labels: list[torch.Tensor],
    boxes: list[torch.Tensor],
    label_embedding: nn.Embedding | Callable[[torch.Tensor], torch.Tensor],
    num_queries: int,
    dn_number: int = 100,
    label_noise: float = 0.5,
    box_noise: float = 1.0,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
):
    """(queries [B, P, D], reference boxes [B, P, 4] normalised cxcywh, attention mask
    [P + Q, P + Q] with True = blocked, meta), or None when `dn_number` is 0. A batch without
    targets gets one empty group (all queries zero, nothing to reconstruct).

    `labels` are column indices into the label embedding; `boxes` normalised cxcywh. The
    embedding may be any function of a [B, P] label tensor (CQ-DINO embeds slot indices with
    each image's selected category queries) given `num_classes`; a label -1 (a category that
    was not selected) gets a zero content query and keeps its box to reconstruct.
    """
    counts = [int(lab.numel()) for lab in labels]
    if dn_number <= 0:
        return None
    single_pad = max(counts, default=0)
    if single_pad == 0:
        # Nothing to denoise: one empty group still runs the label embedding and the decoder the
        # way denoising does, so every rank makes the same module calls in the same order,
        # forward and backward (ZeRO-3 gathers parameters per module call; ranks out of order hang).
        single_pad, groups = 1, 1
    else:
        groups = denoising_groups(dn_number, single_pad)
    pad = 2 * single_pad * groups
    b = len(labels)
    weight = getattr(label_embedding, "weight", None)
    device = weight.device if weight is not None else (labels[0].device if labels else "cpu")
    num_classes = num_classes if num_classes is not None else label_embedding.num_embeddings
    query_labels = torch.zeros(b, pad, dtype=torch.long, device=device)
    query_boxes = torch.zeros(b, pad, 4, device=device)
    filled = torch.zeros(b, pad, dtype=torch.bool, device=device)
    for i, (lab, box) in enumerate(zip(labels, boxes)):
        t = counts[i]
        if t == 0:
            continue
        lab = lab.to(device).repeat(2 * groups)  # group-major: [pos_0, neg_0, pos_1, neg_1, ...]
        box = box.to(device).float().repeat(2 * groups, 1)
        flip = torch.rand(lab.shape, generator=generator, device=device) < label_noise * 0.5
        lab = torch.where(
            flip, torch.randint(0, num_classes, lab.shape, generator=generator, device=device), lab
        )
        negative = (torch.arange(2 * groups, device=device) % 2 == 1).repeat_interleave(t)
        xyxy = cxcywh_to_xyxy(box)
        half = torch.cat([box[:, 2:] / 2, box[:, 2:] / 2], -1)
        sign = torch.randint(0, 2, xyxy.shape, generator=generator, device=device) * 2.0 - 1.0
        part = (
            torch.rand(xyxy.shape, generator=generator, device=device) + negative[:, None].float()
        )
        noisy = (xyxy + sign * part * half * box_noise).clamp(0.0, 1.0)
        slots = (
            torch.arange(2 * groups, device=device)[:, None] * single_pad
            + torch.arange(t, device=device)[None]
        ).flatten()
        query_labels[i, slots] = lab
        query_boxes[i, slots] = xyxy_to_cxcywh(noisy)
        filled[i, slots] = True
    filled &= query_labels >= 0
    queries = label_embedding(query_labels.clamp(min=0)) * filled[..., None]
    size = pad + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    for g in range(groups):
        lo, hi = 2 * single_pad * g, 2 * single_pad * (g + 1)
        mask[lo:hi, :lo] = True
        mask[lo:hi, hi:pad] = True
    return queries, query_boxes, mask, DenoisingMeta(pad, groups, single_pad, counts)
