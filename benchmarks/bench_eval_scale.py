"""Evaluation at V3Det's validation scale: ~30,000 images, 300 detections each over 13,204
categories (9 million detections), from the files on disk to the metrics, with its wall time
and peak memory.

    python benchmarks/bench_eval_scale.py [--images 30000] [--workdir runs/eval_scale]
        [--check-images 2000] [--compare-read]

A seeded case with V3Det's shape: images with 1-11 ground truths (179,476 in all at 30,000
images) whose categories follow V3Det's real training frequencies, and 300 detections per image:
a noisy copy of each ground truth with its category (or, one time in five, another one), the
rest at random places with categories drawn from the same frequencies. Written once as a COCO
annotation file and a `results.json` (streamed, one detection per line). The measured step
runs in a fresh process: read both files (`vastdet.evaluation.results_file.read_results`
streams the detections into arrays), score with the V3Det protocol's maxDets (1, 10, 300),
print AP, the time and the peak resident memory (`ru_maxrss`). `--check-images` first scores a
smaller case of the same generator both from arrays and from the result dicts the evaluator
took before, which must agree exactly (the dict path is the reference: it reads every
detection as a dict, as pycocotools does, and equals pycocotools in `tests/test_coco_eval.py`).
`--compare-read` only reads the results file as plain numbers and through json, in one
process, and prints both CPU times.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CAT_INFO = ROOT / "tests" / "data" / "v3det" / "v3det_2023_v1_train_cat_info.json.gz"
DETS_PER_IMAGE = 300


def generate(images: int, seed: int, gt_path: Path, results_path: Path) -> dict:
    """Write the case's ground truth and results files; returns their counts."""
    from vastdet.evaluation.coco import BoxArrays
    from vastdet.evaluation.results_file import write_results

    with gzip.open(CAT_INFO, "rt") as handle:
        info = json.load(handle)
    cats = np.array([c["id"] for c in info])
    freq = np.array([c["instance_count"] for c in info], dtype=np.float64)
    freq /= freq.sum()
    rng = np.random.default_rng(seed)
    anns, parts = [], []
    for image in range(1, images + 1):
        n_gt = int(rng.integers(1, 12))
        gt_cats = rng.choice(cats, size=n_gt, p=freq)
        wh = rng.uniform(20, 300, size=(n_gt, 2))
        xy = rng.uniform(0, 1, size=(n_gt, 2)) * (800 - wh)
        for k in range(n_gt):
            anns.append(
                {
                    "id": len(anns) + 1, "image_id": image, "category_id": int(gt_cats[k]),
                    "bbox": [*xy[k].tolist(), *wh[k].tolist()], "area": float(wh[k].prod()),
                    "iscrowd": 0,
                }
            )  # fmt: skip
        n_bg = DETS_PER_IMAGE - n_gt
        noisy = np.concatenate([xy, wh], 1) + rng.normal(0, 0.1, (n_gt, 4)) * np.concatenate(
            [wh, wh], 1
        )
        noisy[:, 2:] = np.maximum(noisy[:, 2:], 1.0)
        wrong = rng.random(n_gt) < 0.2
        det_cats = np.where(wrong, rng.choice(cats, size=n_gt, p=freq), gt_cats)
        bg_wh = rng.uniform(10, 300, size=(n_bg, 2))
        bg = np.concatenate([rng.uniform(0, 1, (n_bg, 2)) * (800 - bg_wh), bg_wh], 1)
        parts.append(
            BoxArrays(
                np.full(DETS_PER_IMAGE, image, dtype=np.int64),
                np.concatenate([det_cats, rng.choice(cats, size=n_bg, p=freq)]).astype(np.int64),
                np.round(np.concatenate([noisy, bg]), 2),
                np.round(np.concatenate([rng.uniform(0.3, 1, n_gt), rng.uniform(0, 0.6, n_bg)]), 4),
            )
        )
    gt = {
        "images": [{"id": i, "width": 800, "height": 800} for i in range(1, images + 1)],
        "annotations": anns,
        "categories": [{"id": int(c)} for c in cats],
    }
    gt_path.write_text(json.dumps(gt))
    write_results(results_path, BoxArrays.concat(parts))
    return {"images": images, "ground_truths": len(anns), "detections": images * DETS_PER_IMAGE}


MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
from vastdet.evaluation.coco import BoxArrays, evaluate_arrays
from vastdet.evaluation.results_file import read_results
gt = json.load(open(sys.argv[1]))
images = [i["id"] for i in gt["images"]]
categories = [c["id"] for c in gt["categories"]]
gts = BoxArrays.from_annotations(gt["annotations"])
del gt
dets = read_results(sys.argv[2])
read = time.perf_counter() - start
stats = evaluate_arrays(images, categories, gts, dets, (1, 10, 300)).stats
total = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print(json.dumps({"read_s": read, "total_s": total, "peak_gb": peak, "stats": stats}))
"""


def measure(gt_path: Path, results_path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(gt_path), str(results_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(work: Path, images: int) -> None:
    """Arrays and dicts score a smaller case the same; both times printed."""
    from vastdet.evaluation.coco import evaluate_boxes
    from vastdet.evaluation.results_file import read_results

    gt_path, results_path = work / f"gt_{images}.json", work / f"results_{images}.json"
    if not results_path.is_file():
        generate(images, 1, gt_path, results_path)
    gt = json.loads(gt_path.read_text())
    start = time.perf_counter()
    arrays = evaluate_boxes(gt, read_results(results_path), (1, 10, 300)).stats
    arrays_s = time.perf_counter() - start
    start = time.perf_counter()
    dicts = evaluate_boxes(gt, json.loads(results_path.read_text()), (1, 10, 300)).stats
    dicts_s = time.perf_counter() - start
    assert arrays == dicts, (arrays, dicts)
    print(
        f"check, {images:,} images: arrays {arrays_s:.1f} s, dicts {dicts_s:.1f} s, "
        f"the same 12 numbers (AP {arrays['AP']:.4f})"
    )


def compare_read(results_path: Path) -> None:
    """Read the results file as plain numbers and through json, one after the other in this
    process (CPU seconds, so a busy machine moves both alike); the arrays must be equal."""
    import vastdet.evaluation.results_file as results_file

    plain, timed = results_file._parse_plain, {}
    for name in ("json", "plain"):
        results_file._parse_plain = plain if name == "plain" else (lambda text: None)
        start = time.process_time()
        timed[name] = (results_file.read_results(results_path), time.process_time() - start)
    results_file._parse_plain = plain
    (ref, ref_s), (got, got_s) = timed["json"], timed["plain"]
    for field in ("image_ids", "category_ids", "boxes", "scores"):
        assert np.array_equal(getattr(ref, field), getattr(got, field)), field
    print(
        f"reading {len(got):,} detections: plain {got_s:.1f} s, json {ref_s:.1f} s "
        f"({ref_s / got_s:.1f}x), the same arrays"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--check-images", type=int, default=2_000)
    parser.add_argument("--workdir", type=Path, default=Path("runs/eval_scale"))
    parser.add_argument(
        "--compare-read", action="store_true", help="only time reading results.json both ways"
    )
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.check_images:
        check(work, args.check_images)
    gt_path, results_path = work / f"gt_{args.images}.json", work / f"results_{args.images}.json"
    if not results_path.is_file():
        counts = generate(args.images, 0, gt_path, results_path)
        print(f"case: {counts}")
    if args.compare_read:
        return compare_read(results_path)
    size = results_path.stat().st_size / 1e6
    out = measure(gt_path, results_path)
    print("| images | detections | results.json | read s | total s | peak GB | AP | AP50 |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.images:,} | {args.images * DETS_PER_IMAGE:,} | {size:.0f} MB | "
        f"{out['read_s']:.1f} | {out['total_s']:.1f} | {out['peak_gb']:.2f} | "
        f"{out['stats']['AP']:.4f} | {out['stats']['AP50']:.4f} |"
    )


if __name__ == "__main__":
    main()
