"""Box format conversions shared by the data pipeline and the detectors.

Formats: `xywh` (COCO: top-left corner, width, height), `xyxy` (corners), `cxcywh` (centre,
size). The conversions take and return tensors or numpy arrays `[..., 4]` (the loader converts
one image's few boxes in numpy, where a small torch op costs more than the arithmetic). Each
works on the two coordinate pairs at once: three array operations instead of one per coordinate,
with the same arithmetic for every element, so numpy and torch agree bitwise.
"""

from __future__ import annotations

import numpy as np
import torch

Boxes = torch.Tensor | np.ndarray


def _cat(parts: list[Boxes], like: Boxes) -> Boxes:
    if isinstance(like, np.ndarray):
        return np.concatenate(parts, axis=-1)
    return torch.cat(parts, dim=-1)


def xywh_to_xyxy(boxes: Boxes) -> Boxes:
    corner, size = boxes[..., :2], boxes[..., 2:]
    return _cat([corner, corner + size], boxes)


def xyxy_to_xywh(boxes: Boxes) -> Boxes:
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return _cat([lo, hi - lo], boxes)


def xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return _cat([(lo + hi) / 2, hi - lo], boxes)


def cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    centre, size = boxes[..., :2], boxes[..., 2:]
    return _cat([centre - size / 2, centre + size / 2], boxes)


def box_area_xyxy(boxes: Boxes) -> Boxes:
    """Area of xyxy boxes; boxes with a negative side have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clip(min=0) * (boxes[..., 3] - boxes[..., 1]).clip(min=0)
