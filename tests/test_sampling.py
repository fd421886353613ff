"""Repeat-factor sampling (LVIS): the formula on a hand example and the stream's expectation."""

from __future__ import annotations

import math
import random

import pytest

from pipelines.sampling import category_repeat_factors, image_repeat_factor, repeat_stream


def test_repeat_factors_match_the_formula_on_a_hand_example():
    # 1000 images; rare category 1 in 1 image (f = 0.001), 2 in 100 (f = 0.1), 3 in 4 (f = 0.004)
    factors = category_repeat_factors({1: 1, 2: 100, 3: 4}, 1000, threshold=0.01)
    assert factors[1] == pytest.approx(math.sqrt(10))  # sqrt(0.01 / 0.001)
    assert factors[2] == 1.0  # sqrt(0.01 / 0.1) < 1
    assert factors[3] == pytest.approx(math.sqrt(2.5))
    # an image's factor is its rarest category's; no annotations -> 1
    assert image_repeat_factor([2, 3], factors) == pytest.approx(math.sqrt(2.5))
    assert image_repeat_factor([], factors) == 1.0


def test_stream_repeats_each_image_its_factor_in_expectation():
    factors = {1: 2.5, 2: 1.0}
    samples = [
        {"meta": {"annotations": [{"category_id": 1}]}, "k": "rare"},
        {"meta": {"annotations": [{"category_id": 2}]}, "k": "common"},
    ]
    rng = random.Random(0)
    counts = {"rare": 0, "common": 0}
    trials = 4000
    for _ in range(trials):
        for s in repeat_stream(samples, factors, rng):
            counts[s["k"]] += 1
    assert counts["common"] == trials
    assert counts["rare"] / trials == pytest.approx(2.5, abs=0.05)


def test_repeat_factors_need_images():
    with pytest.raises(ValueError):
        category_repeat_factors({1: 1}, 0, 0.001)
