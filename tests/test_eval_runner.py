"""Scoring gathered predictions: the ground-truth document built from the shards' annotations,
the protocols, and the inputs that must be refused."""

from __future__ import annotations

import pytest

from taxonomy import Node, Taxonomy
from vastdet.evaluation.runner import ground_truth, score

IMAGES = [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}]
ANNS = [
    {"image_id": 1, "bbox": [10, 10, 40, 40], "category_id": 7, "area": 1600.0, "iscrowd": 0},
    {"image_id": 2, "bbox": [50, 50, 30, 20], "category_id": 8, "area": 600.0, "iscrowd": 0},
]


def detection(ann: dict, score_: float = 0.9, **change) -> dict:
    return {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "bbox": ann["bbox"],
        "score": score_,
        **change,
    }


def test_perfect_detections_score_one():
    metrics = score([detection(a) for a in ANNS], IMAGES, ANNS, [7, 8, 9])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["images"] == 2 and metrics["detections"] == 2


def test_an_image_without_predictions_halves_recall_of_its_category():
    anns = ANNS + [{**ANNS[0], "image_id": 2}]  # category 7 in both images, detected in one
    metrics = score([detection(a) for a in ANNS], IMAGES, anns, [7, 8])
    assert metrics["AR100"] == pytest.approx((0.5 + 1.0) / 2)


def test_a_false_positive_on_an_image_without_ground_truth_ranks_below_the_true_one():
    images = IMAGES + [{"id": 3, "height": 50, "width": 50}]
    results = [detection(a) for a in ANNS] + [detection({**ANNS[0], "image_id": 3}, 0.1)]
    metrics = score(results, images, ANNS, [7, 8])
    assert metrics["AP"] == pytest.approx(1.0)  # lower-scored: precision at full recall stays 1
    results[-1]["score"] = 0.95  # now ahead of the true positive: precision 1/2 for category 7
    assert score(results, images, ANNS, [7, 8])["AP"] == pytest.approx((0.5 + 1.0) / 2)


def test_annotation_ids_start_at_one_and_area_defaults_to_box_area():
    gt = ground_truth(IMAGES, [{k: v for k, v in ANNS[1].items() if k != "area"}], [8])
    assert gt["annotations"][0]["id"] == 1 and gt["annotations"][0]["area"] == 600.0


def test_v3det_protocol_ignores_a_ground_truth_copy_for_a_detected_descendant():
    tax = Taxonomy([Node("a", "animal", category_id=7), Node("d", "dog", ("a",), 9)])
    dog_gt = {**ANNS[1], "category_id": 9}  # a real dog in image 2
    anns = [ANNS[0], dog_gt]  # and an "animal" in image 1
    finer = detection(ANNS[0], 0.95, category_id=9)  # "dog" on image 1's animal, scored first
    results = [detection(ANNS[0]), detection(dog_gt, 0.5), finer]
    coco = score(results, IMAGES, anns, [7, 9])
    v3det = score(results, IMAGES, anns, [7, 9], protocol="v3det", taxonomy=tax)
    # COCO: the finer detection is a false positive ahead of the true dog, dog AP 1/2
    assert coco["AP"] == pytest.approx((1.0 + 0.5) / 2)
    # V3Det: it matches the animal's ignored "dog" copy and does not count
    assert v3det["AP"] == pytest.approx(1.0)


def test_refused_inputs_name_the_problem():
    with pytest.raises(ValueError, match="evaluated twice"):
        ground_truth(IMAGES + IMAGES[:1], ANNS, [7, 8])
    with pytest.raises(ValueError, match=r"\[8\] are not in the model's vocabulary"):
        ground_truth(IMAGES, ANNS, [7])
    with pytest.raises(ValueError, match="needs the category hierarchy"):
        score([], IMAGES, ANNS, [7, 8], protocol="v3det")
    with pytest.raises(ValueError, match="not in the ground truth"):
        score([detection({**ANNS[0], "image_id": 99})], IMAGES, ANNS, [7, 8])


def test_ap_by_hierarchy_level_maps_both_sides_to_their_ancestor():
    """A dog detected on a kitten is wrong at the leaves and at depth 1 (cat vs dog), right at
    depth 0 (both animals)."""
    from taxonomy import Node, Taxonomy
    from vastdet.evaluation.slices import level_map

    tax = Taxonomy(
        [
            Node("root", "thing"),
            Node("a", "animal", ("root",), 1),
            Node("c", "cat", ("a",), 2),
            Node("k", "kitten", ("c",), 3),
            Node("d", "dog", ("a",), 4),
            Node("v", "vehicle", ("root",), 5),
            Node("car", "car", ("v",), 6),
        ]
    )
    assert level_map(tax, 0) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 5, 6: 5}
    assert level_map(tax, 1) == {1: 1, 2: 2, 3: 2, 4: 4, 5: 5, 6: 6}
    images = [{"id": 1, "height": 100, "width": 100}]
    anns = [{"image_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "category_id": 3}]
    results = [{"image_id": 1, "category_id": 4, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9}]
    metrics = score(results, images, anns, [1, 2, 3, 4, 5, 6], taxonomy=tax, levels=[0, 1, 2])
    assert metrics["AP"] == 0.0 and metrics["AP_level2"] == 0.0 and metrics["AP_level1"] == 0.0
    assert metrics["AP_level0"] == pytest.approx(1.0) and metrics["AP50_level0"] == pytest.approx(
        1.0
    )


def test_a_category_with_two_parents_takes_its_primary_ancestor(vehicles):
    from vastdet.evaluation.slices import level_map

    assert level_map(vehicles, 1)[5] == 2  # amphibious car: car before boat
    assert level_map(vehicles, 0) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 7, 8: 7}


def test_ap_by_frequency_bins_categories_by_training_images():
    from vastdet.evaluation.slices import frequency_groups

    counts = {2: 5, 3: 50, 4: 500, 7: 0}
    assert frequency_groups(counts) == {"r": {2}, "c": {3}, "f": {4}}
    images = [{"id": 1, "height": 100, "width": 100}]
    anns = [
        {"image_id": 1, "bbox": [10.0, 10.0, 30.0, 30.0], "category_id": 2},
        {"image_id": 1, "bbox": [50.0, 50.0, 30.0, 30.0], "category_id": 3},
    ]
    results = [{"image_id": 1, "category_id": 2, "bbox": [10.0, 10.0, 30.0, 30.0], "score": 0.8}]
    metrics = score(results, images, anns, [2, 3, 4, 7], category_images=counts)
    assert metrics["APr"] == pytest.approx(1.0) and metrics["APc"] == 0.0
    assert metrics["APf"] == -1.0  # no frequent category has a ground truth here
