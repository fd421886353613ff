"""`vastdet patterns`: what a PaQ-DETR model's dynamic weights W^D do, as PNG figures (PaQ-DETR
Fig. 5 and 6).

- Per chosen category, a heat map of the W^D rows [m] of the queries behind its successful
  detections (IoU with a ground truth of that category above `iou`, score above `score`; the
  paper uses 0.7 and 0.5), and their mean activation per pattern (Fig. 5).
- A 2-D map of the images' flattened W^D [n * m], each point coloured by the image's dominant
  category (its most frequent ground-truth category). The paper uses t-SNE; this uses the two
  leading principal components (no dependency beyond torch), which keeps distances linear.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from vastdet.models.box_ops import box_iou


@torch.no_grad()
def collect(model, post, loader, device="cpu") -> tuple[list[dict], list[torch.Tensor]]:
    """(per image: W^D [n, m], its detections and ground truths; ...) over an evaluation
    loader. Raises for a model without pattern queries."""
    images = []
    for batch in loader:
        if batch.empty:
            continue
        outputs = model(batch.images.to(device), batch.masks.to(device))
        if "pattern_weights" not in outputs:
            raise ValueError("this model has no pattern queries (PaQ-DETR's `patterns: m`)")
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for b, det in enumerate(post(outputs, sizes)):
            anns = batch.targets[b]["annotations"]
            images.append(
                {
                    "weights": outputs["pattern_weights"][b].cpu(),
                    "detections": {k: v.cpu() for k, v in det.items()},
                    "gt_boxes": torch.tensor(
                        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
                    ).reshape(-1, 4),
                    "gt_labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                }
            )
    return images


def successful_rows(images: list[dict], category: int, iou: float, score: float) -> torch.Tensor:
    """W^D rows [k, m] of the queries behind `category`'s successful detections."""
    rows = []
    for image in images:
        det = image["detections"]
        keep = (det["labels"] == category) & (det["scores"] > score)
        gts = image["gt_boxes"][image["gt_labels"] == category]
        if not keep.any() or not len(gts):
            continue
        overlap, _ = box_iou(det["boxes"][keep], gts)
        hits = det["queries"][keep][overlap.max(1).values > iou]
        rows.append(image["weights"][hits])
    m = images[0]["weights"].shape[1] if images else 0
    return torch.cat(rows) if rows else torch.zeros(0, m)


def principal_map(images: list[dict]) -> torch.Tensor:
    """The images' flattened W^D projected on their two leading principal components [N, 2]."""
    flat = torch.stack([image["weights"].flatten() for image in images]).double()
    centred = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:2].T).float()


def draw(
    images: list[dict],
    out_dir: str | os.PathLike,
    categories: list[int],
    names: dict[int, str],
    iou: float = 0.7,
    score: float = 0.5,
) -> tuple[list[Path], list[str]]:
    """Write the figures; returns their paths, and a note for each figure not written because
    it would be empty (a category without a successful detection)."""
    from vastdet.runtime.plot import outside_legend, pyplot, save_figure

    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for category in categories:
        rows = successful_rows(images, category, iou, score)
        label = f"{names.get(category, category)} (#{category})"
        if not len(rows):
            notes.append(
                f"{label}: no detection with IoU > {iou} and score > {score} in "
                f"{len(images)} images, so no W^D figure (lower --score or --iou, or train "
                "longer)"
            )
            continue
        fig, (heat, mean) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
        heat.imshow(rows.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        mean.bar(range(rows.shape[1]), rows.mean(0).numpy())
        heat.set(
            title=f"{label}: W^D of {len(rows)} detections", xlabel="pattern", ylabel="detection"
        )
        mean.set(title="mean weight per pattern", xlabel="pattern")
        written.append(save_figure(fig, out / f"patterns_category_{category}.png"))
    if len(images) >= 2:
        points = principal_map(images)
        dominant = [
            Counter(image["gt_labels"].tolist()).most_common(1)[0][0]
            if len(image["gt_labels"])
            else None
            for image in images
        ]
        fig, ax = plt.subplots(figsize=(7, 6))
        shown = [c for c, _ in Counter(d for d in dominant if d is not None).most_common(10)]
        for c in shown + [None]:
            index = [i for i, d in enumerate(dominant) if d == c or (c is None and d not in shown)]
            if index:
                name = "other / none" if c is None else names.get(c, str(c))
                ax.scatter(points[index, 0], points[index, 1], s=14, label=name)
        ax.set(
            title=f"W^D of {len(images)} images, 2 principal components",
            xlabel="PC 1",
            ylabel="PC 2",
        )
        outside_legend(ax)
        written.append(save_figure(fig, out / "patterns_images_map.png"))
    else:
        notes.append(f"{len(images)} image(s) with pattern weights: no map of the images drawn")
    return written, notes


def run_pattern_maps(
    model_path: str | os.PathLike,
    val_shards: str | os.PathLike,
    out_dir: str | os.PathLike,
    categories: list[int] | None = None,
    iou: float = 0.7,
    score: float = 0.5,
    batch_size: int = 2,
    limit: int | None = None,
) -> tuple[list[Path], list[str]]:
    """`vastdet patterns`: load the model, run the val shards (at most `limit` images), draw
    (`draw`: the figures written and notes on those left out). Without `categories`, the
    three most frequent ground-truth categories are drawn."""
    from itertools import islice

    from pipelines.loader import eval_loader
    from pipelines.shards import ShardSet
    from vastdet.evaluation.predict import category_names
    from vastdet.evaluation.runner import eval_transforms
    from vastdet.runtime.loading import load_model

    model, post, config = load_model(model_path)
    if post is None:
        raise ValueError(f"{model_path} is a stage-1 category selector: it has no queries")
    shards = ShardSet.open(val_shards)
    loader = eval_loader(
        shards, batch_size, eval_transforms(config, str(model_path)), 0,
        categories=model.category_ids.tolist(),
    )  # fmt: skip
    batches = islice(loader, None if limit is None else -(-limit // batch_size))
    images = collect(model, post, batches, next(model.parameters()).device)
    if categories is None:
        counts = Counter(c for image in images for c in image["gt_labels"].tolist())
        categories = [c for c, _ in counts.most_common(3)]
    names = category_names(config)
    return draw(images, out_dir, categories, names, iou, score)
