"""Box format conversions shared by the data pipeline and the detectors.

Formats: `xywh` (COCO: top-left corner, width, height), `xyxy` (corners), `cxcywh` (centre,
size). The conversions take and return tensors or numpy arrays `[..., 4]` (the loader converts
one image's few boxes in numpy, where a small torch op costs more than the arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch

Boxes = torch.Tensor | np.ndarray


def _parts(boxes: Boxes):
    if isinstance(boxes, np.ndarray):
        return tuple(boxes[..., i] for i in range(4))
    return boxes.unbind(-1)


def _stack(parts, like: Boxes) -> Boxes:
    if isinstance(like, np.ndarray):
        return np.stack(parts, axis=-1)
    return torch.stack(parts, dim=-1)


def xywh_to_xyxy(boxes: Boxes) -> Boxes:
    x, y, w, h = _parts(boxes)
    return _stack([x, y, x + w, y + h], boxes)


def xyxy_to_xywh(boxes: Boxes) -> Boxes:
    x0, y0, x1, y1 = _parts(boxes)
    return _stack([x0, y0, x1 - x0, y1 - y0], boxes)


def xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    x0, y0, x1, y1 = _parts(boxes)
    return _stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], boxes)


def cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    cx, cy, w, h = _parts(boxes)
    return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], boxes)


def box_area_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )
