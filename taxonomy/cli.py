"""`vastdet taxonomy ...`: build, convert, show and embed category hierarchies."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from taxonomy.formats import FORMATS, load_taxonomy, save_taxonomy

log = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    """Register the `taxonomy` command group on a parent argparse subparsers object."""
    group = subparsers.add_parser(
        "taxonomy", help="category hierarchies: build, convert, show, embed"
    )
    commands = group.add_subparsers(dest="taxonomy_command", required=True)

    build = commands.add_parser(
        "build",
        help="build a taxonomy from WordNet: the whole noun hierarchy, the hypernym closure of "
        "given synsets or words, or a dataset's categories linked to WordNet",
    )
    source = build.add_mutually_exclusive_group()
    source.add_argument(
        "--synsets",
        nargs="+",
        metavar="ITEM",
        help="synset names (cat.n.01), node ids (n02121620) or words (cat)",
    )
    source.add_argument("--synset-file", type=Path, help="a file with one ITEM per line")
    source.add_argument(
        "--under",
        nargs="+",
        metavar="ITEM",
        help="whole subtrees: the items and every hyponym below them are categories "
        "(mammal.n.01: 1,170)",
    )
    source.add_argument(
        "--link",
        type=Path,
        metavar="CATEGORIES",
        help="a dataset's categories (any taxonomy format) to link to WordNet",
    )
    build.add_argument(
        "--names",
        type=Path,
        help="with --link: a name list (line i names category i) overriding names",
    )
    build.add_argument(
        "--first-sense",
        action="store_true",
        help="with --link: take the most frequent sense of an ambiguous name",
    )
    build.add_argument(
        "--drop-unmatched",
        action="store_true",
        help="with --link: leave unmatched categories out of the taxonomy",
    )
    build.add_argument(
        "--report", type=Path, help="with --link: write the per-category link report (JSON)"
    )
    build.add_argument(
        "--categories",
        choices=("all", "given", "none"),
        default="given",
        help="which nodes get category ids (default: the given items; whole hierarchy: all)",
    )
    build.add_argument("-o", "--output", type=Path, required=True)
    build.add_argument("--format", choices=FORMATS, help="output format (default: from the suffix)")
    build.set_defaults(handler=_build)

    convert = commands.add_parser("convert", help="convert between taxonomy formats")
    convert.add_argument("input", type=Path)
    convert.add_argument("output", type=Path)
    convert.add_argument("--from", dest="from_format", choices=FORMATS, help="default: detected")
    convert.add_argument("--to", dest="to_format", choices=FORMATS, help="default: from the suffix")
    convert.set_defaults(handler=_convert)

    show = commands.add_parser("show", help="statistics and a tree view of a taxonomy file")
    show.add_argument("input", type=Path)
    show.add_argument("--format", choices=FORMATS)
    show.add_argument(
        "--root", action="append", help="draw the tree from this node id (repeatable)"
    )
    show.add_argument("--depth", type=int, default=3, help="tree depth to draw (default 3)")
    show.add_argument(
        "--max-children", type=int, default=8, help="children drawn per node (default 8)"
    )
    show.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    show.set_defaults(handler=_show)

    embed = commands.add_parser("embed", help="OpenCLIP text embeddings of every category")
    embed.add_argument("input", type=Path)
    embed.add_argument("--format", choices=FORMATS)
    embed.add_argument(
        "-o", "--output", type=Path, help="embedding file (reused if its key matches)"
    )
    embed.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/embeddings"),
        help="where keyed files go when no --output is given",
    )
    embed.add_argument(
        "--model", default="ViT-B-32", help="OpenCLIP model name (vastdet-tiny-clip for tests)"
    )
    embed.add_argument("--checkpoint", help="local OpenCLIP checkpoint file (none: random weights)")
    embed.add_argument(
        "--template",
        action="append",
        dest="templates",
        help="prompt template with one {} (repeatable; default: CLIP's 7 templates)",
    )
    embed.add_argument("--synonyms", action="store_true", help="average over synonyms too")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument(
        "--device", help="torch device (default: an accelerator if present, else cpu)"
    )
    embed.set_defaults(handler=_embed)


def _build(args: argparse.Namespace) -> int:
    from taxonomy.wordnet import build_wordnet_taxonomy

    if args.link:
        from taxonomy.link import link_to_wordnet

        categories = load_taxonomy(args.link)
        if args.names:
            names = load_taxonomy(args.names).category_names()
            categories = _renamed(categories, names)
        tax, report = link_to_wordnet(categories, args.first_sense, not args.drop_unmatched)
        counts = report.counts()
        print(
            f"linked {len(report.matched):,} of {len(report.links):,} categories: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
        )
        if args.report:
            args.report.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
            print(f"link report: {args.report}")
    else:
        items = args.synsets
        if args.synset_file:
            items = args.synset_file.read_text(encoding="utf-8").splitlines()
        if args.under:
            from taxonomy.wordnet import hyponym_closure

            items = hyponym_closure(args.under)
        mode = "all" if items is None and args.categories == "given" else args.categories
        tax = build_wordnet_taxonomy(items, categories=mode)
    save_taxonomy(tax, args.output, args.format)
    print(f"{tax!r} -> {args.output}")
    return 0


def _renamed(categories, names: dict[int, str]):
    from taxonomy.tree import Taxonomy

    cols = categories.columns()
    cols["names"] = [
        names.get(c, n) if c is not None else n
        for c, n in zip(cols["category_ids"], cols["names"], strict=True)
    ]
    return Taxonomy.from_columns(**cols, metadata=categories.metadata)


def _convert(args: argparse.Namespace) -> int:
    tax = load_taxonomy(args.input, args.from_format)
    save_taxonomy(tax, args.output, args.to_format)
    print(f"{tax!r} -> {args.output}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from taxonomy.show import format_stats, stats, tree_lines

    tax = load_taxonomy(args.input, args.format)
    values = stats(tax)
    if args.json:
        print(json.dumps(values))
        return 0
    print(f"{args.input}")
    print("\n".join(format_stats(values)))
    print()
    print("\n".join(tree_lines(tax, args.root, args.depth, args.max_children)))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from taxonomy.embeddings import DEFAULT_TEMPLATES, EmbeddingSpec, embed_categories

    tax = load_taxonomy(args.input, args.format)
    spec = EmbeddingSpec(
        model=args.model,
        checkpoint=args.checkpoint,
        templates=tuple(args.templates) if args.templates else DEFAULT_TEMPLATES,
        use_synonyms=args.synonyms,
        batch_size=args.batch_size,
        device=args.device,
    )
    result, path = embed_categories(tax, spec, args.output, args.cache_dir)
    shape = tuple(result.embeddings.shape)
    print(f"embeddings {shape} for {len(result.names):,} categories -> {path}")
    return 0
