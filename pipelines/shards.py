"""Image records -> webdataset tar shards with a manifest.

A sample is `{key}.jpg|png` (the image bytes as they are, never re-encoded) and `{key}.json`
(`image_id, width, height, file_name, annotations: [{bbox, category_id, iscrowd, area, id}]`).
Shards are planned up front (max samples and, where image sizes are known, max bytes per shard)
and written in parallel, each to a temporary name then renamed. Tar headers carry fixed
metadata, so the same input gives byte-identical shards and the same sha256.

`manifest.json` beside the shards records the shard list, samples, bytes and sha256 per shard,
per-category instance and image counts, the source and the category file written against.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.annotations import CheckReport, ImageRecord, image_kind
from pipelines.parallel import map_jobs
from taxonomy.files import atomic_output, file_sha256

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vastdet.shards/1"


def sample_key(image_id: int) -> str:
    """The `__key__` of an image's sample: no dots (a dot breaks webdataset's grouping)."""
    return f"{image_id:012d}"


class FileImageReader:
    """Reads an image's bytes from `root / file_name` (picklable for worker processes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __call__(self, record: ImageRecord) -> bytes:
        return (self.root / record.file_name).read_bytes()

    def size(self, record: ImageRecord) -> int:
        return (self.root / record.file_name).stat().st_size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: Path, records: Sequence[ImageRecord], read_image: Callable[[ImageRecord], bytes]
) -> dict:
    """Write one shard (atomically); returns its manifest entry."""
    with atomic_output(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            data = read_image(record)
            kind = image_kind(data[:8])
            if kind is None:
                raise ValueError(
                    f"image {record.image_id} ({record.file_name}) is neither JPEG nor PNG"
                )
            key = sample_key(record.image_id)
            _add_member(tar, f"{key}.{kind}", data)
            _add_member(tar, f"{key}.json", json.dumps(record.sample_json()).encode())
    return {
        "name": path.name,
        "samples": len(records),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def plan_shards(
    sizes: Sequence[int] | None, count: int, max_samples: int, max_bytes: int
) -> list[range]:
    """Consecutive index ranges with at most `max_samples` samples and (if sizes are known)
    at most `max_bytes` image bytes each; a single larger image gets a shard of its own."""
    if max_samples < 1:
        raise ValueError("max_samples must be >= 1")
    plans, start, used = [], 0, 0
    for i in range(count):
        size = sizes[i] if sizes is not None else 0
        if i > start and (i - start >= max_samples or used + size > max_bytes):
            plans.append(range(start, i))
            start, used = i, 0
        used += size
    if count > start:
        plans.append(range(start, count))
    return plans


def category_histograms(records: Sequence[ImageRecord]) -> tuple[dict[int, int], dict[int, int]]:
    """(instances per category id, images containing each category id)."""
    instances: Counter[int] = Counter()
    images: Counter[int] = Counter()
    for record in records:
        cats = [a["category_id"] for a in record.annotations]
        instances.update(cats)
        images.update(set(cats))
    return dict(sorted(instances.items())), dict(sorted(images.items()))


def write_shards(
    records: Sequence[ImageRecord],
    read_image: Callable[[ImageRecord], bytes],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_samples: int = 1000,
    max_bytes: int = 1 << 30,
    workers: int = 2,
    source: str = "",
    categories_file: str | os.PathLike | None = None,
    check_report: CheckReport | None = None,
    progress: bool = True,
) -> dict:
    """Write all shards and the manifest; returns the manifest."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [read_image.size(r) for r in records] if hasattr(read_image, "size") else None
    plans = plan_shards(sizes, len(records), max_samples, max_bytes)
    width = max(6, len(str(len(plans))))
    paths = [out / f"{prefix}-{k:0{width}d}.tar" for k in range(len(plans))]
    jobs = [(p, [records[i] for i in plan], read_image) for p, plan in zip(paths, plans)]
    bar = tqdm(
        total=len(records), desc=f"writing {len(plans)} shards", unit="img", disable=not progress
    )
    entries = []
    for entry in map_jobs(_write_job, jobs, workers):
        entries.append(entry)
        bar.update(entry["samples"])
    bar.close()
    instances, images = category_histograms(records)
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "num_samples": len(records),
        "num_instances": sum(instances.values()),
        "shards": entries,
        "category_instances": {str(k): v for k, v in instances.items()},
        "category_images": {str(k): v for k, v in images.items()},
        "categories_file": os.fspath(categories_file) if categories_file else None,
        "categories_file_sha256": file_sha256(categories_file) if categories_file else None,
        "skipped": check_report.counts() if check_report else {},
    }
    with atomic_output(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_job(job) -> dict:
    path, records, read_image = job
    return write_shard(path, records, read_image)


@dataclass(frozen=True)
class ShardSet:
    """A manifest read back: shard paths and counts, in manifest order."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> ShardSet:
        """Open `path` (a manifest file or the folder holding one)."""
        path = Path(path)
        manifest_path = path / MANIFEST if path.is_dir() else path
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no shard manifest at {manifest_path} (write shards with `vastdet data shard`)"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a vastdet shard manifest")
        return cls(manifest_path.parent, manifest)

    @property
    def urls(self) -> list[str]:
        return [str(self.root / s["name"]) for s in self.manifest["shards"]]

    @property
    def samples_per_shard(self) -> list[int]:
        return [s["samples"] for s in self.manifest["shards"]]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def category_images(self) -> dict[int, int]:
        return {int(k): v for k, v in self.manifest["category_images"].items()}

    def verify(self) -> list[str]:
        """Names of shards whose bytes no longer match the manifest's sha256."""
        return [
            s["name"]
            for s in self.manifest["shards"]
            if file_sha256(self.root / s["name"]) != s["sha256"]
        ]
