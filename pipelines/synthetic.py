"""A synthetic vast-vocabulary detection dataset drawn from a taxonomy.

Real V3Det/COCO images cannot be fetched here, and tests and the demo need data with the same
difficulties: many categories, a hierarchy, a long tail and fine-grained look-alikes.

A category's appearance is inherited down its primary (first-parent) path from the root:
- the *shape* comes from a high ancestor (path position ~1/3),
- the *colour* from a mid-level ancestor (position ~2/3), lightness from the parent,
- the *pattern*, its orientation and the aspect ratio from the category itself.
Siblings therefore share shape and colour and differ only in texture and proportion: hard
negatives, as in V3Det's fine-grained categories. Category frequencies follow a Zipf law over a
seeded random ranking, or a given histogram (e.g. V3Det's real instance counts). Every shape
touches all four sides of its box, so the annotated boxes are exact. Layout (`make_records`) and
pixels (`SyntheticRenderer`) are both deterministic functions of the seed.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.annotations import ImageRecord
from pipelines.parallel import map_jobs
from taxonomy import Taxonomy

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "cross", "hexagon", "chevron")
PATTERNS = ("solid", "stripes", "checker", "dots", "rings", "gradient")
SUBSAMPLING = ("4:4:4", "4:2:2", "4:2:0")  # Pillow's names for its JPEG chroma subsampling


@dataclass(frozen=True)
class SynthConfig:
    """How many images of what size, with how many objects, and the category frequencies."""

    num_train: int = 1000
    num_val: int = 200
    min_side: int = 192
    max_side: int = 320
    min_objects: int = 1
    max_objects: int = 6
    min_box: float = 0.08  # box side as a fraction of the image's short side
    max_box: float = 0.6
    zipf_exponent: float = 1.1
    jpeg_quality: int = 90
    # chroma subsampling of the JPEG: 4:2:0 (libjpeg's default) halves the colour resolution,
    # which blurs the accent colour of a small object's texture, the cue that tells siblings
    # apart; 4:4:4 keeps it (7.7 KiB against 5.0 KiB a 128-160 px image at quality 90)
    jpeg_subsampling: str = "4:2:0"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.jpeg_subsampling not in SUBSAMPLING:
            raise ValueError(
                f"jpeg_subsampling must be one of {', '.join(SUBSAMPLING)}, "
                f"not {self.jpeg_subsampling!r}"
            )


@dataclass(frozen=True)
class Appearance:
    shape: int
    hue: float
    lightness: float
    pattern: int
    orientation: int  # quarter turns of the pattern
    aspect: float  # width / height of the box


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (stable across processes and runs)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def primary_path(taxonomy: Taxonomy, node_id: str) -> list[str]:
    """Root-to-node path following each node's first parent."""
    path = [node_id]
    while parents := taxonomy.parents(path[-1]):
        path.append(parents[0])
    return path[::-1]


def appearances(taxonomy: Taxonomy) -> dict[int, Appearance]:
    """The appearance of every category id, inherited along its primary path."""
    table = {}
    for cat in taxonomy.category_ids().tolist():
        node = taxonomy.node_of_category(cat)
        path = primary_path(taxonomy, node)
        # inherited features come from strict ancestors whenever the category has any
        above = max(len(path) - 2, 0)
        shape_from = path[min(above, len(path) // 3)]
        colour_from = path[min(above, (2 * len(path)) // 3)]
        parent = path[-2] if len(path) > 1 else node
        table[cat] = Appearance(
            shape=int(_unit("shape", shape_from) * len(SHAPES)),
            hue=_unit("hue", colour_from),
            lightness=0.35 + 0.3 * _unit("light", parent),
            pattern=int(_unit("pattern", node) * len(PATTERNS)),
            orientation=int(_unit("orient", node) * 4),
            aspect=math.exp((_unit("aspect", node) - 0.5) * 1.2),  # 0.55 .. 1.8
        )
    return table


def category_weights(
    category_ids: list[int], cfg: SynthConfig, histogram: Mapping[int, float] | None = None
) -> np.ndarray:
    """Sampling probabilities: the given histogram, or Zipf over a seeded random ranking."""
    if histogram is not None:
        w = np.array([float(histogram.get(c, 0.0)) for c in category_ids])
    else:
        ranks = np.random.default_rng(cfg.seed).permutation(len(category_ids)) + 1
        w = 1.0 / ranks.astype(np.float64) ** cfg.zipf_exponent
    if w.sum() <= 0:
        raise ValueError("the category histogram gives no category a positive frequency")
    return w / w.sum()


def make_records(
    taxonomy: Taxonomy, cfg: SynthConfig, histogram: Mapping[int, float] | None = None
) -> dict[str, list[ImageRecord]]:
    """The layout of both splits: image sizes, objects, boxes (exact) and category ids."""
    cats = taxonomy.category_ids().tolist()
    if not cats:
        raise ValueError("the taxonomy has no categories to draw")
    weights = category_weights(cats, cfg, histogram)
    table = appearances(taxonomy)
    rng = np.random.default_rng(cfg.seed + 1)
    splits, next_id, next_ann = {}, 1, 1
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        records = []
        for _ in range(count):
            w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
            n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            anns = []
            for cat in rng.choice(cats, size=n, p=weights).tolist():
                side = min(w, h) * float(
                    np.exp(rng.uniform(np.log(cfg.min_box), np.log(cfg.max_box)))
                )
                aspect = table[cat].aspect
                bw = max(4, min(w, int(round(side * math.sqrt(aspect)))))
                bh = max(4, min(h, int(round(side / math.sqrt(aspect)))))
                x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
                anns.append(
                    {
                        "id": next_ann,
                        "bbox": [x0, y0, bw, bh],
                        "category_id": cat,
                        "iscrowd": 0,
                        "area": float(bw * bh),
                    }
                )
                next_ann += 1
            records.append(ImageRecord(next_id, f"{split}/{next_id:012d}.jpg", w, h, anns))
            next_id += 1
        splits[split] = records
    return splits


def _shape_polygon(shape: str, x0: int, y0: int, x1: int, y1: int) -> list[tuple[float, float]]:
    """Polygon vertices spanning exactly [x0, x1] x [y0, y1]."""
    unit = {
        "triangle": [(0.5, 0), (1, 1), (0, 1)],
        "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
        "cross": [
            (0.33, 0),
            (0.67, 0),
            (0.67, 0.33),
            (1, 0.33),
            (1, 0.67),
            (0.67, 0.67),
            (0.67, 1),
            (0.33, 1),
            (0.33, 0.67),
            (0, 0.67),
            (0, 0.33),
            (0.33, 0.33),
        ],
        "hexagon": [(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)],
        "chevron": [(0, 0), (0.5, 0.45), (1, 0), (1, 0.55), (0.5, 1), (0, 0.55)],
    }.get(shape)
    if shape == "star":
        pts = [
            (
                math.cos(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
                -math.sin(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
            )
            for k in range(10)
        ]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        unit = [
            ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
            for x, y in pts
        ]
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in unit]


def _texture(app: Appearance, w: int, h: int) -> Image.Image:
    base = tuple(int(255 * c) for c in colorsys.hls_to_rgb(app.hue, app.lightness, 0.75))
    accent = tuple(
        int(255 * c) for c in colorsys.hls_to_rgb((app.hue + 0.5) % 1, 1 - app.lightness, 0.6)
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if app.orientation % 2:
        xx, yy = yy, xx
    period = max(4.0, min(w, h) / 5)
    field = {
        "solid": np.zeros((h, w), np.float32),
        "stripes": (xx // (period / 2)) % 2,
        "checker": ((xx // period) + (yy // period)) % 2,
        "dots": (
            ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2
            < (period / 4) ** 2
        ),
        "rings": (np.hypot(xx - w / 2, yy - h / 2) // (period / 2)) % 2,
        "gradient": xx / max(xx.max(), 1),
    }[PATTERNS[app.pattern]].astype(np.float32)
    if app.orientation >= 2:
        field = field[::-1, ::-1]
    rgb = (
        np.array(base, np.float32) * (1 - field[..., None])
        + np.array(accent, np.float32) * field[..., None]
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


class SyntheticRenderer:
    """Renders a record's JPEG bytes; a picklable image reader for the shard writer."""

    def __init__(self, taxonomy: Taxonomy, cfg: SynthConfig):
        self.table = appearances(taxonomy)
        self.cfg = cfg

    def image(self, record: ImageRecord) -> Image.Image:
        rng = np.random.default_rng([self.cfg.seed, record.image_id])
        coarse = rng.integers(60, 200, size=(6, 6, 3)).astype(np.uint8)
        canvas = Image.fromarray(coarse, "RGB").resize(
            (record.width, record.height), Image.Resampling.BICUBIC
        )
        canvas = canvas.filter(ImageFilter.GaussianBlur(2))
        for ann in record.annotations:
            x0, y0, bw, bh = (int(v) for v in ann["bbox"])
            app = self.table[ann["category_id"]]
            mask = Image.new("L", (bw, bh), 0)
            draw = ImageDraw.Draw(mask)
            shape = SHAPES[app.shape]
            if shape == "ellipse":
                draw.ellipse([0, 0, bw - 1, bh - 1], fill=255)
            elif shape == "rectangle":
                draw.rectangle([0, 0, bw - 1, bh - 1], fill=255)
            else:
                draw.polygon(_shape_polygon(shape, 0, 0, bw - 1, bh - 1), fill=255)
            canvas.paste(_texture(app, bw, bh), (x0, y0), mask)
        return canvas

    def __call__(self, record: ImageRecord) -> bytes:
        out = io.BytesIO()
        self.image(record).save(
            out,
            format="JPEG",
            quality=self.cfg.jpeg_quality,
            subsampling=self.cfg.jpeg_subsampling,
        )
        return out.getvalue()


RENDER_CHUNK = 64  # images a rendering job writes


def _render_job(job: tuple[SyntheticRenderer, Path, list[ImageRecord]]) -> int:
    renderer, root, records = job
    for record in records:
        (root / record.file_name).write_bytes(renderer(record))
    return len(records)


def write_coco(
    taxonomy: Taxonomy,
    cfg: SynthConfig,
    out_dir: str | os.PathLike,
    histogram: Mapping[int, float] | None = None,
    workers: int = 2,
) -> dict[str, Path]:
    """Write `images/<split>/*.jpg` and `<split>.json` (COCO format), rendering in `workers`
    processes (each image's pixels depend only on the seed and its id, so the files are the
    same for any number); returns the json paths."""
    from tqdm import tqdm

    out = Path(out_dir)
    renderer = SyntheticRenderer(taxonomy, cfg)
    categories = [
        {"id": c, "name": n, "supercategory": ""}
        for c, n in sorted(taxonomy.category_names().items())
    ]
    paths = {}
    for split, records in make_records(taxonomy, cfg, histogram).items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [
            (renderer, out / "images", records[k : k + RENDER_CHUNK])
            for k in range(0, len(records), RENDER_CHUNK)
        ]
        with tqdm(
            total=len(records), desc=f"rendering {split}", unit="img", disable=not records
        ) as bar:
            for done in map_jobs(_render_job, jobs, workers):
                bar.update(done)
        doc = {
            "info": {
                "description": "vastdet synthetic vast-vocabulary dataset",
                "config": asdict(cfg),
            },
            "images": [
                {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}
                for r in records
            ],
            "annotations": [{**a, "image_id": r.image_id} for r in records for a in r.annotations],
            "categories": categories,
        }
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(doc))
    return paths
