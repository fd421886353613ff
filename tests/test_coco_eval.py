"""The sparse COCO box evaluator equals pycocotools' COCOeval on generated cases."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vastdet.evaluation.coco import STAT_NAMES, evaluate_boxes, stat_names


def generate(seed: int, images=12, cats=7, per_image=5, crowd_rate=0.1, dets_per_gt=3):
    rng = np.random.default_rng(seed)
    gt = {
        "images": [{"id": i + 3, "width": 400, "height": 300} for i in range(images)],
        "categories": [{"id": 10 + 2 * c, "name": f"c{c}"} for c in range(cats)],
        "annotations": [],
    }
    results = []
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, per_image + 1))):
            w, h = (
                float(v)
                for v in rng.choice([8, 20, 40, 90, 150], size=2) * rng.uniform(0.8, 1.2, size=2)
            )
            x, y = float(rng.uniform(0, 400 - w)), float(rng.uniform(0, 300 - h))
            cat = 10 + 2 * int(rng.integers(0, cats))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": img["id"],
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < crowd_rate),
                }
            )
            for _ in range(
                int(rng.integers(0, dets_per_gt + 1))
            ):  # noisy, some with the wrong class
                jitter = rng.normal(0, 0.15, size=4) * [w, h, w, h]
                det_cat = cat if rng.random() < 0.8 else 10 + 2 * int(rng.integers(0, cats))
                score = round(float(rng.uniform(0, 1)), 2)  # rounded: ties happen
                results.append(
                    {
                        "image_id": img["id"],
                        "category_id": det_cat,
                        "bbox": [
                            x + jitter[0],
                            y + jitter[1],
                            max(1.0, w + jitter[2]),
                            max(1.0, h + jitter[3]),
                        ],
                        "score": score,
                    }
                )
        for _ in range(int(rng.integers(0, 3))):  # background false positives
            results.append(
                {
                    "image_id": img["id"],
                    "category_id": 10 + 2 * int(rng.integers(0, cats)),
                    "bbox": [float(v) for v in rng.uniform(0, 200, size=4)],
                    "score": float(rng.uniform(0, 0.5)),
                }
            )
    return gt, results


def pycocotools_eval(gt, results, max_dets=(1, 10, 100)):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", range(6))
def test_equals_pycocotools(seed):
    gt, results = generate(seed)
    ours = evaluate_boxes(gt, results)
    ref = pycocotools_eval(gt, results)
    cats = sorted(c["id"] for c in gt["categories"])
    np.testing.assert_allclose(
        ours.dense_precision(cats), ref.eval["precision"], atol=1e-12, rtol=0
    )
    np.testing.assert_allclose(ours.dense_recall(cats), ref.eval["recall"], atol=1e-12, rtol=0)
    np.testing.assert_allclose([ours.stats[k] for k in STAT_NAMES], ref.stats, atol=1e-12, rtol=0)


def test_other_max_detections_and_ap_at_the_largest():
    """pycocotools' summary takes AP at maxDets=100 whatever the settings (with [1, 3, 5] it
    prints -1, as it would for V3Det's 300): ours takes AP at the largest maxDet."""
    gt, results = generate(11, dets_per_gt=6)
    ours = evaluate_boxes(gt, results, max_dets=(1, 3, 5))
    ref = pycocotools_eval(gt, results, (1, 3, 5))
    cats = sorted(c["id"] for c in gt["categories"])
    np.testing.assert_allclose(
        ours.dense_precision(cats), ref.eval["precision"], atol=1e-12, rtol=0
    )
    np.testing.assert_allclose(
        [ours.stats[k] for k in stat_names((1, 3, 5))[1:]], ref.stats[1:], atol=1e-12, rtol=0
    )
    at_largest = ref.eval["precision"][:, :, :, 0, -1]
    assert ref.stats[0] == -1 and ours.stats["AP"] == pytest.approx(
        at_largest[at_largest > -1].mean(), abs=1e-12
    )


def test_perfect_detections_give_ap_one():
    gt, _ = generate(2, crowd_rate=0.0)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
    ]
    stats = evaluate_boxes(gt, results).stats
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_images_without_predictions_or_ground_truth():
    gt, results = generate(4)
    gt["images"].append({"id": 999, "width": 10, "height": 10})  # no ground truth
    results.append({"image_id": 999, "category_id": 10, "bbox": [1, 1, 5, 5], "score": 0.99})
    emptied = {r["image_id"] for r in results[:5]}
    results = [r for r in results if r["image_id"] not in emptied]  # images without predictions
    ours = evaluate_boxes(gt, results)
    ref = pycocotools_eval(gt, results)
    np.testing.assert_allclose([ours.stats[k] for k in STAT_NAMES], ref.stats, atol=1e-12, rtol=0)


def test_results_on_unknown_images_are_refused():
    gt, results = generate(0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_boxes(
            gt,
            results + [{"image_id": 12345, "category_id": 10, "bbox": [0, 0, 1, 1], "score": 1.0}],
        )


def test_v3det_rule_ignores_finer_detections_on_a_coarser_ground_truth():
    from taxonomy import Node, Taxonomy
    from vastdet.evaluation.coco import category_descendants

    tax = Taxonomy(
        [
            Node("t", "thing"),
            Node("a", "animal", ("t",), 1),
            Node("c", "cat", ("a",), 2),
            Node("k", "kitten", ("c",), 3),
            Node("d", "dog", ("a",), 4),
        ]
    )
    descendants = category_descendants(tax)
    assert descendants == {1: {2, 3, 4}, 2: {3}}
    box = [10.0, 10.0, 50.0, 50.0]
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": c} for c in (1, 2, 3, 4)],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": box,
                "area": 2500.0,
                "iscrowd": 0,
            },  # "animal"
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "bbox": box,
                "area": 2500.0,
                "iscrowd": 0,
            },  # "cat"
        ],
    }
    results = [
        {"image_id": 1, "category_id": 2, "bbox": box, "score": 0.9},  # a cat on the animal
        {"image_id": 2, "category_id": 2, "bbox": box, "score": 0.8},  # the real cat
        {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.7},
    ]

    def cat_ap(evaluation):
        p = evaluation.precision[:, :, evaluation.category_ids.index(2), 0, -1]
        return p[p > -1].mean()

    plain = evaluate_boxes(gt, results)
    assert cat_ap(plain) == pytest.approx(
        0.5, abs=0.01
    )  # the 0.9 cat on the animal is a false positive
    ruled = evaluate_boxes(gt, results, descendants=descendants)
    assert cat_ap(ruled) == pytest.approx(1.0)  # ... an ignored one under V3Det's rule
    assert ruled.stats["AP"] == pytest.approx(1.0)
    # with no descendants the rule changes nothing
    assert evaluate_boxes(gt, results, descendants={}).stats == plain.stats


def test_base_and_novel_ap_split():
    from taxonomy import Node, Taxonomy
    from vastdet.evaluation.coco import novel_split, split_ap

    gt, results = generate(5)
    ids = sorted(c["id"] for c in gt["categories"])
    tax = Taxonomy(
        [Node(f"c{c}", f"c{c}", category_id=c, attributes={"novel": c in ids[:3]}) for c in ids]
    )
    groups = novel_split(tax)
    assert groups == {"novel": set(ids[:3]), "base": set(ids[3:])}
    evaluation = evaluate_boxes(gt, results)
    split = split_ap(evaluation, groups)
    # each subset's AP is the mean of its categories' precision entries, as pycocotools would
    # give on that subset alone (its precision array restricted to those categories)
    ref = pycocotools_eval(gt, results).eval["precision"]
    for name, subset in groups.items():
        cols = [ids.index(c) for c in subset]
        values = ref[:, :, cols, 0, -1]
        assert split[name] == pytest.approx(values[values > -1].mean(), abs=1e-12)
    assert novel_split(Taxonomy([Node("a", "a", category_id=1)])) == {}


def test_a_zero_area_detection_on_a_crowd_image_is_a_false_positive_as_in_pycocotools():
    """IoU with no overlap is 0, not 0/0: the empty detection outranks the real one and costs
    precision, as pycocotools counts it."""
    box = [10.0, 10.0, 40.0, 40.0]
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 1600.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60.0, 60, 30, 30], "area": 900.0,
             "iscrowd": 1},
        ],
    }  # fmt: skip
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [70.0, 70.0, 0.0, 5.0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.8},
    ]
    ours = evaluate_boxes(gt, results)
    ref = pycocotools_eval(gt, results)
    np.testing.assert_allclose([ours.stats[k] for k in STAT_NAMES], ref.stats, atol=1e-12, rtol=0)
    assert ours.stats["AP"] < 0.6  # the empty box is a false positive ranked first


def test_v3det_rule_with_detections_of_categories_outside_the_ground_truth():
    """A detection whose category the ground truth does not list is left out (pycocotools'
    catIds), under V3Det's rule as without it."""
    from taxonomy import Node, Taxonomy
    from vastdet.evaluation.coco import category_descendants

    tax = Taxonomy(
        [Node("a", "animal", (), 1), Node("c", "cat", ("a",), 2), Node("k", "kitten", ("c",), 3)]
    )
    box = [10.0, 10.0, 50.0, 50.0]
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1}, {"id": 2}],  # kitten (3) is not evaluated
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 2500.0, "iscrowd": 0}
        ],
    }
    results = [
        {"image_id": 1, "category_id": 3, "bbox": box, "score": 0.95},
        {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9},
    ]
    ruled = evaluate_boxes(gt, results, (1, 10, 300), category_descendants(tax))
    assert ruled.stats["AP"] == pytest.approx(1.0) and 3 not in ruled.category_ids


def test_unsorted_max_dets_are_sorted_and_recall_is_named_by_its_max_det():
    gt, results = generate(5, dets_per_gt=6)
    ours = evaluate_boxes(gt, results, max_dets=(100, 1, 10))
    ref = pycocotools_eval(gt, results, (100, 1, 10))  # pycocotools sorts them
    np.testing.assert_allclose([ours.stats[k] for k in STAT_NAMES], ref.stats, atol=1e-12, rtol=0)
    v3det = evaluate_boxes(gt, results, max_dets=(1, 10, 300))
    assert "AR300" in v3det.stats and "AR100" not in v3det.stats
    assert v3det.stats["AR300"] >= ours.stats["AR100"]


@pytest.mark.parametrize("block", [1 << 24, 500])
def test_results_files_stream_to_arrays_and_evaluate_as_the_dicts_do(tmp_path, monkeypatch, block):
    """A results file written from arrays reads back to the same arrays whatever its layout
    (one line, keys in any order, extra keys) and wherever its blocks end, and arrays score as
    the dicts do."""
    import json

    import vastdet.evaluation.results_file as results_file
    from vastdet.evaluation.coco import BoxArrays
    from vastdet.evaluation.results_file import read_results, write_results

    monkeypatch.setattr(results_file, "BLOCK", block)

    gt, results = generate(5, images=30, cats=9)
    arrays = BoxArrays.from_results(results)
    path = write_results(tmp_path / "results.json", arrays, rows=7)  # several blocks
    assert json.loads(path.read_text()) == results  # plain JSON, one detection per line
    back = read_results(path)
    for name in ("image_ids", "category_ids", "boxes", "scores"):
        np.testing.assert_array_equal(getattr(back, name), getattr(arrays, name))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"score": r["score"], "segmentation": [], **r} for r in results]))
    assert np.array_equal(read_results(other).boxes, arrays.boxes)
    nested = tmp_path / "nested.json"  # RLE masks: objects in objects, blocks end between results
    rle = {"size": [4, 4], "counts": "a1"}
    nested.write_text(json.dumps([{**r, "segmentation": rle} for r in results]))
    assert np.array_equal(read_results(nested).boxes, arrays.boxes)
    assert evaluate_boxes(gt, back).stats == evaluate_boxes(gt, results).stats
    # plain results in other key orders and spacings read as numbers, a file that mixes
    # orders (or has a NaN) as JSON: the same arrays either way
    mmdet_order = [{k: r[k] for k in ("image_id", "bbox", "score", "category_id")} for r in results]
    mixed = [dict(reversed(r.items())) if i == 17 else r for i, r in enumerate(results)]
    for layout, kwargs in [(mmdet_order, {}), (results, {"separators": (",", ":")}), (mixed, {})]:
        path = tmp_path / "layout.json"
        path.write_text(json.dumps(layout, **kwargs))
        back = read_results(path)
        for name in ("image_ids", "category_ids", "boxes", "scores"):
            np.testing.assert_array_equal(getattr(back, name), getattr(arrays, name))
    plain = results_file._parse_plain
    assert plain(json.dumps(mmdet_order)[1:-1]) is not None  # numbers, no json objects
    assert plain(json.dumps(mixed)[1:-1]) is None and plain(json.dumps(results[:3])) is None
    nan = json.dumps([{**results[0], "score": float("nan")}])
    assert plain(nan[1:-1]) is None and np.isnan(results_file._parse(nan, "x").scores[0])
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "bbox": [1, 2, 3, 4]}]')
    with pytest.raises(ValueError, match="not a COCO result"):
        read_results(tmp_path / "bad.json")
    assert len(read_results(write_results(tmp_path / "empty.json", BoxArrays.empty()))) == 0
