"""The LVIS protocol (`--protocol lvis`) equals the `lvis` package's LVISEval on seeded cases:
federated filtering (a category neither annotated nor verified absent in an image is not
scored there), not-exhaustive categories (an unmatched detection is ignored), 300 detections
per image over all categories, and r/c/f from the categories' `frequency` field."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from test_coco_eval import generate

from vastdet.evaluation.coco import (
    BoxArrays,
    Federated,
    evaluate_boxes,
    limit_per_image,
    split_ap,
)


@pytest.fixture
def lvis_api(monkeypatch):
    """LVIS's own evaluator. Its package `__init__` also imports its drawing code (OpenCV),
    which evaluation never uses and which is not installed, so the package is entered without
    it; `np.float`, removed in NumPy 1.24, is what its accumulate step still calls."""
    spec = importlib.util.find_spec("lvis")
    package = types.ModuleType("lvis")
    package.__path__ = list(spec.submodule_search_locations)
    for name in [m for m in sys.modules if m == "lvis" or m.startswith("lvis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lvis", package)
    monkeypatch.setattr(np, "float", float, raising=False)
    from lvis.eval import LVISEval
    from lvis.lvis import LVIS

    return LVIS, LVISEval


def lvis_case(seed: int, images=14, cats=9):
    """`generate`'s boxes without crowds, made federated: each image lists some categories it
    does not annotate as absent, some annotated ones as not exhaustive, and carries detections
    of categories it says nothing about; one image carries 340 detections."""
    rng = np.random.default_rng(seed)
    gt, results = generate(seed, images=images, cats=cats, crowd_rate=0.0, dets_per_gt=4)
    cat_ids = [c["id"] for c in gt["categories"]]
    for k, cat in enumerate(gt["categories"]):
        cat["frequency"] = "rcf"[k % 3]
    for img in gt["images"]:
        present = sorted(
            {a["category_id"] for a in gt["annotations"] if a["image_id"] == img["id"]}
        )
        absent = [c for c in cat_ids if c not in present]
        img["neg_category_ids"] = sorted(
            rng.choice(absent, size=min(len(absent), 3), replace=False).tolist()
        )
        img["not_exhaustive_category_ids"] = [c for c in present if rng.random() < 0.4]
        for _ in range(4):  # detections of categories this image says nothing about
            results.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [float(v) for v in rng.uniform(0, 150, size=4) + [0, 0, 5, 5]],
                    "score": float(rng.uniform(0, 1)),
                }
            )
    crowded = gt["images"][0]["id"]
    for _ in range(340):  # beyond 300: the lowest-scoring ones must go, over all categories
        results.append(
            {
                "image_id": crowded,
                "category_id": int(rng.choice(cat_ids)),
                "bbox": [float(v) for v in rng.uniform(0, 200, size=4) + [0, 0, 4, 4]],
                "score": float(rng.uniform(0, 1)),
            }
        )
    for a in gt["annotations"]:
        a.pop("iscrowd")
    return gt, results


def ours(gt, results):
    federated = Federated.from_images(gt["images"])
    dets = limit_per_image(BoxArrays.from_results(results), 300)
    evaluation = evaluate_boxes(gt, dets, (300,), federated=federated)
    groups = {
        f: {c["id"] for c in gt["categories"] if c["frequency"] == f} for f in ("r", "c", "f")
    }
    return {
        **evaluation.stats,
        **{f"AP{k}": v for k, v in split_ap(evaluation, groups).items()},
    }


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_lvis_eval(seed, tmp_path, lvis_api):
    LVIS, LVISEval = lvis_api
    gt, results = lvis_case(seed)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    reference = LVISEval(LVIS(str(path)), [dict(r) for r in results], iou_type="bbox")
    reference.run()
    expected = dict(reference.get_results())
    got = ours(gt, results)
    names = {"AR@300": "AR300", "ARs@300": "ARs", "ARm@300": "ARm", "ARl@300": "ARl"}
    compared = 0
    for key, value in expected.items():
        assert got[names.get(key, key)] == pytest.approx(float(value), abs=1e-12), key
        compared += 1
    assert compared == 13
    assert got["AP"] > 0.05  # the case is not degenerate


def test_federated_rules_by_hand():
    """Image 1 annotates category 1 (not exhaustively) and lists 2 as verified absent; image 2
    annotates 2; image 3 annotates 1 and says nothing about 2. A stray detection of 1 in image
    1 is ignored, a detection of 2 in image 1 is a false positive, one of 2 in image 3 is not
    scored. Category 1: AP 1; category 2: a false positive above its hit, AP 0.5."""
    box = [10.0, 10.0, 40.0, 40.0]
    gt = {
        "images": [
            {"id": 1, "neg_category_ids": [2], "not_exhaustive_category_ids": [1]},
            {"id": 2, "neg_category_ids": [], "not_exhaustive_category_ids": []},
            {"id": 3, "neg_category_ids": [], "not_exhaustive_category_ids": []},
        ],
        "categories": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": 1600.0}
            for k, (i, c) in enumerate([(1, 1), (2, 2), (3, 1)])
        ],
    }
    elsewhere = [60.0, 60.0, 20.0, 20.0]
    dets = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in [
            (1, 1, box, 0.5), (1, 1, elsewhere, 0.9), (3, 1, box, 0.5),
            (2, 2, box, 0.5), (1, 2, elsewhere, 0.9), (3, 2, elsewhere, 0.95),
        ]
    ]  # fmt: skip
    federated = Federated.from_images(gt["images"])
    assert evaluate_boxes(gt, dets, (300,), federated=federated).stats["AP"] == pytest.approx(0.75)
    # as COCO scores it, both strays count: category 1 AP 2/3, category 2 AP 1/3
    assert evaluate_boxes(gt, dets, (300,)).stats["AP"] == pytest.approx(0.5)


def test_limit_per_image_keeps_the_best_over_all_categories():
    dets = BoxArrays.from_results(
        [
            {"image_id": i, "category_id": c, "bbox": [0, 0, 1, 1], "score": s}
            for i, c, s in [(1, 1, 0.1), (1, 2, 0.9), (2, 1, 0.5), (1, 3, 0.5), (1, 1, 0.5)]
        ]
    )
    kept = limit_per_image(dets, 2)
    # image 1 keeps 0.9 and the first of its two 0.5s; image 2 keeps its one; order as given
    assert kept.scores.tolist() == [0.9, 0.5, 0.5]
    assert kept.category_ids.tolist() == [2, 1, 3]


def test_score_under_the_lvis_protocol(lvis_api, tmp_path):
    """`vastdet eval --protocol lvis` scores through `score`: the images' federated lists,
    300 per image, r/c/f from the category file's `frequency` (not training counts); shards
    without the lists are refused rather than scored as if every category were exhaustive."""
    from taxonomy.formats.coco import from_coco
    from vastdet.evaluation.runner import score

    LVIS, LVISEval = lvis_api
    gt, results = lvis_case(5)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    reference = LVISEval(LVIS(str(path)), [dict(r) for r in results], iou_type="bbox")
    reference.run()
    expected = reference.get_results()
    cats = [c["id"] for c in gt["categories"]]
    counts = {c: 500 for c in cats}  # training counts would put every category in "f"
    anns = [{k: v for k, v in a.items() if k != "id"} for a in gt["annotations"]]
    got = score(results, gt["images"], anns, cats, "lvis", from_coco(gt), category_images=counts)
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert got[key] == pytest.approx(float(expected[key]), abs=1e-12), key
    assert got["AR300"] == pytest.approx(float(expected["AR@300"]), abs=1e-12)
    plain = [{k: v for k, v in i.items() if "category_ids" not in k} for i in gt["images"]]
    with pytest.raises(ValueError, match="neg_category_ids"):
        score(results, plain, anns, cats, "lvis")
