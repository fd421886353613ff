"""COCO box evaluation at V3Det's vocabulary: pycocotools' COCOeval against ours.

    python benchmarks/bench_eval.py [--categories 13204] [--images 2000] [--per-image 6] [--seed 0]

A seeded synthetic case: ground truths drawn with V3Det's real long tail (per-category train
instance counts, from the copy in tests/data), or Zipf for other sizes), about 3 detections per ground
truth (jittered boxes, 20% with another category) and background false positives; scores
rounded to 3 decimals so ties occur. Both evaluators run in this process on the same inputs;
the table gives their times, the ratio, and the largest difference over the 12 summary numbers
(ours reports AP at the largest maxDet, which here is pycocotools' 100 as well).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vastdet.evaluation.coco import STAT_NAMES, evaluate_boxes

CAT_INFO = (
    Path(__file__).resolve().parents[1]
    / "tests"
    / "data"
    / "v3det"
    / "v3det_2023_v1_train_cat_info.json.gz"
)


def make_case(categories: int, images: int, per_image: int, seed: int):
    rng = np.random.default_rng(seed)
    if CAT_INFO.is_file() and categories == 13204:
        counts = np.array(
            [c["instance_count"] for c in json.loads(gzip.decompress(CAT_INFO.read_bytes()))],
            dtype=float,
        )
    else:
        counts = 1.0 / np.arange(1, categories + 1) ** 1.1
    p = (counts + 1e-3) / (counts + 1e-3).sum()
    gt = {
        "images": [{"id": i + 1, "width": 640, "height": 480} for i in range(images)],
        "categories": [{"id": c + 1, "name": f"c{c + 1}"} for c in range(categories)],
        "annotations": [],
    }
    results = []
    for img in gt["images"]:
        n = int(rng.integers(1, 2 * per_image))
        for cat in rng.choice(categories, size=n, p=p) + 1:
            w, h = (float(v) for v in rng.uniform(10, 250, size=2))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": img["id"],
                    "category_id": int(cat),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            for _ in range(3):
                j = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                det_cat = int(cat) if rng.random() < 0.8 else int(rng.integers(1, categories + 1))
                results.append(
                    {
                        "image_id": img["id"],
                        "category_id": det_cat,
                        "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                        "score": round(float(rng.uniform(0.05, 1)), 3),
                    }
                )
    return gt, results


def run_pycocotools(gt, results) -> tuple[float, list[float]]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, list(evaluator.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=13204)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-image", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gt, results = make_case(args.categories, args.images, args.per_image, args.seed)
    start = time.perf_counter()
    ours = evaluate_boxes(gt, results)
    ours_s = time.perf_counter() - start
    ref_s, ref_stats = run_pycocotools(gt, results)
    diff = max(abs(ours.stats[k] - r) for k, r in zip(STAT_NAMES, ref_stats))
    print(
        f"{args.categories:,} categories, {args.images:,} images, {len(gt['annotations']):,} ground truths, "
        f"{len(results):,} detections (seed {args.seed})\n"
    )
    print("| evaluator | seconds | AP | AP50 |")
    print("|---|---|---|---|")
    print(f"| pycocotools COCOeval | {ref_s:.1f} | {ref_stats[0]:.6f} | {ref_stats[1]:.6f} |")
    print(
        f"| ours (vastdet.evaluation.coco) | {ours_s:.1f} | {ours.stats['AP']:.6f} | {ours.stats['AP50']:.6f} |"
    )
    print(
        f"\nspeed-up: {ref_s / ours_s:.1f}x; largest difference over the 12 summary numbers: {diff:.2e}"
    )


if __name__ == "__main__":
    main()
