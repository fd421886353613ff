"""Trainer efficiency: the engine's images/s against a bare forward-backward-step loop of the
same model and batch, in the same command, and the share of step time spent waiting for data.

    python benchmarks/bench_trainer.py [--model dino_tiny] [--batch 4] [--size 128]
        [--steps 60] [--repeats 3] [--workdir /tmp/bench_trainer]

Rows:
- bare loop, 1 process: the model, AdamW and pre-collated batches held in memory, cycled;
  forward, losses, backward, clip, step; nothing else (no DeepSpeed, no loader, no logging);
- engine, 1 process: `vastdet train` on shards of the same images (DeepSpeed stage 0, one loader
  worker at its default niceness), images/s as logged (start-up and the first interval left
  out), and the data-wait share of the wall time; once with the workers at the trainer's
  priority (`data.worker_nice: 0`);
- bare loop and engine with 2 ranks (ZeRO-2 for the engine): two processes on the two cores.

Every row runs once per round, the rounds one after another; the table gives medians over the
rounds and the ratio to the same round's bare loop (this machine's speed drifts by 10-25%
between minutes, so ratios across rounds would measure the drift).

Threads and memory: every process takes its share (`vastdet.engine.threads`: CPUs / processes
on the node) and keeps freed memory for reuse (`keep_freed_memory`), the bare loops by the same
rules, so the ratio measures the engine's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def dataset(work: Path, size: int, count: int = 200) -> Path:
    from pipelines.shards import write_shards
    from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
    from taxonomy import Node, Taxonomy, save_taxonomy

    if (work / "shards" / "manifest.json").is_file():
        return work / "shards"
    tax = Taxonomy(
        [Node("r", "thing", category_id=1)]
        + [Node(f"c{i}", f"k{i}", ("r",), i) for i in range(2, 9)]
    )
    save_taxonomy(tax, work / "tax.json")
    cfg = SynthConfig(
        num_train=count, num_val=0, min_side=size, max_side=size, max_objects=3, seed=0
    )
    write_shards(
        make_records(tax, cfg)["train"], SyntheticRenderer(tax, cfg), work / "shards",
        max_samples=50, categories_file=work / "tax.json", progress=False,
    )  # fmt: skip
    return work / "shards"


def bare(model_name: str, shards: Path, batch: int, steps: int) -> float:
    """Images/s of the bare loop in this process (after 5 warm-up steps)."""
    import torch

    from pipelines.loader import collate, eval_loader
    from pipelines.transforms import no_augmentation
    from taxonomy import load_taxonomy
    from vastdet.config import load_config
    from vastdet.engine.threads import keep_freed_memory, set_threads
    from vastdet.models.build import ModelConfig, build_model

    set_threads()
    keep_freed_memory()
    torch.manual_seed(0)
    tax = load_taxonomy(shards.parent / "tax.json")
    model, criterion, _ = build_model(
        load_config(model_name, ModelConfig), tax.category_ids().tolist(), tax
    )
    samples = [
        (b.images[i], {k: v for k, v in t.items() if k != "annotations"})
        for b in eval_loader(shards, 1, no_augmentation(), 0)
        for i, t in enumerate(b.targets)
    ]
    batches = [
        collate([(img, t) for img, t in samples[k : k + batch]])
        for k in range(0, len(samples) - batch + 1, batch)
    ]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        b = batches[i % len(batches)]
        losses = criterion(model(b.images, b.masks, b.targets), b.targets)
        optim.zero_grad()
        criterion.weighted_sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optim.step()
    return steps * batch / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], world: int) -> list[str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    env.pop("OMP_NUM_THREADS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=HERE,
        )  # fmt: skip
        for r in range(world)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{args} failed")
    return outs


def engine(
    work: Path, name: str, model: str, shards: Path, batch: int, steps: int, world: int, nice: int
) -> dict:
    """(images/s, data-wait share), medians over the logged intervals after the first."""
    from vastdet.runtime.metrics import training_rows

    cfg = {
        "model": model,
        "data": {
            "train_shards": str(shards), "batch_size": batch, "num_workers": 1,
            "shuffle_buffer": 50, "worker_nice": nice,
            "transforms": {"scales": [128], "max_size": 160, "crop_resize": [], "flip_prob": 0.0},
        },
        "optim": {"lr": 1e-4}, "steps": steps, "steps_per_epoch": 1000, "log_every": 10,
        "checkpoint_every": 10**6, "zero_stage": 2 if world > 1 else 0,
        "output_dir": str(work / name),
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(work / name, ignore_errors=True)  # an earlier call's run would only resume
    launch(["-m", "vastdet.engine.train", "--config", str(path)], world)
    rows = training_rows(work / name)[1:]
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rows),
        "wait": statistics.median(r["data_wait_share"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dino_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_trainer"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every row")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare(args.model, Path(args.bare[0]), args.batch, int(args.bare[1]))))
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    shards = dataset(work, args.size)
    # label -> per-round (images/s, data-wait share, ratio to that round's bare loop)
    results: dict[str, list[tuple[float, float | None, float]]] = {}
    for _ in range(args.repeats):
        for world in (1, 2):
            cmd = [
                __file__, "--model", args.model, "--batch", str(args.batch),
                "--bare", str(shards), str(args.steps),
            ]  # fmt: skip
            bare_rate = sum(json.loads(out.strip().splitlines()[-1]) for out in launch(cmd, world))
            label = f"bare loop, {world} process{'es' if world > 1 else ''}"
            results.setdefault(label, []).append((bare_rate, None, 1.0))
            variants = [(10, "")] + (
                [(0, ", loader worker at the trainer's priority")] if world == 1 else []
            )
            for nice, note in variants:
                name = f"engine_w{world}_n{nice}"
                r = engine(work, name, args.model, shards, args.batch, args.steps, world, nice)
                label = f"engine, {world} rank{'s, ZeRO-2' if world > 1 else ''}{note}"
                results.setdefault(label, []).append(
                    (r["images_per_s"], r["wait"], r["images_per_s"] / bare_rate)
                )
    print(
        f"\n{args.model}, batch {args.batch} per rank, {args.size} px, {os.cpu_count()} CPUs; "
        f"medians of {args.repeats} rounds, ratios taken within each round"
    )
    print("| run | images/s | vs bare loop | ratio in each round | data-wait share |")
    print("|---|---|---|---|---|")
    for label, rounds in results.items():
        rate = statistics.median(r[0] for r in rounds)
        ratio = statistics.median(r[2] for r in rounds)
        each = " / ".join(f"{r[2]:.2f}" for r in rounds)
        waits = [r[1] for r in rounds if r[1] is not None]
        share = f"{statistics.median(waits):.3f}" if waits else "-"
        print(f"| {label} | {rate:.1f} | {ratio:.2f} | {each} | {share} |")


if __name__ == "__main__":
    main()
