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
from pathlib import Path, PurePosixPath

from pipelines.annotations import (
    AnnotationError,
    CheckReport,
    ImageRecord,
    Problem,
    image_kind,
    image_path,
)
from pipelines.parallel import map_jobs
from taxonomy.files import atomic_output, file_sha256

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vastdet.shards/1"


def check_shard_name(name, manifest: Path) -> str:
    """A shard's name in a manifest must be a plain relative file name inside the manifest's
    folder. A name is data from a file: a `pipe:` name would run a command when the shards
    are opened, an absolute or `..` name would read outside the folder. URLs and pipes are for
    the user's own config or command line."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (
        not parts
        or ":" in name
        or "\\" in name
        or PurePosixPath(name).is_absolute()
        or ".." in parts
        or name.startswith("~")
    ):
        raise ValueError(
            f"{manifest}: shard name {name!r} is not a plain file name inside the manifest's "
            "folder (no scheme such as pipe: or s3://, no absolute path, no '..'); "
            "refusing to open it"
        )
    return name


def sample_key(image_id: int) -> str:
    """The `__key__` of an image's sample: no dots (a dot breaks webdataset's grouping)."""
    return f"{image_id:012d}"


class FileImageReader:
    """Reads an image's bytes from `root / file_name` (picklable for worker processes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __call__(self, record: ImageRecord) -> bytes:
        return image_path(self.root, record.file_name).read_bytes()

    def size(self, record: ImageRecord) -> int:
        return image_path(self.root, record.file_name).stat().st_size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def image_problem(data: bytes, record: ImageRecord) -> Problem | None:
    """Why an image's bytes cannot go into a shard, or None: not JPEG or PNG, not decodable
    (a file that passes the magic-byte check may still be truncated or corrupt), or a size
    other than the annotation file's (its boxes were checked against that size)."""
    from pipelines.transforms import decode_image_bytes

    where = record.file_name
    if image_kind(data[:8]) is None:
        return Problem(where, record.image_id, "not an image", "neither JPEG nor PNG")
    try:
        _, height, width = decode_image_bytes(data).shape
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds
        return Problem(where, record.image_id, "undecodable image", str(err).splitlines()[0])
    if (width, height) != (record.width, record.height):
        return Problem(
            where,
            record.image_id,
            "image size mismatch",
            f"the annotations say {record.width}x{record.height}, the file is {width}x{height}",
        )
    return None


def write_shard(
    path: Path,
    records: Sequence[ImageRecord],
    read_image: Callable[[ImageRecord], bytes],
    on_error: str = "raise",
) -> tuple[dict, list[Problem]]:
    """Write one shard (atomically); returns its manifest entry and the images left out.

    Every image is decoded once on the way in (`image_problem`): `on_error="raise"` stops at
    the first bad one, naming it; `"skip"` leaves it out and reports it."""
    problems, written = [], 0
    with atomic_output(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            data = read_image(record)
            problem = image_problem(data, record)
            if problem is not None:
                if on_error == "raise":
                    raise AnnotationError(f"{problem} (pass on_error='skip' to leave it out)")
                problems.append(problem)
                continue
            key = sample_key(record.image_id)
            _add_member(tar, f"{key}.{image_kind(data[:8])}", data)
            _add_member(tar, f"{key}.json", json.dumps(record.sample_json()).encode())
            written += 1
    entry = {
        "name": path.name,
        "samples": written,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }
    return entry, problems


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
    on_error: str = "raise",
) -> dict:
    """Write all shards and the manifest; returns the manifest. Images that do not decode or
    whose size is not the record's stop the writing (`on_error="raise"`) or are left out and
    counted in `check_report` and the manifest's `skipped` (`"skip"`)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [read_image.size(r) for r in records] if hasattr(read_image, "size") else None
    plans = plan_shards(sizes, len(records), max_samples, max_bytes)
    width = max(6, len(str(len(plans))))
    paths = [out / f"{prefix}-{k:0{width}d}.tar" for k in range(len(plans))]
    jobs = [(p, [records[i] for i in plan], read_image, on_error) for p, plan in zip(paths, plans)]
    bar = tqdm(
        total=len(records), desc=f"writing {len(plans)} shards", unit="img", disable=not progress
    )
    entries, left_out = [], set()
    for entry, problems in map_jobs(_write_job, jobs, workers):
        bar.update(entry["samples"] + len(problems))
        left_out.update(p.image_id for p in problems)
        if check_report is not None:
            check_report.problems.extend(problems)
        if entry["samples"]:
            entries.append(entry)
        else:  # every image of this shard was left out
            (out / entry["name"]).unlink()
    bar.close()
    if left_out:
        records = [r for r in records if r.image_id not in left_out]
    instances, images = category_histograms(records)
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "num_samples": sum(e["samples"] for e in entries),
        "num_instances": sum(instances.values()),
        "shards": entries,
        "category_instances": {str(k): v for k, v in instances.items()},
        "category_images": {str(k): v for k, v in images.items()},
        # relative to the manifest, so that the folder can move with its category file
        "categories_file": os.path.relpath(categories_file, out) if categories_file else None,
        "categories_file_sha256": file_sha256(categories_file) if categories_file else None,
        "skipped": check_report.counts() if check_report else {},
    }
    with atomic_output(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_job(job) -> tuple[dict, list[Problem]]:
    return write_shard(*job)


@dataclass(frozen=True)
class ShardSet:
    """A manifest read back: shard paths and counts, in manifest order."""

    root: Path | str  # the manifest's folder: a path, or a URL
    manifest: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> ShardSet:
        """Open `path`: a manifest file or the folder holding one, on this machine or at a URL
        (`pipelines.sources`; a URL names the manifest itself or its folder)."""
        from pipelines import sources

        text = os.fspath(path)
        local = sources.local_path(text)
        if local is not None:
            manifest_path = str(local / MANIFEST if local.is_dir() else local)
        else:
            manifest_path = text if text.endswith(".json") else sources.join(text, MANIFEST)
        try:
            raw = sources.read_bytes(manifest_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no shard manifest at {manifest_path} (write shards with `vastdet data shard`)"
            ) from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{manifest_path}: not a JSON manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a vastdet shard manifest")
        for entry in manifest.get("shards", []):
            check_shard_name(entry.get("name") if isinstance(entry, dict) else entry, manifest_path)
        root = sources.parent(manifest_path)
        return cls(Path(root) if local is not None else root, manifest)

    @property
    def remote(self) -> bool:
        """True when the shards are read from a URL."""
        return isinstance(self.root, str)

    def location(self, name: str) -> str:
        from pipelines import sources

        return sources.join(self.root, name)

    @property
    def categories_file(self) -> Path | None:
        """The category file the shards were written against (recorded relative to the
        manifest; manifests from before that recorded it relative to the writer's folder).
        Beside a manifest at a URL, it is fetched into the local cache."""
        from pipelines import sources

        recorded = self.manifest.get("categories_file")
        if not recorded:
            return None
        if self.remote:
            return sources.local_copy(self.location(recorded))
        beside = self.root / recorded
        return beside if beside.exists() or not Path(recorded).exists() else Path(recorded)

    @property
    def urls(self) -> list[str]:
        return [self.location(s["name"]) for s in self.manifest["shards"]]

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
            if source_sha256(self.location(s["name"])) != s["sha256"]
        ]


def source_sha256(location: str, chunk: int = 1 << 22) -> str:
    """sha256 of the bytes at a path or URL, streamed in chunks (shards can be gigabytes)."""
    import hashlib

    from pipelines.sources import open_source

    digest = hashlib.sha256()
    with open_source(location) as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()
