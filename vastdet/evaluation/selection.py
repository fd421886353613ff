"""How well CQ-DINO's selector reads an image, and what a selector that does not would score.

- `per_image_auc`: each image's ROC AUC of the selection logits, its ground-truth categories
  against every other category: the chance that a present category outscores an absent one
  (0.5 for a selector that ignores the image, or that ranks every image the same way).
- `prior_recall`: AR^C of the frequency prior, the C' categories with the most training images
  selected for every image. A selector whose AR^C does not clearly beat it has learned the
  long tail's head, not the image.
- `prior_auc`: the per-image AUC of that prior (every image ranks the categories by their
  training images). On a long tail it is far above 0.5: present categories are mostly
  frequent ones, so a selector's AUC reads the image only where it beats this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch


def per_image_auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Each image's ROC AUC of `scores` [B, C] for `positive` [B, C] (bool) against the rest,
    ties counting one half; NaN for an image with no positive or no negative. [B], float64."""
    out = torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    for b in range(scores.shape[0]):
        pos, neg = scores[b][positive[b]].float(), scores[b][~positive[b]].float()
        if len(pos) and len(neg):
            neg = neg.sort().values
            below = torch.searchsorted(neg, pos, right=False).double()
            ties = torch.searchsorted(neg, pos, right=True).double() - below
            out[b] = ((below + ties / 2).sum() / (len(pos) * len(neg))).item()
    return out


def prior_categories(category_images: Mapping[int, int], k: int) -> set[int]:
    """The `k` categories with the most training images (ties: the smaller id first)."""
    ranked = sorted(category_images.items(), key=lambda item: (-int(item[1]), int(item[0])))
    return {int(c) for c, n in ranked[:k] if n > 0}


def prior_recall(
    present_per_image: Iterable[Iterable[int]], category_images: Mapping[int, int], k: int
) -> float:
    """AR^C of selecting the `k` most frequent training categories for every image: the share
    of (image, ground-truth category) pairs whose category is among them (NaN without pairs)."""
    prior = prior_categories(category_images, k)
    kept = total = 0
    for present in present_per_image:
        present = set(present)
        kept += len(present & prior)
        total += len(present)
    return kept / total if total else float("nan")


def prior_auc(
    present_per_image: Iterable[Iterable[int]],
    category_images: Mapping[int, int],
    category_ids: Sequence[int],
) -> float:
    """The mean over images of `per_image_auc` for scores that are the training image counts
    of `category_ids` (0 for a category without any): what `selector_AUC` would be for a
    selector that ranks every image the same way, by frequency. Images without a present
    category, or with every category present, are left out (NaN when none is left)."""
    ids = np.asarray(category_ids, dtype=np.int64)
    counts = np.array([category_images.get(int(c), 0) for c in ids], dtype=np.int64)
    ranked = np.sort(counts)
    column = {int(c): i for i, c in enumerate(ids)}
    total = images = 0.0
    for present in present_per_image:
        rows = sorted({column[c] for c in present if c in column})
        n_pos, n_neg = len(rows), len(ids) - len(rows)
        if not n_pos or not n_neg:
            continue
        pos = np.sort(counts[rows])
        below = np.searchsorted(ranked, pos, "left") - np.searchsorted(pos, pos, "left")
        ties = (np.searchsorted(ranked, pos, "right") - np.searchsorted(ranked, pos, "left")) - (
            np.searchsorted(pos, pos, "right") - np.searchsorted(pos, pos, "left")
        )  # negatives only: the positives' own counts taken out of both
        total += float((below + ties / 2).sum()) / (n_pos * n_neg)
        images += 1
    return total / images if images else float("nan")
