"""COCO-format annotations, checked on the way into shards.

Every problem is reported with the annotation file and the image id; nothing bad is written
silently. `on_error="raise"` (default) stops with all problems listed; `"skip"` drops the bad
annotations (or images) and counts them by kind, for the manifest.

Box policy for a box that extends past the image: `clip` cuts it to the image (a box left with
no area is a problem), `reject` reports it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

BOX_POLICIES = ("clip", "reject")
ON_ERROR = ("raise", "skip")
IMAGE_KINDS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}


class AnnotationError(ValueError):
    """Annotations that cannot be written; the message lists every problem found."""


@dataclass
class ImageRecord:
    """One image and its (checked) annotations; bbox is COCO xywh in pixels."""

    image_id: int
    file_name: str
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)
    # LVIS's federated lists (`FEDERATED_KEYS`), kept when the annotation file has them
    federated: dict[str, list[int]] = field(default_factory=dict)

    def sample_json(self) -> dict:
        """The `json` member of this image's shard sample (DESIGN.md's shard contract)."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
            "annotations": self.annotations,
            **self.federated,
        }


# LVIS image fields: categories verified absent, and categories not exhaustively annotated
FEDERATED_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")


def lvis_file_name(image: dict) -> str | None:
    """An LVIS v1 image's path under the COCO image root: LVIS names no `file_name`, its
    `coco_url` ends in `<split>/<file>` (`val2017/000000397133.jpg`)."""
    url = image.get("coco_url")
    if not isinstance(url, str) or url.count("/") < 1:
        return None
    return "/".join(url.rstrip("/").split("/")[-2:])


def federated_lists(image: dict, category_ids) -> tuple[dict[str, list[int]], str | None]:
    """(the image's federated lists inside the vocabulary, a problem or None)."""
    out = {}
    for key in FEDERATED_KEYS:
        if key not in image:
            continue
        values = image[key]
        if not isinstance(values, list) or not all(_is_int(v) for v in values):
            return {}, f"{key} must be a list of category ids, not {values!r:.120}"
        out[key] = sorted({int(v) for v in values if v in category_ids})
    return out, None


@dataclass
class Problem:
    source: str
    image_id: object
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: image {self.image_id}: {self.kind}: {self.detail}"


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))


def image_path(root: str | os.PathLike, file_name: str) -> Path:
    """`root / file_name` for a file name that stays inside `root`: relative, without `..`
    (an annotation file is data, and must not make us read elsewhere). Symbolic links inside
    the root are the user's own layout and are followed."""
    name = PurePosixPath(file_name.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or not name.parts or ":" in file_name:
        raise ValueError(
            f"file_name {file_name!r} points outside the image root {os.fspath(root)} "
            "(file names must be relative and without '..')"
        )
    return Path(root) / name


def image_kind(head: bytes) -> str | None:
    """`jpg` or `png` from a file's first bytes, None for anything else."""
    return next((kind for magic, kind in IMAGE_KINDS.items() if head.startswith(magic)), None)


def _check_box(bbox, width: int, height: int, policy: str) -> tuple[list[float] | None, str, str]:
    """(checked xywh box or None, problem kind, detail)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, "malformed box", f"bbox {bbox!r} is not [x, y, w, h]"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, "malformed box", f"bbox {bbox!r} is not numeric"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "non-finite box", f"bbox {bbox!r}"
    if w <= 0 or h <= 0:
        return None, "zero-area box", f"bbox {bbox!r} has width or height <= 0"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return [x, y, w, h], "", ""
    if policy == "reject":
        return None, "box outside image", f"bbox {bbox!r} exceeds the {width}x{height} image"
    if x1 <= x0 or y1 <= y0:
        return (
            None,
            "box outside image",
            f"bbox {bbox!r} has no area inside the {width}x{height} image",
        )
    return [x0, y0, x1 - x0, y1 - y0], "", ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_annotation(
    ann, width: int, height: int, category_ids: Container[int] | None, policy: str = "clip"
) -> tuple[dict | None, str, str]:
    """(checked annotation or None, problem kind, detail) for one COCO annotation of a
    `width` x `height` image: an integer category id in the vocabulary (None: any), a finite
    box of positive size (clipped to the image under `policy="clip"`), `iscrowd` 0 or 1 and a
    finite, non-negative area (the box's when absent). Shard writing and the loaders both
    check with this."""
    if not isinstance(ann, dict):
        return None, "malformed annotation", f"{ann!r:.100} is not an object"
    cat = ann.get("category_id")
    if not _is_int(cat) or (category_ids is not None and cat not in category_ids):
        return None, "unknown category id", f"annotation {ann.get('id')} has category_id {cat!r}"
    box, kind, detail = _check_box(ann.get("bbox"), width, height, policy)
    if box is None:
        return None, kind, f"annotation {ann.get('id')}: {detail}"
    iscrowd, area = ann.get("iscrowd", 0), ann.get("area", box[2] * box[3])
    if iscrowd not in (0, 1) or isinstance(iscrowd, float):
        return None, "malformed annotation", f"annotation {ann.get('id')}: iscrowd {iscrowd!r}"
    if not isinstance(area, (int, float)) or isinstance(area, bool) or not 0 <= area < math.inf:
        return None, "malformed annotation", f"annotation {ann.get('id')}: area {area!r}"
    checked = {
        "id": ann.get("id"),
        "bbox": box,
        "category_id": cat,
        "iscrowd": int(iscrowd),
        "area": float(area),
    }
    return checked, "", ""


class UnusableDataError(RuntimeError):
    """A stream that gives only unusable samples: raised rather than skipping forever."""


class SampleError(ValueError):
    """A shard sample that cannot be used as it is; `kind` is the count it is skipped under."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def checked_annotations(
    meta, height: int, width: int, category_ids: Container[int] | None = None
) -> list[dict]:
    """A shard sample's annotations checked as the sample is read (`check_annotation`, boxes
    clipped to the image as at writing time); the json's image size must be the decoded
    image's. Raises `SampleError` for the first problem: the whole sample is skipped, since
    an image missing one of its objects would teach (or score) a wrong answer."""
    if not isinstance(meta, dict) or not isinstance(meta.get("annotations"), list):
        raise SampleError("bad json", "no annotations list")
    if not _is_int(meta.get("image_id")):
        raise SampleError("bad json", f"image_id {meta.get('image_id')!r}")
    if (meta.get("width"), meta.get("height")) != (width, height):
        raise SampleError(
            "image size mismatch",
            f"json says {meta.get('width')}x{meta.get('height')}, the image is {width}x{height}",
        )
    checked = []
    for ann in meta["annotations"]:
        clean, kind, detail = check_annotation(ann, width, height, category_ids)
        if clean is None:
            raise SampleError(kind, detail)
        checked.append(clean)
    return checked


def load_coco(
    annotation_file: str | os.PathLike,
    image_root: str | os.PathLike | None,
    category_ids: set[int] | None = None,
    box_policy: str = "clip",
    on_error: str = "raise",
) -> tuple[list[ImageRecord], CheckReport]:
    """Read and check a COCO annotation file; returns image records in file order.

    `category_ids`: the vocabulary to accept (default: the file's own `categories`).
    `image_root`: where `file_name`s resolve; None skips the missing-file check.
    """
    if box_policy not in BOX_POLICIES or on_error not in ON_ERROR:
        raise ValueError(f"box_policy must be one of {BOX_POLICIES}, on_error one of {ON_ERROR}")
    source = os.fspath(annotation_file)
    with open(annotation_file, encoding="utf-8") as handle:
        try:
            doc = json.load(handle)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{source}: not valid JSON ({err})") from None
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise AnnotationError(f"{source}: missing the '{key}' list")
    if category_ids is None:
        category_ids = {c["id"] for c in doc.get("categories", [])}
    report = CheckReport()
    records: dict[object, ImageRecord] = {}
    for image in doc["images"]:
        image_id = image.get("id")
        w, h = image.get("width"), image.get("height")
        name = image.get("file_name") if "file_name" in image else lvis_file_name(image)
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id in records:
            report.problems.append(
                Problem(source, image_id, "bad image id", "missing, not an integer or repeated")
            )
            continue
        if not (
            isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 and isinstance(name, str)
        ):
            report.problems.append(
                Problem(
                    source,
                    image_id,
                    "bad image entry",
                    f"needs file_name (or LVIS's coco_url) and positive width/height: "
                    f"{image!r:.200}",
                )
            )
            continue
        federated, problem = federated_lists(image, category_ids)
        if problem:
            report.problems.append(Problem(source, image_id, "bad image entry", problem))
            continue
        if image_root is not None:
            try:
                path = image_path(image_root, name)
            except ValueError as err:
                report.problems.append(
                    Problem(source, image_id, "file outside image root", str(err))
                )
                continue
            if not path.is_file():
                report.problems.append(Problem(source, image_id, "missing image file", str(path)))
                continue
        records[image_id] = ImageRecord(image_id, name, w, h, federated=federated)
    known_ids = {image.get("id") for image in doc["images"]}
    for ann in doc["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        record = records.get(image_id) if _is_int(image_id) else None
        if record is None:
            if not _is_int(image_id) or image_id not in known_ids:
                report.problems.append(
                    Problem(
                        source,
                        image_id,
                        "unknown image id",
                        f"annotation {ann.get('id')} names an image not in 'images'",
                    )
                )
            continue  # the image itself was already reported
        clean, kind, detail = check_annotation(
            ann, record.width, record.height, category_ids, box_policy
        )
        if clean is None:
            report.problems.append(Problem(source, image_id, kind, detail))
            continue
        record.annotations.append(clean)
    if report.problems and on_error == "raise":
        shown = "\n  ".join(str(p) for p in report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        counts = ", ".join(f"{k}: {v}" for k, v in report.counts().items())
        raise AnnotationError(
            f"{source}: {len(report.problems)} annotation problems ({counts}); fix them or pass "
            f"on_error='skip' to drop and count them:\n  {shown}{more}"
        )
    return list(records.values()), report
