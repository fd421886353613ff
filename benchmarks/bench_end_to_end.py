"""End to end with the user's commands: a WordNet subtree taxonomy, a synthetic dataset over it,
`vastdet train`, `vastdet eval`, and a random-box baseline scored by the same evaluator.

    python benchmarks/bench_end_to_end.py [--under vehicle.n.01] [--model dino_tiny]
        [--steps 1500] [--train 2000] [--val 200] [--workdir runs/e2e]

The baseline gives every val image 100 boxes of random position and size (the synthetic
dataset's size range) with categories drawn from the training frequencies and random scores: the
AP a detector that learned nothing about the images would get. Stages already done in
`--workdir` (taxonomy, data) are reused; a finished training run resumes as complete.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vastdet.evaluation.baseline import random_baseline as baseline_metrics
from vastdet.evaluation.coco import STAT_NAMES


def run(args: list[str], env: dict | None = None, log: Path | None = None) -> float:
    """Run a `vastdet` command (with `env` added to the environment, its output appended to
    `log` when given); its wall time in seconds."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "vastdet.cli", *args]
    environ = {**os.environ, **(env or {})}
    if log is None:
        subprocess.run(command, check=True, env=environ)
    else:
        with open(log, "a") as out:
            subprocess.run(command, check=True, env=environ, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def prepare(work: Path, under: str, train: int, val: int) -> tuple[Path, Path]:
    """(taxonomy file, data folder with shards/{train,val}), made when missing."""
    work.mkdir(parents=True, exist_ok=True)
    tax = work / "taxonomy.json"
    if not tax.is_file():
        run(["taxonomy", "build", "--under", under, "-o", str(tax)])
    data = work / "data"
    if not (data / "shards" / "val" / "manifest.json").is_file():
        run(
            ["data", "synth", "--taxonomy", str(tax), "-o", str(data), "--shards"]
            + ["--train", str(train), "--val", str(val), "--min-side", "160"]
            + ["--max-side", "240", "--max-objects", "4", "--max-samples", "500"]
        )
    return tax, data


def train_config(
    work: Path,
    name: str,
    model,
    tax: Path,
    data: Path,
    steps: int,
    batch: int,
    lr: float,
    param_groups: list[dict] | None = None,
) -> Path:
    """A single-process training YAML for `vastdet train` (eval at the end is `vastdet eval`)."""
    config = {
        "model": model,
        "data": {
            "train_shards": str(data / "shards" / "train"),
            "categories": str(tax),
            "batch_size": batch,
            "num_workers": 1,
            "shuffle_buffer": 200,
            "transforms": {
                "scales": [160, 176, 192, 208, 224],
                "max_size": 320,
                "crop_resize": [],
                "eval_size": 192,
            },
        },
        "optim": {
            "lr": lr,
            "clip_grad": 0.1,
            "decay_steps": [int(steps * 0.8)],
            **({"param_groups": param_groups} if param_groups is not None else {}),
        },
        "steps": steps,
        "steps_per_epoch": 500,
        "zero_stage": 0,
        "log_every": 5 if steps < 100 else 25,
        "checkpoint_every": max(steps // 3, 1),
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate_run(run_dir: Path, data: Path) -> dict:
    out = run_dir / "eval_val"
    run(["eval", str(run_dir), "--shards", str(data / "shards" / "val"), "-o", str(out)])
    return json.loads((out / "metrics.json").read_text())


def random_baseline(tax: Path, data: Path, levels: tuple[int, ...] = ()) -> dict:
    """The random-box baseline (`vastdet.evaluation.baseline`) on the val shards."""
    from taxonomy import load_taxonomy

    taxonomy = load_taxonomy(tax)
    return baseline_metrics(
        data / "shards" / "val", data / "shards" / "train", taxonomy.category_ids().tolist(),
        taxonomy, levels,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--under", default="vehicle.n.01")
    parser.add_argument("--model", default="dino_tiny")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("runs/e2e"))
    args = parser.parse_args()
    work = args.workdir
    tax, data = prepare(work, args.under, args.train, args.val)
    name = f"run_{args.model}"
    config_file = train_config(
        work, name, args.model, tax, data, args.steps, args.batch_size, args.lr
    )
    times = {"train": run(["train", "--config", str(config_file)])}
    start = time.perf_counter()
    model = evaluate_run(work / name, data)
    times["eval"] = time.perf_counter() - start
    run(["plot", str(work / name)])
    baseline = random_baseline(tax, data)
    print(f"\n{len(_category_ids(tax))} categories, {model['images']} val images")
    print(f"{'metric':<8} {args.model:>12} {'random boxes':>14}")
    for metric in STAT_NAMES[:6] + ("AR100",):
        print(f"{metric:<8} {model[metric]:12.4f} {baseline[metric]:14.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


def _category_ids(path: Path) -> list[int]:
    from taxonomy import load_taxonomy

    return load_taxonomy(path).category_ids().tolist()


if __name__ == "__main__":
    main()
