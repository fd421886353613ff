"""The whole path at 10^5 and 10^6 categories on one box, phase by phase, with the commands a
user types: a synthetic tree file, `taxonomy embed`, `data synth`, CQ-DINO stage 1 and stage 2
(with its evaluation), `eval --levels`, `export` and `predict`, each phase's wall time and the
peak resident memory of its process (and the processes it waited for).

    python benchmarks/bench_million.py [--sizes 100000 1000000] [--steps 20]
        [--workdir runs/million] [--selection flat]

Tiny presets, batch 2, 112 px images, 440 synthetic images (400 train, 40 val), `--steps` steps a
stage, one process per phase, so each phase's peak is its own (`os.wait4`'s `ru_maxrss`). The
tree is 10-way (category i's parent is (i - 1) // 10), written in vastdet's format. Target: no
phase above 8 GB. `--selection beam` trains and evaluates with taxonomy-guided selection.
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

ROOT = Path(__file__).resolve().parent.parent


def measured(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak GiB) of one command, its output in `log`; fails loudly."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20


def write_tree(path: Path, n: int) -> None:
    from taxonomy import Taxonomy, save_taxonomy

    ids = [f"n{i}" for i in range(n)]
    parents = [[] if i == 0 else [f"n{(i - 1) // 10}"] for i in range(n)]
    tax = Taxonomy.from_columns(
        ids, [f"category {i}" for i in range(n)], parents, list(range(1, n + 1)),
        [()] * n, [""] * n, [None] * n,
    )  # fmt: skip
    save_taxonomy(tax, path)


def stage_config(work: Path, name: str, model: dict, steps: int, val: bool) -> Path:
    data = work / "data" / "shards"
    cfg = {
        "model": model,
        "data": {
            "train_shards": str(data / "train"),
            "val_shards": str(data / "val") if val else None,
            "categories": str(work / "tree.json"),
            "batch_size": 2,
            "num_workers": 1,
            "shuffle_buffer": 50,
            "transforms": {"scales": [112], "max_size": 112, "crop_resize": [], "eval_size": 112},
        },
        "optim": {"lr": 1e-4, "clip_grad": 1.0},
        "steps": steps,
        "checkpoint_every": steps,
        "log_every": max(steps // 4, 1),
        "eval": {"batch_size": 2, "num_workers": 1},
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def phases(work: Path, n: int, steps: int, selection: str) -> list[tuple[str, list[str] | None]]:
    cli = [sys.executable, "-m", "vastdet.cli"]
    model = {
        "preset": "cq_dino_tiny", "category_embeddings": str(work / "embeddings.pt"),
        "selection": selection,
    }  # fmt: skip
    stage1 = stage_config(work, "stage1", {**model, "architecture": "cq_selector"}, steps, False)
    stage2 = stage_config(work, "stage2", {**model, "init_from": str(work / "stage1")}, steps, True)
    image = work / "predict.jpg"
    return [
        ("tree file", None),
        ("taxonomy embed", cli + [
            "taxonomy", "embed", str(work / "tree.json"), "--model", "vastdet-tiny-clip",
            "--template", "a photo of a {}.", "-o", str(work / "embeddings.pt"),
        ]),
        ("data synth", cli + [
            "data", "synth", "--taxonomy", str(work / "tree.json"), "-o", str(work / "data"),
            "--train", "400", "--val", "40", "--min-side", "96", "--max-side", "128",
            "--shards",
        ]),
        ("stage 1", cli + ["train", "--config", str(stage1)]),
        ("stage 2 + its evaluation", cli + ["train", "--config", str(stage2)]),
        ("eval --levels 2,4,6", cli + [
            "eval", str(work / "stage2"), "--shards", str(work / "data" / "shards" / "val"),
            "-o", str(work / "eval"), "--levels", "2,4,6",
        ]),
        ("export", cli + ["export", str(work / "stage2"), "-o", str(work / "model.pt")]),
        ("data images", cli + [
            "data", "images", str(work / "data" / "shards" / "val"), "-o", str(image.parent /
            "images"), "--count", "1",
        ]),
        ("predict", cli + [
            "predict", "--checkpoint", str(work / "model.pt"), "IMAGE", "-o",
            str(work / "predictions.json"),
        ]),
    ]  # fmt: skip


def folder_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_size(n: int, args) -> list[dict]:
    work = args.workdir / f"c{n}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    for name, cmd in phases(work, n, args.steps, args.selection):
        log = work / f"{name.split()[0]}_{len(rows)}.log"
        if cmd is None:
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # the tree in a process of its own, so its peak is its own
                write_tree(work / "tree.json", n)
                os._exit(0)
            _, status, usage = os.wait4(pid, 0)
            seconds, peak = time.perf_counter() - start, usage.ru_maxrss / 2**20
        else:
            if "IMAGE" in cmd:
                image = sorted((work / "images").glob("*.jpg"))[0]
                cmd = [str(image) if c == "IMAGE" else c for c in cmd]
            seconds, peak = measured(cmd, log, env)
        rows.append({"categories": n, "phase": name, "seconds": seconds, "peak_gb": peak})
        print(f"| {n:,} | {name} | {seconds:.1f} | {peak:.2f} |", flush=True)
    sizes = {
        "checkpoint folder, stage 2": folder_mb(work / "stage2" / "checkpoints"),
        "exported model": folder_mb(work / "model.pt"),
        "embedding file": folder_mb(work / "embeddings.pt"),
    }
    for what, mb in sizes.items():
        print(f"| {n:,} | {what} | {mb:,.0f} MB | |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("runs/million"))
    parser.add_argument("--selection", choices=("flat", "beam"), default="flat")
    args = parser.parse_args()
    print("| categories | phase | seconds | peak GB |")
    print("|---|---|---|---|")
    results = [row for n in args.sizes for row in run_size(n, args)]
    (args.workdir / "million.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
