"""`vastdet train`, `export`, `convert`, `plot`, `eval`, `predict`, `patterns` and
`pretrain-backbone`."""

from __future__ import annotations

import argparse
import math
import signal
from pathlib import Path

from taxonomy.files import NoSpaceError


def add_commands(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a detector (resumes from the run's newest checkpoint)"
    )
    train.add_argument("--config", required=True, help="a training YAML file")
    train.set_defaults(handler=_train)
    export = subparsers.add_parser("export", help="a run's checkpoint as one plain PyTorch file")
    export.add_argument("run_dir", type=Path)
    export.add_argument(
        "-o", "--output", type=Path, required=True,
        help="the model file: a PyTorch file, or safetensors when it ends in .safetensors",
    )  # fmt: skip
    export.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    export.set_defaults(handler=_export)
    convert = subparsers.add_parser(
        "convert", help="a released CQ-DINO checkpoint (RedAIGC/CQ-DINO) as a vastdet model file"
    )
    convert.add_argument("checkpoint", type=Path, help="the released .pth (mmdetection 3)")
    convert.add_argument(
        "--taxonomy", required=True,
        help="the categories in the release's row order, with their tree (for V3Det: "
        "`vastdet taxonomy convert v3det_2023_v1_category_tree.json`)",
    )  # fmt: skip
    convert.add_argument(
        "-o", "--output", type=Path, required=True,
        help="the model file: a PyTorch file, or safetensors when it ends in .safetensors",
    )  # fmt: skip
    convert.add_argument(
        "--report", type=Path, help="a JSON file accounting for every tensor (mapped or dropped)"
    )
    convert.set_defaults(handler=_convert)
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
    evaluate.add_argument("--protocol", choices=("coco", "v3det", "lvis"), default="coco")
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
    predict.add_argument(
        "--max-detections",
        type=int,
        help="detections kept per image (default: as many as `vastdet eval` keeps, 100)",
    )
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
    pretrain = subparsers.add_parser(
        "pretrain-backbone",
        help="pretrain a ResNet-18 on synthetic images of a vocabulary no benchmark uses",
    )
    from vastdet.engine.pretrain import add_arguments

    add_arguments(pretrain)
    pretrain.set_defaults(handler=_pretrain)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (SIGINT from Ctrl-C, SIGTERM from a scheduler)."""


def _raise_interrupted(signum, frame) -> None:
    raise TrainingInterrupted(signal.Signals(signum).name)


def _train(args: argparse.Namespace) -> int:
    from vastdet.engine.train import load_train_config, train

    cfg = load_train_config(args.config)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        summary = train(cfg)
    except KeyboardInterrupt as stop:
        print(interrupted_message(cfg.output_dir, args.config, str(stop) or "Ctrl-C"))
        return 130 if not str(stop) or str(stop) == "SIGINT" else 143
    except NoSpaceError as err:
        raise NoSpaceError(f"{err}: vastdet train --config {args.config}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if summary["rank"] == 0:
        print(training_summary(summary, cfg.output_dir))
    return 0


def interrupted_message(output_dir: str, config: str, why: str) -> str:
    """One line: what stopped training, the newest complete checkpoint and how to resume."""
    from vastdet.runtime.checkpoints import complete_tags

    tags = complete_tags(Path(output_dir) / "checkpoints")
    where = (
        f"the newest complete checkpoint is {Path(output_dir) / 'checkpoints' / tags[-1]}"
        if tags
        else "no checkpoint was complete yet, so a new run starts from step 0"
    )
    return f"training stopped ({why}); {where}; resume with: vastdet train --config {config}"


def training_summary(summary: dict, output_dir: str) -> str:
    """What a finished run did, in a few lines (its numbers are in metrics.jsonl)."""
    last = summary.get("last") or {}
    lines = [f"trained to step {summary['step']} in {output_dir}"]
    if "loss" in last:
        lines[0] += f"; last logged loss {last['loss']:.4f}"
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss): {summary['skipped_steps']}")
    evaluation = summary.get("eval")
    if evaluation:
        shown = [k for k in ("AP", "AP50", "AR100", "AR_C") if k in evaluation]
        numbers = ", ".join(f"{k} {evaluation[k]:.4f}" for k in shown)
        lines.append(f"evaluation: {numbers} ({Path(output_dir) / 'eval' / 'metrics.json'})")
    lines.append(
        f"charts: vastdet plot {output_dir}; model file: vastdet export {output_dir} -o FILE"
    )
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from vastdet.engine.export import export_checkpoint

    print(f"exported {export_checkpoint(args.run_dir, args.output, args.tag)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json

    from taxonomy import load_taxonomy
    from vastdet.config import from_dict, load_config, merged, preset_path, read_yaml
    from vastdet.engine.config import TrainConfig
    from vastdet.models.build import ModelConfig
    from vastdet.runtime.convert import convert_released
    from vastdet.runtime.loading import write_model_file

    # the released configs' recipe (V3Det's evaluation size and protocol) around the model
    recipe_path = preset_path("cq_dino_swin_b_v3det_stage2")
    categories = str(Path(args.taxonomy).resolve())
    data = {"data": {"train_shards": "(converted)", "categories": categories}}
    recipe = from_dict(TrainConfig, merged(read_yaml(recipe_path), data), str(recipe_path))
    base = load_config(preset_path("cq_dino_swin_b"), ModelConfig)
    done = convert_released(args.checkpoint, load_taxonomy(args.taxonomy), base)
    recipe.model, recipe.data.train_shards = done.model, ""  # no shards of ours trained it
    tag = f"converted from {args.checkpoint.name}"
    write_model_file(done.state, recipe.to_dict(), tag, args.output)
    if args.report:
        account = {"mapped": done.mapped, "dropped": done.dropped, "kept": done.kept}
        args.report.write_text(json.dumps(account, indent=1))
    print("\n".join(done.summary()))
    print(f"converted {args.checkpoint} to {args.output}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from vastdet.runtime.plot import plot_run

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
        args.max_detections,
    )
    print(f"{len(results)} detections in {len(args.images)} images written to {args.output}")
    if args.draw:
        print(f"{drawn} detections scored >= {args.threshold} and are drawn in {args.draw}")
        if not drawn and results:
            best = max(r["score"] for r in results)
            print(
                f"the best detection scored {best:.3f}: to draw the most confident ones, "
                f"lower the threshold, e.g. --threshold {lower_threshold(best)}"
            )
    return 0


def lower_threshold(best: float) -> float:
    """A drawing threshold just under the best score, rounded down to two decimals."""
    return max(0.01, math.floor(best * 100 - 1e-9) / 100 - 0.05)


def _patterns(args: argparse.Namespace) -> int:
    from vastdet.evaluation.pattern_maps import run_pattern_maps

    written, notes = run_pattern_maps(
        args.model, args.shards, args.output, args.categories, args.iou, args.score,
        limit=args.limit,
    )  # fmt: skip
    for path in written:
        print(path)
    for note in notes:
        print(note)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from vastdet.engine.pretrain import main_from_args

    record = main_from_args(args)
    held = record["held_out"]
    print(
        f"backbone written to {args.output} ({record['sha256'][:12]}...) in "
        f"{record['seconds']['total']} s: held-out box top-1 {held['box_top1']:.3f}, "
        f"image tagging AUC {held['image_auc']:.3f}"
    )
    return 0
