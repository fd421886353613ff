"""The random-box baseline: what a detector that learnt nothing scores on a val set.

Each val image gets `per_image` boxes of random position and size (sides drawn between
`min_box` and `max_box` of the image's short side), each with a category drawn from the
training set's instance frequencies and a random score; the same evaluator scores them as it
scores a model (hierarchy levels and frequency groups included), so a model's numbers can be
read against it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def shard_ground_truth(shards) -> tuple[list[dict], list[dict]]:
    """(images, annotations) from a shard set's JSON members, without decoding pixels."""
    from pipelines.tarstream import tar_samples

    def unreadable(err: Exception) -> bool:
        raise err

    images, annotations = [], []
    for sample in tar_samples(({"url": url} for url in shards.urls), unreadable):
        if "json" not in sample:
            continue
        meta = json.loads(sample["json"])
        images.append({"id": meta["image_id"], "height": meta["height"], "width": meta["width"]})
        annotations.extend({**a, "image_id": meta["image_id"]} for a in meta["annotations"])
    return images, annotations


def random_boxes(
    images: Sequence[dict],
    category_instances: dict,
    per_image: int = 100,
    seed: int = 0,
    min_box: float = 0.08,
    max_box: float = 0.6,
) -> list[dict]:
    """COCO detections: `per_image` random boxes per image, categories by training frequency."""
    rng = np.random.default_rng(seed)
    cats = np.array([int(c) for c in category_instances])
    p = np.array([category_instances[c] for c in category_instances], dtype=float)
    p /= p.sum()
    results = []
    for img in images:
        short = min(img["width"], img["height"])
        sides = rng.uniform(min_box * short, max_box * short, size=(per_image, 2))
        sides = np.minimum(sides, [img["width"], img["height"]])
        x = rng.uniform(0, img["width"] - sides[:, 0])
        y = rng.uniform(0, img["height"] - sides[:, 1])
        for k, cat in enumerate(rng.choice(cats, size=per_image, p=p)):
            box = [float(x[k]), float(y[k]), float(sides[k, 0]), float(sides[k, 1])]
            results.append(
                {"image_id": img["id"], "category_id": int(cat), "bbox": box,
                 "score": float(rng.random())}
            )  # fmt: skip
    return results


def random_baseline(
    val_shards: str | os.PathLike,
    train_shards: str | os.PathLike,
    category_ids: Sequence[int],
    taxonomy=None,
    levels: Sequence[int] = (),
    per_image: int = 100,
    seed: int = 0,
    **box_range,
) -> dict[str, float]:
    """The random-box baseline's metrics on `val_shards` (categories and APr/c/f counts from
    `train_shards`' manifest)."""
    from pipelines.shards import ShardSet
    from vastdet.evaluation.runner import score

    train = ShardSet.open(train_shards)
    images, annotations = shard_ground_truth(ShardSet.open(val_shards))
    results = random_boxes(
        images, train.manifest["category_instances"], per_image, seed, **box_range
    )
    return score(
        results, images, annotations, category_ids, taxonomy=taxonomy, levels=levels,
        category_images=train.category_images(),
    )  # fmt: skip
