"""The Hungarian matcher: batched equals per image, equals brute force, handles empty targets."""

from __future__ import annotations

import itertools

import pytest
import torch

from vastdet.models.matcher import HungarianMatcher, focal_class_cost


def make(b=3, q=6, k=11, counts=(2, 0, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(b, q, k, generator=g),
        "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.2,
    }
    targets = [
        {
            "labels": torch.randint(0, k, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2,
        }
        for n in counts
    ]
    return outputs, targets


def test_class_cost_is_computed_at_target_columns_only():
    outputs, targets = make()
    matcher = HungarianMatcher()
    t = targets[2]
    full = focal_class_cost(outputs["pred_logits"][2])  # the all-classes matrix public code builds
    cost = matcher.cost_matrix(
        outputs["pred_logits"][2], outputs["pred_boxes"][2], t["labels"], t["boxes"]
    )
    no_class = HungarianMatcher(cost_class=0.0).cost_matrix(
        outputs["pred_logits"][2], outputs["pred_boxes"][2], t["labels"], t["boxes"]
    )
    torch.testing.assert_close(cost - no_class, 2.0 * full[:, t["labels"]])


def test_batched_equals_per_image():
    outputs, targets = make()
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b in range(3):
        single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_on_small_cases(seed):
    outputs, targets = make(b=1, q=5, k=4, counts=(3,), seed=seed)
    matcher = HungarianMatcher()
    rows, cols = matcher(outputs, targets)[0]
    t = targets[0]
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], t["labels"], t["boxes"]
    )
    best = min(
        sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(5), 3)
    )
    assert torch.isclose(cost[rows, cols].sum(), best)
    assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]


def test_image_without_targets_matches_nothing():
    outputs, targets = make(counts=(0, 0, 0))
    for rows, cols in HungarianMatcher()(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0


def test_perfect_prediction_is_matched_to_its_target():
    outputs, targets = make(b=1, q=4, k=5, counts=(2,), seed=3)
    t = targets[0]
    outputs["pred_boxes"][0, 3] = t["boxes"][0]
    outputs["pred_boxes"][0, 1] = t["boxes"][1]
    outputs["pred_logits"][0, 3, t["labels"][0]] = 8.0
    outputs["pred_logits"][0, 1, t["labels"][1]] = 8.0
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}
