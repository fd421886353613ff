"""`vastdet data ...`: synthesise datasets, write shards, inspect shard sets."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from pipelines.annotations import BOX_POLICIES, ON_ERROR


def add_commands(subparsers) -> None:
    """Register the `data` command group on a parent argparse subparsers object."""
    from pipelines.synthetic import SUBSAMPLING

    group = subparsers.add_parser("data", help="datasets: synthesise, shard, inspect")
    commands = group.add_subparsers(dest="data_command", required=True)

    synth = commands.add_parser("synth", help="a synthetic vast-vocabulary dataset from a taxonomy")
    synth.add_argument(
        "--taxonomy", type=Path, required=True, help="any taxonomy file: its categories are drawn"
    )
    synth.add_argument("-o", "--output", type=Path, required=True)
    synth.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    synth.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    synth.add_argument("--min-side", type=int, default=192)
    synth.add_argument("--max-side", type=int, default=320)
    synth.add_argument("--max-objects", type=int, default=6)
    synth.add_argument(
        "--zipf", type=float, default=1.1, help="Zipf exponent of category frequencies"
    )
    synth.add_argument(
        "--histogram",
        type=Path,
        help="category frequencies instead of Zipf: a JSON list of {id, instance_count} "
        "(V3Det's cat_info file) or an object {category id: count}",
    )
    synth.add_argument(
        "--jpeg-subsampling",
        default="4:2:0",
        choices=SUBSAMPLING,
        help="JPEG chroma subsampling (default 4:2:0; 4:4:4 keeps small objects' colour texture)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--shards",
        action="store_true",
        help="write shards straight away (OUTPUT/shards/{train,val}) instead of COCO + JPEG files",
    )
    synth.add_argument(
        "--max-samples", type=int, default=1000, help="images per shard with --shards"
    )
    synth.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    synth.set_defaults(handler=_synth)

    shard = commands.add_parser(
        "shard", help="COCO/V3Det annotations + images -> webdataset shards"
    )
    shard.add_argument(
        "--annotations", type=Path, required=True, help="COCO-format annotation JSON"
    )
    shard.add_argument(
        "--images", type=Path, required=True, help="image root the file_names resolve against"
    )
    shard.add_argument(
        "-o", "--output", type=Path, required=True, help="folder for shards + manifest.json"
    )
    shard.add_argument(
        "--taxonomy",
        type=Path,
        help="category file the vocabulary comes from (default: the annotation file's categories)",
    )
    shard.add_argument("--prefix", default="shard")
    shard.add_argument("--max-samples", type=int, default=1000)
    shard.add_argument("--max-bytes", type=int, default=1 << 30)
    shard.add_argument(
        "--box-policy",
        choices=BOX_POLICIES,
        default="clip",
        help="boxes past the image edge: clip them (default) or reject them",
    )
    shard.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="raise",
        help="bad annotations: stop with the list (default) or skip and count them",
    )
    shard.add_argument("--workers", type=int, default=2)
    shard.set_defaults(handler=_shard)

    inspect = commands.add_parser("inspect", help="counts, category histogram and a PNG of samples")
    inspect.add_argument("shards", type=Path, help="a shard folder or its manifest.json")
    inspect.add_argument(
        "--taxonomy", type=Path, help="for category names (default: the manifest's category file)"
    )
    inspect.add_argument(
        "--png", type=Path, help="write a picture of the first samples with boxes and names"
    )
    inspect.add_argument("--count", type=int, default=8)
    inspect.add_argument("--verify", action="store_true", help="check every shard's sha256")
    inspect.set_defaults(handler=_inspect)

    images = commands.add_parser(
        "images", help="the first images of a shard set as files (e.g. to try `vastdet predict`)"
    )
    images.add_argument("shards", type=Path, help="a shard folder or its manifest.json")
    images.add_argument("-o", "--output", type=Path, required=True, help="folder for the files")
    images.add_argument("--count", type=int, default=4, help="how many (default 4)")
    images.set_defaults(handler=_images)


def _histogram(path: Path) -> dict[int, float]:
    doc = json.loads(path.read_text())
    if isinstance(doc, list):
        return {int(c["id"]): float(c.get("instance_count", c.get("count", 0))) for c in doc}
    return {int(k): float(v) for k, v in doc.items()}


def _synth(args: argparse.Namespace) -> int:
    from pipelines.shards import write_shards
    from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records, write_coco
    from taxonomy import load_taxonomy

    tax = load_taxonomy(args.taxonomy)
    cfg = SynthConfig(
        num_train=args.train,
        num_val=args.val,
        min_side=args.min_side,
        max_side=args.max_side,
        max_objects=args.max_objects,
        zipf_exponent=args.zipf,
        jpeg_subsampling=args.jpeg_subsampling,
        seed=args.seed,
    )
    histogram = _histogram(args.histogram) if args.histogram else None
    if not args.shards:
        for split, path in write_coco(tax, cfg, args.output, histogram, args.workers).items():
            print(f"{split}: {path} (images under {args.output / 'images'})")
        return 0
    renderer = SyntheticRenderer(tax, cfg)
    for split, records in make_records(tax, cfg, histogram).items():
        out = args.output / "shards" / split
        manifest = write_shards(
            records,
            renderer,
            out,
            prefix=split,
            max_samples=args.max_samples,
            workers=args.workers,
            source=f"synthetic seed {args.seed}",
            categories_file=args.taxonomy,
        )
        print(
            f"{split}: {manifest['num_samples']:,} images, {manifest['num_instances']:,} boxes, "
            f"{len(manifest['shards'])} shards -> {out}"
        )
    return 0


def _shard(args: argparse.Namespace) -> int:
    from pipelines.annotations import load_coco
    from pipelines.shards import FileImageReader, write_shards
    from taxonomy import load_taxonomy

    vocabulary = (
        set(load_taxonomy(args.taxonomy).category_ids().tolist()) if args.taxonomy else None
    )
    records, report = load_coco(
        args.annotations, args.images, vocabulary, args.box_policy, args.on_error
    )
    manifest = write_shards(
        records,
        FileImageReader(args.images),
        args.output,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        workers=args.workers,
        source=str(args.annotations),
        categories_file=args.taxonomy or args.annotations,
        check_report=report,
        on_error=args.on_error,
    )
    for kind, count in report.counts().items():
        print(f"skipped {count:,} x {kind}")
    print(
        f"{manifest['num_samples']:,} images, {manifest['num_instances']:,} boxes, "
        f"{len(manifest['shards'])} shards -> {args.output}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipelines.preview import draw_samples, summary
    from pipelines.shards import ShardSet
    from taxonomy import load_taxonomy

    shards = ShardSet.open(args.shards)
    names_file = args.taxonomy or shards.categories_file
    names = (
        load_taxonomy(names_file).category_names()
        if names_file and Path(names_file).is_file()
        else None
    )
    print("\n".join(summary(shards, names)))
    if args.verify:
        bad = shards.verify()
        print("sha256: all shards match" if not bad else f"sha256 MISMATCH: {', '.join(bad)}")
        if bad:
            return 1
    if args.png:
        skipped: Counter = Counter()
        drawn = draw_samples(shards, args.png, names, args.count, skipped=skipped)
        print(f"samples drawn to {drawn}")
        if skipped:
            print("unreadable, skipped: " + ", ".join(f"{k} {n}" for k, n in skipped.items()))
    return 0


def _images(args: argparse.Namespace) -> int:
    from pipelines.preview import write_images
    from pipelines.shards import ShardSet

    written = write_images(ShardSet.open(args.shards), args.output, args.count)
    print(" ".join(str(p) for p in written))
    return 0
