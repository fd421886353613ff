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
) -> list[dict]:
    """COCO result dicts (image_id = position in `images`, plus `file_name`) written to
    `output`; with `draw_dir`, one PNG per image with the detections scoring >= draw_threshold."""
    from vastdet.engine.export import load_model
    from vastdet.evaluation.runner import eval_transforms, find_taxonomy, write_json

    model, post, config = load_model(model_path)
    if post is None:
        raise ValueError(
            f"{model_path} is a stage-1 category selector: it ranks categories, it has no boxes"
        )
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
            results.append({**det, "file_name": str(paths[det["image_id"]])})
    write_json(Path(output), results)
    if draw_dir is not None:
        taxonomy = find_taxonomy(categories, config["data"].get("categories"))
        draw_detections(paths, results, Path(draw_dir), draw_threshold, taxonomy)
    return results


def draw_detections(
    paths: list[Path], results: list[dict], out_dir: Path, threshold: float, taxonomy=None
) -> list[Path]:
    """One PNG per image: its detections above `threshold`, labelled `name score`."""
    from PIL import Image

    from pipelines.preview import draw_boxes

    names = taxonomy.category_names() if taxonomy is not None else {}
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
        out = out_dir / f"{image_id:05d}_{path.stem}.png"
        draw_boxes(image, [d["bbox"] for d in dets], texts).save(out)
        written.append(out)
    return written
