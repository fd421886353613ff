"""PaQ-DETR: pattern queries (eq. 4-5, 8), quality-aware one-to-many assignment (eq. 6-7) with
varifocal loss, on DINO and on CQ-DINO; query-utilisation Gini."""

from __future__ import annotations

import math

import pytest
import torch

from taxonomy import Node, Taxonomy
from vastdet.config import load_config
from vastdet.evaluation.runner import gini
from vastdet.models.box_ops import box_iou, cxcywh_to_xyxy
from vastdet.models.build import ModelConfig, build_model
from vastdet.models.criterion import OneToMany
from vastdet.models.losses import varifocal_loss
from vastdet.models.patterns import WeightGenerator, pattern_diversity
from vastdet.models.quality_assignment import assign_one_to_many, quality_scores

CATEGORIES = [2, 3, 5, 8, 13]
ONE = {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}
TWO = {"labels": torch.tensor([3, 8]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])}  # fmt: skip
NONE = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def tiny(preset: str = "paq_dino_tiny", **overrides):
    cfg = load_config(preset, ModelConfig)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    if cfg.architecture == "dino":
        return build_model(cfg, CATEGORIES)
    tax = Taxonomy(
        [Node("r", "root", category_id=2)]
        + [Node(f"c{c}", f"c{c}", ("r",), c) for c in CATEGORIES[1:]]
    )
    return build_model(cfg, CATEGORIES, tax)


def images(n: int = 2, padded: bool = True):
    torch.manual_seed(1)
    x = torch.randint(0, 255, (n, 3, 64, 96), dtype=torch.uint8)
    masks = torch.zeros(n, 64, 96, dtype=torch.bool)
    if padded:
        masks[-1, :, 60:] = True
        masks[-1, 40:] = True
    return x, masks


# --- pattern queries -------------------------------------------------------------------------


def test_pattern_weights_are_convex_rows_on_padded_batches():
    model, _, _ = tiny()
    model.eval()
    x, masks = images()
    with torch.no_grad():
        out = model(x, masks)
    w = out["pattern_weights"]
    assert w.shape == (2, 30, 5) and out["patterns"].shape == (5, 32)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(2, 30), atol=1e-6)


def test_weight_generator_ignores_what_lies_on_padding():
    """An image's W^D is the same alone and in a batch that pads it, whatever the padding
    holds (masked convolutions, fusion, attention gates and pooling)."""
    torch.manual_seed(0)
    gen = WeightGenerator(16, 4, num_queries=6, num_patterns=3, hidden=8).eval()
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    alone = [torch.randn(1, 16, h, w) for h, w in sizes]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in sizes]
    padded, padded_masks = [], []
    for x, (h, w) in zip(alone, sizes):
        big = torch.randn(1, 16, 2 * h, 2 * w) * 10  # garbage on the padding
        big[..., :h, :w] = x
        m = torch.ones(1, 2 * h, 2 * w, dtype=torch.bool)
        m[:, :h, :w] = False
        padded.append(big)
        padded_masks.append(m)
    with torch.no_grad():
        a = gen(alone, masks)
        b = gen(padded, padded_masks)
    assert torch.allclose(a, b, atol=1e-5)


def test_every_pattern_gets_a_gradient():
    model, criterion, _ = tiny()
    model.train()
    x, masks = images()
    losses = criterion(model(x, masks, [ONE, NONE]), [ONE, NONE])
    criterion.weighted_sum(losses).backward()
    grad = model.transformer.content_queries.patterns.weight.grad
    assert grad is not None and (grad.abs().sum(1) > 0).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pattern_diversity_is_zero_for_orthogonal_and_one_for_identical_patterns():
    assert pattern_diversity(torch.eye(4) * 3) == pytest.approx(0.0)
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1)
    assert pattern_diversity(same) == pytest.approx(1.0)
    opposite = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    assert pattern_diversity(opposite) == pytest.approx(1.0)  # |cos|


# --- quality-aware one-to-many -----------------------------------------------------------


def test_eq_6_and_7_on_a_hand_worked_example():
    """s = IoU - 0.4 c; k_j = max(ceil(sum of the top-4 s), 1); a tie goes to the lower
    prediction index; a prediction wanted by two ground truths goes where its s is higher."""
    s = torch.tensor(
        [  # gt0   gt1
            [0.90, 0.10],  # p0
            [0.50, 0.60],  # p1: wanted by both; 0.60 > 0.50 -> gt1
            [0.30, 0.40],  # p2
            [0.30, -0.2],  # p3: ties p2 on gt0
            [0.05, 0.35],  # p4
            [-0.1, 0.00],  # p5
        ]
    )
    pred, gt, k = assign_one_to_many(s, topk=4, min_positives=1)
    # gt0: top-4 s 0.9 + 0.5 + 0.3 + 0.3 = 2.0 -> k = 2: p0, p1
    # gt1: top-4 s 0.6 + 0.4 + 0.35 + 0.1 = 1.45 -> k = 2: p1, p2
    assert k.tolist() == [2, 2]
    assert dict(zip(pred.tolist(), gt.tolist())) == {0: 0, 1: 1, 2: 1}
    # a tie inside a ground truth's ranking: the lower prediction index is taken
    tie = torch.tensor([[0.3], [0.5], [0.5], [0.3]])  # k = ceil(1.6) = 2: p1 and p2
    assert assign_one_to_many(tie)[0].tolist() == [1, 2]
    equal = torch.tensor([[0.5], [0.4], [0.4], [0.4]])  # sum 1.7 -> 2: p0, then p1 of the tie
    assert assign_one_to_many(equal)[0].tolist() == [0, 1]
    # low quality everywhere: at least l = 1
    assert assign_one_to_many(torch.full((5, 1), -0.3))[2].tolist() == [1]


def test_quality_scores_use_the_probability_of_the_ground_truths_own_class():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])
    gts = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    labels = torch.tensor([1, -1])  # the second ground truth has no column (unselected)
    s, iou = quality_scores(logits, boxes, labels, gts, gamma=0.4)
    expected_iou = box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gts))[0]
    assert torch.allclose(iou, expected_iou)
    assert s[0, 0].item() == pytest.approx(1.0 - 0.4 * torch.sigmoid(torch.tensor(-1.0)).item())
    assert torch.allclose(s[:, 1], iou[:, 1])  # no column: c = 0


def test_final_layer_keeps_hungarian_matching_and_intermediate_layers_get_one_to_many():
    model, with_o2m, _ = tiny()
    _, without, _ = tiny(one_to_many=False)
    model.train()
    x, masks = images()
    torch.manual_seed(5)
    out = model(x, masks, [TWO, ONE])
    a, b = with_o2m(out, [TWO, ONE]), without(out, [TWO, ONE])
    for key, value in b.items():  # every one-to-one term is unchanged
        assert torch.equal(a[key], value), key
    extra = sorted(set(a) - set(b))
    layers = len(model.transformer.decoder)
    assert extra == sorted(
        f"loss_{k}_o2m_{i}" for k in ("ce", "bbox", "giou") for i in range(layers - 1)
    )


def test_one_to_many_classification_is_varifocal_without_a_one_hot_tensor():
    """The criterion's sparse form equals the dense varifocal loss over [B, Q, K] with each
    positive's IoU as its target."""
    _, criterion, _ = tiny()
    torch.manual_seed(2)
    logits = torch.randn(2, 30, 5)
    boxes = torch.rand(2, 30, 4) * 0.4 + 0.3
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.2, 0.3]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]  # fmt: skip
    out = {"pred_logits": logits, "pred_boxes": boxes}
    losses = criterion.one_to_many_losses(out, targets, "_x")
    o2m = criterion.one_to_many
    s, iou = quality_scores(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
    pred, gt, _ = assign_one_to_many(s, o2m.topk, o2m.min_positives)
    dense = torch.zeros(2, 30, 5)
    dense[0, pred, targets[0]["labels"][gt]] = iou[pred, gt]
    expected = varifocal_loss(logits, dense, o2m.vfl_alpha, o2m.vfl_gamma).sum() / len(pred)
    assert losses["loss_ce_x"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_bbox_x"] > 0


def test_paq_cq_dino_trains_with_slots_and_unselected_ground_truths():
    model, criterion, _ = tiny("paq_cq_dino_tiny", num_selected=2)
    model.train()
    x, masks = images()
    out = model(x, masks, [TWO, NONE])
    losses = criterion(out, [TWO, NONE])
    assert out["pred_logits"].shape[-1] == 2 and "loss_ce_o2m_0" in losses
    criterion.weighted_sum(losses).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- query utilisation ----------------------------------------------------------------------


def test_gini_is_zero_for_uniform_use_and_n_minus_one_over_n_for_a_single_winner():
    assert gini([3, 3, 3, 3]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 0, 12]) == pytest.approx(4 / 5)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    assert gini([1, 2, 3]) == pytest.approx(2 * (1 * 1 + 2 * 2 + 3 * 3) / (3 * 6) - 4 / 3)


def test_query_use_counts_match_one_to_one_assignments_per_ground_truth():
    from pipelines.loader import Batch
    from vastdet.evaluation.runner import predict_pass

    model, criterion, post = tiny()
    model.eval()
    x, masks = images()
    targets = [
        {**TWO, "orig_size": torch.tensor([64, 96]), "image_id": 1, "annotations": []},
        {**ONE, "orig_size": torch.tensor([64, 96]), "image_id": 2, "annotations": []},
    ]
    record = predict_pass(model, [Batch(x, masks, targets)], post, matcher=criterion.matcher)
    assert len(record.query_uses) == 30 and sum(record.query_uses) == 3
    assert 0 < gini(record.query_uses) <= 29 / 30
    assert not math.isnan(gini(record.query_uses))


def test_one_to_many_settings_default_to_the_papers():
    o2m = OneToMany()
    assert (o2m.topk, o2m.min_positives, o2m.gamma) == (4, 1, 0.4)
    full = load_config("paq_dino_r50_4scale", ModelConfig)
    assert (full.num_queries, full.patterns, full.diversity_weight) == (900, 150, 0.2)


def test_successful_detections_give_their_querys_weights():
    from vastdet.evaluation.pattern_maps import principal_map, successful_rows

    weights = torch.arange(12, dtype=torch.float32).view(4, 3)  # 4 queries, 3 patterns
    image = {
        "weights": weights,
        "detections": {
            "scores": torch.tensor([0.9, 0.8, 0.3, 0.9]),
            "labels": torch.tensor([3, 3, 3, 5]),
            "boxes": torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 10.0]]),
            "queries": torch.tensor([2, 0, 1, 3]),
        },
        "gt_boxes": torch.tensor([[0, 0, 10, 9.0]]),
        "gt_labels": torch.tensor([3]),
    }  # fmt: skip
    rows = successful_rows([image], category=3, iou=0.7, score=0.5)
    assert rows.tolist() == [weights[2].tolist()]  # hit, confident, right class: query 2 only
    other = {**image, "weights": weights.flip(0)}
    assert principal_map([image, other, {**image, "weights": weights * 2}]).shape == (3, 2)
