"""`vastdet predict`: a trained model over image files, to COCO-format results and pictures."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from pipelines.loader import collate, target_from_meta
from pipelines.transforms import decode_image_bytes


def load_image(path: Path, image_id: int) -> tuple[torch.Tensor, dict]:
    """Decoded pixels [3, H, W] uint8 and an empty target; a file that does not decode is named."""
    data = path.read_bytes()
    try:
        image = decode_image_bytes(data)
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds
        raise ValueError(f"{path}: not a readable image ({err})") from err
    meta = {
        "annotations": [],
        "image_id": image_id,
        "height": image.shape[1],
        "width": image.shape[2],
    }
    return image, target_from_meta(meta)


@torch.no_grad()
def predict_images(
    model_path: str | os.PathLike,
    images: list[str | os.PathLike],
    output: str | os.PathLike,
    draw_dir: str | os.PathLike | None = None,
    batch_size: int = 2,
    draw_threshold: float = 0.3,
    categories: str | os.PathLike | None = None,
    max_detections: int | None = None,
) -> tuple[list[dict], int | None]:
    """COCO result dicts (image_id = position in `images`, plus `file_name`, boxes clipped to
    the image) written to `output`, and with `draw_dir` one PNG per image with the detections
    scoring >= draw_threshold (and how many those were; None without `draw_dir`). Category
    names come from `categories`, else the run's category file, else the one its training
    shards' manifest names. Each image keeps `max_detections`, by default as many as
    `vastdet eval` keeps under its default protocol (COCO's 100, or the model's own if more)."""
    from vastdet.evaluation.runner import PROTOCOLS, eval_transforms, write_json
    from vastdet.runtime.loading import load_model

    model, post, config = load_model(model_path)
    if post is None:
        raise ValueError(
            f"{model_path} is a stage-1 category selector: it ranks categories, it has no boxes"
        )
    post.max_detections = max_detections or max(post.max_detections, PROTOCOLS["coco"][-1])
    transforms = eval_transforms(config, str(model_path))
    device = next(model.parameters()).device
    paths = [Path(p) for p in images]
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        samples = [
            transforms(*load_image(p, start + k), random.Random(0)) for k, p in enumerate(chunk)
        ]
        batch = collate(samples)
        outputs = model(batch.images.to(device), batch.masks.to(device))
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for det in post.coco_results(outputs, sizes, [t["image_id"] for t in batch.targets]):
            height, width = sizes[det["image_id"] - start].tolist()
            det["bbox"] = clip_xywh(det["bbox"], width, height)
            results.append({**det, "file_name": str(paths[det["image_id"]])})
    write_json(Path(output), results)
    if draw_dir is not None:
        names = category_names(config, categories)
        _, drawn = draw_detections(paths, results, Path(draw_dir), draw_threshold, names)
        return results, drawn
    return results, None


def category_names(config: dict, categories: str | os.PathLike | None = None) -> dict[int, str]:
    """Category id -> name for labels: from `categories`, else the run's category file, else
    the file its training shards' manifest names; empty when none is found (ids are shown)."""
    from vastdet.evaluation.runner import find_taxonomy, manifest_categories

    taxonomy = find_taxonomy(
        categories,
        config["data"].get("categories"),
        manifest_categories(config["data"].get("train_shards")),
    )
    return taxonomy.category_names() if taxonomy is not None else {}


def clip_xywh(box: list[float], width: int, height: int) -> list[float]:
    """A COCO box cut to the image (a prediction may reach past its edges)."""
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[0] + box[2], 0.0), width), min(max(box[1] + box[3], 0.0), height)
    return [x0, y0, x1 - x0, y1 - y0]


DRAW_MIN_SIDE = 640  # smaller images are drawn scaled up, so that labels leave them visible


def draw_detections(
    paths: list[Path],
    results: list[dict],
    out_dir: Path,
    threshold: float,
    names: dict[int, str] | None = None,
) -> tuple[list[Path], int]:
    """One PNG per image: its detections scoring >= `threshold`, labelled `name score`;
    images whose longer side is under `DRAW_MIN_SIDE` are scaled up first. Returns the files
    and how many detections were drawn."""
    from PIL import Image

    from pipelines.preview import draw_boxes

    names = names or {}
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id, path in enumerate(paths):
        dets = by_image.get(image_id, [])
        texts = [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets]
        image = Image.open(path).convert("RGB")
        scale = max(1.0, DRAW_MIN_SIDE / max(image.size))
        if scale > 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        boxes = [[v * scale for v in d["bbox"]] for d in dets]
        out = out_dir / f"{image_id:05d}_{path.stem}.png"
        draw_boxes(image, boxes, texts).save(out)
        written.append(out)
    return written, sum(len(d) for d in by_image.values())
