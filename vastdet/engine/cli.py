"""`vastdet train`, `export`, `plot`, `eval`, `predict` and `patterns`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a detector (resumes from the run's newest checkpoint)"
    )
    train.add_argument("--config", required=True, help="a training YAML file")
    train.set_defaults(handler=_train)
    export = subparsers.add_parser("export", help="a run's checkpoint as one plain PyTorch file")
    export.add_argument("run_dir", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    export.set_defaults(handler=_export)
    plot = subparsers.add_parser("plot", help="PNG charts of a run's metrics")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument(
        "-o", "--output", type=Path, help="folder for the PNGs (default RUN_DIR/plots)"
    )
    plot.set_defaults(handler=_plot)
    evaluate = subparsers.add_parser(
        "eval", help="evaluate a trained model on val shards (any launcher; rank 0 scores)"
    )
    evaluate.add_argument("model", type=Path, help="an exported model file or a run folder")
    evaluate.add_argument("--shards", required=True, help="val shard folder or manifest")
    evaluate.add_argument("-o", "--output", type=Path, required=True, help="folder for the results")
    evaluate.add_argument("--protocol", choices=("coco", "v3det"), default="coco")
    evaluate.add_argument("--categories", help="category/taxonomy file (default: the run's)")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument(
        "--levels",
        type=lambda text: [int(d) for d in text.split(",")],
        default=[],
        help="hierarchy depths to also score AP at, comma-separated (e.g. 2,4,6)",
    )
    evaluate.add_argument(
        "--train-shards", help="training manifest for APr/APc/APf (default: the run's)"
    )
    evaluate.add_argument(
        "--allow-partial",
        action="store_true",
        help="score even if fewer images were read than the shards list (default: fail)",
    )
    evaluate.set_defaults(handler=_eval)
    predict = subparsers.add_parser("predict", help="detect objects in image files")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument(
        "--checkpoint", type=Path, required=True, help="exported file or run folder"
    )
    predict.add_argument("-o", "--output", type=Path, required=True, help="results JSON")
    predict.add_argument("--draw", type=Path, help="folder for PNGs with the detections drawn")
    predict.add_argument("--threshold", type=float, default=0.3, help="drawing score threshold")
    predict.add_argument("--categories", help="category file for names (default: the run's)")
    predict.add_argument("--batch-size", type=int, default=2)
    predict.set_defaults(handler=_predict)
    patterns = subparsers.add_parser(
        "patterns", help="PaQ-DETR: figures of the dynamic pattern weights W^D (Fig. 5 and 6)"
    )
    patterns.add_argument("model", type=Path, help="an exported model file or a run folder")
    patterns.add_argument("--shards", required=True, help="val shard folder or manifest")
    patterns.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    patterns.add_argument(
        "--categories",
        type=lambda text: [int(c) for c in text.split(",")],
        help="category ids to draw, comma-separated (default: the 3 most frequent)",
    )
    patterns.add_argument("--iou", type=float, default=0.7, help="a success's IoU (paper: 0.7)")
    patterns.add_argument("--score", type=float, default=0.5, help="and score (paper: 0.5)")
    patterns.add_argument("--limit", type=int, help="at most this many images")
    patterns.set_defaults(handler=_patterns)


def _train(args: argparse.Namespace) -> int:
    from vastdet.engine.train import train

    summary = train(args.config)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


def _export(args: argparse.Namespace) -> int:
    from vastdet.engine.export import export_checkpoint

    print(f"exported {export_checkpoint(args.run_dir, args.output, args.tag)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from vastdet.engine.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vastdet.evaluation.runner import EvalConfig, format_metrics, run_eval

    cfg = EvalConfig(args.protocol, args.batch_size, args.workers, args.allow_partial, args.levels)
    metrics = run_eval(
        args.model, args.shards, args.output, cfg, args.categories, args.train_shards
    )
    if metrics is not None:
        print(format_metrics(metrics))
        print(f"results in {args.output}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vastdet.evaluation.predict import predict_images

    results, drawn = predict_images(
        args.checkpoint,
        args.images,
        args.output,
        args.draw,
        args.batch_size,
        args.threshold,
        args.categories,
    )
    print(f"{len(results)} detections in {len(args.images)} images written to {args.output}")
    if args.draw:
        print(f"{drawn} detections scored >= {args.threshold} and are drawn in {args.draw}")
    return 0


def _patterns(args: argparse.Namespace) -> int:
    from vastdet.evaluation.pattern_maps import run_pattern_maps

    for path in run_pattern_maps(
        args.model, args.shards, args.output, args.categories, args.iou, args.score,
        limit=args.limit,
    ):  # fmt: skip
        print(path)
    return 0
