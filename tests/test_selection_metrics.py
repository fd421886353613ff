"""The selector's measures beside AR^C: its per-image AUC and the frequency prior's AR^C,
on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from vastdet.evaluation.runner import selector_auc
from vastdet.evaluation.selection import (
    per_image_auc,
    prior_auc,
    prior_categories,
    prior_recall,
)


def test_per_image_auc_counts_ordered_pairs_and_half_ties():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # positives 0, 2 above both negatives: 1
            [0.2, 0.8, 0.5, 0.5],  # positive 0 below 3 of 3 negatives: 0
            [0.5, 0.5, 0.1, 0.7],  # positive 0: tie with 1 (1/2), above 2, below 3 -> 1.5 / 3
            [0.1, 0.2, 0.3, 0.4],  # no positive: NaN
        ]
    )
    positive = torch.tensor(
        [[1, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    auc = per_image_auc(scores, positive)
    assert auc[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(auc[3])


def test_a_constant_selector_scores_one_half():
    auc = per_image_auc(torch.zeros(2, 5), torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]]) > 0)
    assert auc.tolist() == [0.5, 0.5]


def test_frequency_prior_recall_on_a_hand_worked_case():
    # training images per category: 3 and 5 are the two most frequent; 4 ties 2 but has the
    # larger id, so the prior of size 3 is {5, 3, 2}
    counts = {1: 1, 2: 4, 3: 9, 4: 4, 5: 20}
    assert prior_categories(counts, 3) == {5, 3, 2}
    images = [{5, 1}, {4}, {3, 2, 5}]  # 6 (image, category) pairs, 4 of them in the prior
    assert prior_recall(images, counts, 3) == pytest.approx(4 / 6)
    assert prior_recall(images, counts, 10) == pytest.approx(1.0)  # every category kept
    assert prior_recall(images, {**counts, 1: 0}, 10) == pytest.approx(5 / 6)  # never seen
    assert math.isnan(prior_recall([], counts, 3))


def test_frequency_prior_auc_on_a_hand_worked_case_and_against_per_image_auc():
    counts = {1: 1, 2: 4, 3: 9, 4: 4, 5: 20}  # category 6 has no training image
    ids = [1, 2, 3, 4, 5, 6]
    # {2}: negatives 6 (0) and 1 (1) below, 4 tied, 3 and 5 above -> (2 + 1/2) / 5
    # {5, 6}: 5 above all 4 negatives (4/4), 6 below none (0/4) -> 4 / 8
    assert prior_auc([{2}], counts, ids) == pytest.approx(2.5 / 5)
    assert prior_auc([{5, 6}], counts, ids) == pytest.approx(0.5)
    assert prior_auc([{2}, {5, 6}, set(), set(ids)], counts, ids) == pytest.approx(0.5)
    assert math.isnan(prior_auc([set()], counts, ids))
    # the same as per_image_auc of the counts as every image's scores, ties and all
    gen = torch.Generator().manual_seed(0)
    ids = list(range(100, 160))
    counts = {c: int(torch.randint(0, 6, (1,), generator=gen)) for c in ids}
    positive = torch.rand(40, len(ids), generator=gen) < 0.1
    scores = torch.tensor([float(counts[c]) for c in ids]).expand(40, -1)
    reference = per_image_auc(scores, positive)
    present = [{ids[j] for j in row.nonzero().flatten().tolist()} for row in positive]
    expected = float(reference[~reference.isnan()].mean())
    assert prior_auc(present, counts, ids) == pytest.approx(expected, abs=1e-12)


def test_selector_auc_reads_each_images_ground_truth_categories():
    outputs = {
        "selection_logits": torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]]),
        "all_category_ids": torch.tensor([10, 20, 30]),
    }
    targets = [
        {"annotations": [{"category_id": 30}, {"category_id": 30}]},  # above 20, below 10
        {"annotations": []},
    ]
    auc = selector_auc(outputs, targets)
    assert auc[0].item() == pytest.approx(0.5) and math.isnan(auc[1])
