"""`vastdet train`, `vastdet export`, `vastdet plot`."""

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
