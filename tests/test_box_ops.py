"""Box overlaps against torchvision.ops."""

from __future__ import annotations

import torch
import torchvision

from vastdet.models.box_ops import box_iou, elementwise_generalized_box_iou, generalized_box_iou


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 0.5
    return torch.cat([xy, xy + wh], dim=1).double()


def test_iou_and_giou_match_torchvision():
    a, b = random_boxes(17, 0), random_boxes(9, 1)
    torch.testing.assert_close(box_iou(a, b)[0], torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


def test_elementwise_giou_is_the_diagonal():
    a, b = random_boxes(11, 2), random_boxes(11, 3)
    torch.testing.assert_close(
        elementwise_generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b).diag()
    )


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert generalized_box_iou(a, a).item() == 1.0
    # disjoint unit boxes 1 apart: IoU 0, hull 3x1 = 3, union 2 -> -1/3
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    c = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(b, c), torch.tensor([[-1.0 / 3.0]]))
