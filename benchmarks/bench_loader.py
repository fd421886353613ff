"""Training-loader throughput against the practical limit and a plain map-style loader.

    python benchmarks/bench_loader.py [--images 480] [--batches 250] [--batch 8] [--repeats 3]

Data: synthetic JPEGs (COCO-like sizes, 400-640 px) written once as files + COCO JSON and as
shards of the very same bytes. Measured in this run, on the same cores (2 loader processes):
- decode limit: two processes that each hold the JPEGs in memory and decode their half of the
  images with PIL in a tight loop (and, for reference, the same loop with torchvision's
  decoder, which the loader uses);
- ours: `pipelines.loader.train_loader` (resampled shards, shuffle buffer, decode, transforms,
  padded batches), first batch excluded (worker start-up);
- map-style: a torch `Dataset` over the JSON + image files with the same transforms and a
  `DataLoader` with 2 workers, first batch excluded.
Two transform settings: `decode only` (decode, boxes to cxcywh, padded batch: the loader's own
overhead) and `train recipe` (flip, multi-scale resize, crop branch at DINO's scales).

Also measured, decode only: ours with landscape and portrait images mixed in batches
(`group_by_aspect=False`), and a diagnostic that is not a loader: ours with the batch layout
skipped (`fill_batch` replaced by one that writes nothing, so pixels and mask are garbage),
the ceiling if laying out the padded batch cost nothing. The last column is the share of the
loaders' batch pixels that are image rather than padding.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from PIL import Image

import pipelines.loader
from pipelines.annotations import load_coco
from pipelines.loader import batch_views, collate, target_from_meta, train_loader
from pipelines.shards import FileImageReader, write_shards
from pipelines.synthetic import SynthConfig, write_coco
from pipelines.transforms import (
    TransformConfig,
    build_transforms,
    decode_image_bytes,
    no_augmentation,
)
from taxonomy import Node, Taxonomy

LIMIT = "decode limit: PIL decode loops, 2 processes"


def decode_pil(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return (image if image.mode == "RGB" else image.convert("RGB")).size


def decode_torchvision(data: bytes) -> tuple[int, ...]:
    return tuple(decode_image_bytes(data).shape)


_BLOBS: list[bytes] = []  # each pool process's own copy of the JPEGs (set by `_hold`)


def _hold(blobs: list[bytes]) -> None:
    _BLOBS[:] = blobs


def _decode_range(decode, start: int, stop: int) -> int:
    for i in range(start, stop):
        decode(_BLOBS[i % len(_BLOBS)])
    return stop - start


def decode_limit(decode, blobs: list[bytes], images: int) -> float:
    """Images/s of two processes that each hold the JPEGs and decode `images` between them in
    tight loops: only index ranges cross a pipe while the clock runs (32 ranges, so that
    neither process idles long at the end)."""
    with Pool(2, initializer=_hold, initargs=(blobs,)) as pool:
        pool.starmap(_decode_range, [(decode, 0, 8), (decode, 8, 16)])  # warm both up
        bounds = [images * k // 32 for k in range(33)]
        start = time.perf_counter()
        done = pool.starmap(
            _decode_range, [(decode, a, b) for a, b in zip(bounds, bounds[1:])], chunksize=1
        )
        return sum(done) / (time.perf_counter() - start)


class MapStyle(torch.utils.data.Dataset):
    """The plain baseline: one JSON record list, one file open per image."""

    def __init__(self, records, root: Path, transforms):
        self.records, self.root, self.transforms = records, root, transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        image = decode_image_bytes((self.root / r.file_name).read_bytes())
        return self.transforms(image, target_from_meta(r.sample_json()), random.Random(i))


def rate(loader, batches: int) -> tuple[float, float]:
    """(images/s, share of the batches' pixels that are image, not padding)."""
    it = iter(loader)
    next(it)  # worker start-up excluded
    start, images, pixels, padded = time.perf_counter(), 0, 0, 0
    for _ in range(batches):
        batch = next(it)
        images += len(batch.targets)
        pixels += sum(int(t["size"][0]) * int(t["size"][1]) for t in batch.targets)
        padded += batch.masks.numel()
    return images / (time.perf_counter() - start), pixels / padded


@contextlib.contextmanager
def batch_layout_skipped():
    """The loader with `fill_batch` writing nothing (workers are forked and inherit it)."""
    fill = pipelines.loader.fill_batch
    pipelines.loader.fill_batch = lambda buffer, images, shape: batch_views(buffer, shape)
    try:
        yield
    finally:
        pipelines.loader.fill_batch = fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--batches", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tax = Taxonomy(
        [Node("r", "root", category_id=1)]
        + [Node(f"c{i}", f"c{i}", ("r",), i) for i in range(2, 201)]
    )
    cfg = SynthConfig(num_train=args.images, num_val=0, min_side=400, max_side=640, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco = write_coco(tax, cfg, root / "coco")["train"]
        records, _ = load_coco(coco, root / "coco" / "images")
        write_shards(
            records,
            FileImageReader(root / "coco" / "images"),
            root / "shards",
            max_samples=64,
            progress=False,
        )
        blobs = [(root / "coco" / "images" / r.file_name).read_bytes() for r in records]
        images = args.batches * args.batch

        def ours(transforms, group_by_aspect=True):
            loader = train_loader(
                root / "shards",
                args.batch,
                args.batches + 1,
                transforms,
                shuffle_buffer=200,
                repeat_threshold=None,
                num_workers=2,
                rank=0,
                world_size=1,
                group_by_aspect=group_by_aspect,
            )
            return rate(loader, args.batches)

        def ours_without_layout(transforms):
            with batch_layout_skipped():
                return ours(transforms)

        def plain(transforms):
            loader = torch.utils.data.DataLoader(
                MapStyle(records, root / "coco" / "images", transforms),
                batch_size=args.batch,
                shuffle=True,
                num_workers=2,
                collate_fn=collate,
            )
            return rate(_cycle(loader), args.batches)

        decode_only, recipe = no_augmentation(), build_transforms(TransformConfig(), True)
        rows = {  # name -> (measure, baseline row for the map-style column)
            LIMIT: (lambda: (decode_limit(decode_pil, blobs, images), None), None),
            "torchvision decode loops (the loader's decoder), 2 processes": (
                lambda: (decode_limit(decode_torchvision, blobs, images), None),
                None,
            ),
            "ours, decode only": (lambda: ours(decode_only), "map-style over files, decode only"),
            "ours, decode only, orientations mixed in batches": (
                lambda: ours(decode_only, group_by_aspect=False),
                "map-style over files, decode only",
            ),
            "diagnostic: ours, decode only, batch layout skipped": (
                lambda: ours_without_layout(decode_only),
                None,
            ),
            "map-style over files, decode only": (lambda: plain(decode_only), None),
            "ours, train recipe": (lambda: ours(recipe), "map-style over files, train recipe"),
            "map-style over files, train recipe": (lambda: plain(recipe), None),
        }
        # every row once per round, rounds repeated: the machine's speed drifts by tens of
        # percent over minutes, so ratios are taken within a round and their median reported
        runs: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (measure, _) in rows.items():
                runs[name].append(measure())
    print(
        f"{args.images} JPEGs 400-640 px, batch {args.batch}, {args.batches} timed batches, "
        f"2 CPU cores; medians over {args.repeats} rounds (ratios taken within each round)\n"
    )
    print(
        "| loader | images/s | vs decode limit | vs map-style (same transforms) "
        "| image share of batch pixels |"
    )
    print("|---|---|---|---|---|")
    rates = {name: [r for r, _ in runs[name]] for name in rows}
    for name, (_, baseline) in rows.items():
        vs_limit = statistics.median(a / b for a, b in zip(rates[name], rates[LIMIT]))
        vs_plain = (
            f"{statistics.median(a / b for a, b in zip(rates[name], rates[baseline])):.2f}x"
            if baseline
            else "-"
        )
        share = runs[name][0][1]
        share = "-" if share is None else f"{statistics.median(s for _, s in runs[name]):.2f}"
        print(
            f"| {name} | {statistics.median(rates[name]):.1f} | {vs_limit:.2f} | {vs_plain} "
            f"| {share} |"
        )


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
