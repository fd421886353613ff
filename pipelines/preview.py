"""What is in a shard set: counts, the category histogram, and a picture of a few samples."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

from PIL import Image, ImageDraw

from pipelines.shards import ShardSet
from pipelines.tarstream import tar_samples

log = logging.getLogger(__name__)


def iter_samples(
    shards: ShardSet, limit: int | None = None, skipped: Counter | None = None
) -> Iterator[tuple[Image.Image, dict]]:
    """(image, json) of the first `limit` readable samples, in shard order. A sample whose
    image or json does not decode, or a shard that cannot be read, is warned about with its
    shard and key and counted in `skipped` by kind."""
    skipped = Counter() if skipped is None else skipped

    def unreadable(err: Exception) -> bool:
        skipped["unreadable shard data"] += 1
        log.warning("skipping unreadable shard data: %s", err)
        return True

    seen = 0
    for sample in tar_samples(({"url": url} for url in shards.urls), unreadable):
        data = sample.get("jpg") or sample.get("png")
        try:
            if data is None or "json" not in sample:
                raise ValueError(f"members: {sorted(k for k in sample if not k.startswith('__'))}")
            image = Image.open(io.BytesIO(data))
            image.load()
            meta = json.loads(sample["json"])
        except Exception as err:  # noqa: BLE001 - decoders raise many kinds
            skipped["unreadable sample"] += 1
            log.warning("skipping %s key %s: %s", sample["__url__"], sample["__key__"], err)
            continue
        yield image.convert("RGB"), meta
        seen += 1
        if limit is not None and seen >= limit:
            return


def write_images(shards: ShardSet, out_dir: str | Path, count: int) -> list[Path]:
    """The first `count` readable samples' images as files in `out_dir`, their bytes as the
    shards hold them (`<key>.jpg` or `.png`); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in tar_samples(({"url": url} for url in shards.urls), _warn_and_go_on):
        suffix = "jpg" if sample.get("jpg") else "png" if sample.get("png") else None
        if suffix is None:
            continue
        path = out / f"{Path(sample['__key__']).name}.{suffix}"
        path.write_bytes(sample[suffix])
        written.append(path)
        if len(written) >= count:
            break
    return written


def _warn_and_go_on(err: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", err)
    return True


def summary(shards: ShardSet, names: Mapping[int, str] | None = None, top: int = 10) -> list[str]:
    """Readable counts and the head and tail of the category histogram."""
    m = shards.manifest
    inst = {int(k): v for k, v in m["category_instances"].items()}
    ranked = sorted(inst.items(), key=lambda kv: (-kv[1], kv[0]))
    label = (lambda c: f"{names.get(c, '?')} (#{c})") if names else (lambda c: f"#{c}")
    lines = [
        f"shards                 {len(m['shards']):>10,}",
        f"images                 {m['num_samples']:>10,}",
        f"boxes                  {m['num_instances']:>10,}",
        f"categories with boxes  {len(inst):>10,}",
        f"bytes                  {sum(s['bytes'] for s in m['shards']):>10,}",
    ]
    if m.get("skipped"):
        lines.append(
            "skipped when written: " + ", ".join(f"{k} {v}" for k, v in m["skipped"].items())
        )
    if ranked:
        lines.append(
            "most frequent categories (boxes): "
            + ", ".join(f"{label(c)} {n}" for c, n in ranked[:top])
        )
        lines.append(
            "least frequent categories (boxes): "
            + ", ".join(f"{label(c)} {n}" for c, n in ranked[-top:])
        )
    return lines


def label_font(size: int = 12):
    """A scalable font for labels (Pillow's bundled one), or its bitmap default without
    FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def place_labels(
    boxes_xyxy: list[list[float]], sizes: list[tuple[int, int]], width: int, height: int
) -> list[tuple[int, int, int, int]]:
    """Where each box's label goes: a (x0, y0, x1, y1) rectangle of its `size` inside the
    image, just above the box (else just inside its top edge, else below it), moved down past
    the labels placed before it so that none covers another when there is room."""
    placed: list[tuple[int, int, int, int]] = []
    for (x0, y0, _, y1), (w, h) in zip(boxes_xyxy, sizes):
        w, h = min(w, width), min(h, height)
        left = int(min(max(x0, 0), width - w))
        tops = [int(min(max(top, 0), height - h)) for top in (y0 - h, y0, y1)]
        placed.append(_free_spot(left, tops, w, h, height, placed))
    return placed


def _free_spot(left: int, tops: list[int], w: int, h: int, height: int, placed) -> tuple:
    """The first rectangle at `left` starting from one of `tops` (moving down past labels in
    the way) that covers no placed label and fits; else the first top's, covering."""
    for top in tops:
        while top + h <= height:
            rect = (left, top, left + w, top + h)
            clash = [p for p in placed if _overlap(rect, p)]
            if not clash:
                return rect
            top = max(p[3] for p in clash)
    return (left, tops[0], left + w, tops[0] + h)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_boxes(
    image: Image.Image,
    boxes_xywh: list[list[float]],
    texts: list[str],
    color: tuple[int, int, int] = (255, 255, 0),
) -> Image.Image:
    """`image` with each box outlined and labelled with its text (drawn in place); labels stay
    inside the image and do not cover each other (`place_labels`)."""
    draw = ImageDraw.Draw(image)
    font = label_font()
    boxes = [[x, y, x + w, y + h] for x, y, w, h in boxes_xywh]
    sizes = []
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 4, bottom - top + 4))
    for box in boxes:
        draw.rectangle(box, outline=color, width=2)
    for rect, text in zip(place_labels(boxes, sizes, image.width, image.height), texts):
        draw.rectangle(rect, fill=(0, 0, 0))
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((rect[0] + 2 - left, rect[1] + 2 - top), text, fill=color, font=font)
    return image


def draw_samples(
    shards: ShardSet,
    out: str | Path,
    names: Mapping[int, str] | None = None,
    count: int = 8,
    columns: int = 4,
    cell: int = 320,
    skipped: Counter | None = None,
) -> Path:
    """A PNG grid of the first `count` readable samples with their boxes and category names;
    unreadable ones are skipped and counted in `skipped`."""
    tiles = []
    for image, meta in iter_samples(shards, count, skipped):
        scale = cell / max(image.width, image.height)
        tile = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        )
        boxes = [[v * scale for v in ann["bbox"]] for ann in meta["annotations"]]
        cats = [ann["category_id"] for ann in meta["annotations"]]
        texts = [names.get(c, str(c)) if names else str(c) for c in cats]
        tiles.append(draw_boxes(tile, boxes, texts))
    if not tiles:
        raise ValueError(f"no readable samples to draw in {shards.root}")
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (32, 32, 32))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * cell, (k // columns) * cell))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
