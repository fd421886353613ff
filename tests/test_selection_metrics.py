"""The selector's measures beside AR^C: its per-image AUC and the frequency prior's AR^C,
on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from vastdet.evaluation.runner import selector_auc
from vastdet.evaluation.selection import per_image_auc, prior_categories, prior_recall


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
