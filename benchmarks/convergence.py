"""Do the detectors learn? Held-out AP against training steps on an easy synthetic set, every
method side by side with the same steps, next to a random-box baseline.

    python benchmarks/convergence.py [--methods dino paq_dino ...] [--steps 4000]
        [--eval-every 500] [--train 3000] [--val 300] [--categories 20]
        [--workdir runs/convergence] [--jobs 2] [--plot curves.png]

The set: `--categories` categories, each the only child of its own parent, so that each has its
own shape and colour (the synthetic renderer inherits those from ancestors; siblings would
share them); 1-3 objects per 128-160 px image, each covering 25-60% of the short side;
categories equally frequent. Methods, all tiny presets (ResNet-18 from random weights, with
GroupNorm; d 32, 1 + 2 layers, 30 queries), batch 4, AdamW 1e-3 with 100 warm-up steps and a
decay at 80%:

- `dino`, `paq_dino` (D + Q), `paq_dino_D` (pattern queries only), `paq_dino_Q` (one-to-many
  only): PaQ-DETR's Table 6 ablation on DINO; `dino_layer_heads` and `paq_dino_Q_layer_heads`
  (run only when named) give each decoder layer its own box head and classifier;
- `cq_dino`, `paq_cq_dino`: CQ-DINO and CQ-DINO with PaQ-DETR (C' = 10 of the categories);
  their stage 1 (the selector) trains first for a fifth of `--steps` at 1e-4, then stage 2 for
  `--steps`, the selector and category queries at a tenth of the learning rate. Every backbone
  trains at the full rate (they start from random weights).

Each run evaluates its val shards every `--eval-every` steps (`eval_every`); the table reports
the last evaluation (AP, AP50, AR100, query Gini) and the wall time, and `--plot` draws AP50
against the step for every method. `--jobs 2` trains two methods at once, each process with one
intra-op thread (OMP_NUM_THREADS): on a 2-core machine that halves the wall time and leaves each
method's per-step cost as it is alone with one thread. A method that finished in an earlier call
with the same `--workdir` is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from bench_end_to_end import random_baseline, run

from vastdet.runtime.metrics import evaluation_rows

METHODS = {
    "dino": {"preset": "dino_tiny"},
    "paq_dino": {"preset": "paq_dino_tiny"},
    "paq_dino_D": {"preset": "paq_dino_tiny", "one_to_many": False},
    "paq_dino_Q": {"preset": "dino_tiny", "one_to_many": True},
    # with a box head and classifier per decoder layer: does one-to-many on layer 1 harm the
    # one-to-one layer 2 through the heads they share?
    "dino_layer_heads": {"preset": "dino_tiny", "share_heads": False},
    "paq_dino_Q_layer_heads": {"preset": "dino_tiny", "one_to_many": True, "share_heads": False},
    "cq_dino": {"preset": "cq_dino_tiny", "num_selected": 10},
    "paq_cq_dino": {"preset": "paq_cq_dino_tiny", "num_selected": 10},
}
BATCH, LR = 4, 1e-3
SELECTOR_LR = (
    1e-4  # CQ-DINO's stage 1: at 1e-3 the selector does not learn (tests/test_learning.py)
)
STAGE1_PARTS = {"pattern": r"^(category_queries|selector)\.", "lr_mult": 0.1}  # in stage 2


def easy_dataset(work: Path, categories: int, train: int, val: int, seed: int = 0):
    """(taxonomy file, data folder with shards/{train,val}), made when missing."""
    from pipelines.shards import write_shards
    from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
    from taxonomy import Node, Taxonomy, save_taxonomy

    work.mkdir(parents=True, exist_ok=True)
    tax_file, data = work / "taxonomy.json", work / "data"
    if (data / "shards" / "val" / "manifest.json").is_file():
        return tax_file, data
    nodes = [Node("root", "thing")]
    for k in range(categories):
        nodes.append(Node(f"g{k}", f"family {k}", ("root",)))
        nodes.append(Node(f"c{k}", f"kind {k}", (f"g{k}",), k + 1))
    tax = Taxonomy(nodes)
    save_taxonomy(tax, tax_file)
    cfg = SynthConfig(
        num_train=train, num_val=val, min_side=128, max_side=160, min_objects=1,
        max_objects=3, min_box=0.25, max_box=0.6, zipf_exponent=0.0, seed=seed,
    )  # fmt: skip
    renderer = SyntheticRenderer(tax, cfg)
    for split, records in make_records(tax, cfg).items():
        write_shards(
            records, renderer, data / "shards" / split, prefix=split, max_samples=500,
            workers=2, source=f"easy synthetic seed {seed}", categories_file=tax_file,
            progress=False,
        )  # fmt: skip
    return tax_file, data


def data_settings(tax: Path, data: Path, validate: bool) -> dict:
    """A run's `data` block over a synthetic set's shards (128-160 px images, batch BATCH); the
    val shards only when the run evaluates. Shared with `ladder.py`."""
    return {
        "train_shards": str(data / "shards" / "train"),
        "val_shards": str(data / "shards" / "val") if validate else None,
        "categories": str(tax),
        "batch_size": BATCH,
        "num_workers": 1,
        "shuffle_buffer": 200,
        "transforms": {
            "scales": [128, 144, 160],
            "max_size": 192,
            "crop_resize": [],
            "eval_size": 144,
        },
    }


def config(
    work: Path, name: str, model: dict, tax: Path, data: Path, steps: int, every: int,
    lr: float = LR, groups: list | None = None, decay: bool = True,
):  # fmt: skip
    cfg = {
        "model": {"backbone_weights": None, **model},  # from random weights, as recorded
        "data": data_settings(tax, data, validate=bool(every)),
        "optim": {
            "lr": lr,
            "param_groups": groups or [],
            "clip_grad": 1.0,
            "warmup_steps": min(100, steps // 10),
            "decay_steps": [int(steps * 0.8)] if decay else [],
        },
        "steps": steps,
        "steps_per_epoch": 500,
        "zero_stage": 0,
        "log_every": 25,
        "checkpoint_every": steps,
        "eval_every": every,
        "eval": {"batch_size": 4, "num_workers": 1},
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_method(
    work: Path, name: str, tax: Path, data: Path, steps: int, every: int, threads: int | None
) -> float:
    """Train one method (CQ-DINO's two stages in turn), its output in `work/<name>.log`; its wall
    time in seconds, also kept in `work/<name>.seconds`."""
    model = dict(METHODS[name])
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    log = work / f"{name}.log"
    log.write_text("")
    start = time.perf_counter()
    groups = None
    if "cq_dino" in name:
        selector = {**model, "architecture": "cq_selector", "one_to_many": False}
        stage1 = config(
            work, f"{name}_stage1", selector, tax, data, max(steps // 5, 1), 0, SELECTOR_LR
        )
        run(["train", "--config", str(stage1)], env, log)
        model["init_from"] = str(work / f"{name}_stage1")
        groups = [STAGE1_PARTS]
    cfg = config(work, name, model, tax, data, steps, every, LR, groups)
    run(["train", "--config", str(cfg)], env, log)
    seconds = time.perf_counter() - start
    (work / f"{name}.seconds").write_text(f"{seconds:.1f}\n")
    print(f"{name}: trained in {seconds:.0f} s", flush=True)
    return seconds


def finished(work: Path, name: str, steps: int) -> bool:
    """Whether `name` trained and evaluated all its steps in an earlier call."""
    rows = evaluation_rows(work / name)
    return bool(rows) and rows[-1]["step"] >= steps and (work / f"{name}.seconds").is_file()


def plot(work: Path, names: list[str], out: Path) -> None:
    from vastdet.runtime.plot import outside_legend, pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        rows = evaluation_rows(work / name)
        ax.plot([r["step"] for r in rows], [r["val_AP50"] for r in rows], marker="o", label=name)
    ax.set(xlabel="training step", ylabel="held-out AP50", title="convergence on the easy set")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in METHODS if "layer_heads" not in m],
        choices=list(METHODS),
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--categories", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("runs/convergence"))
    parser.add_argument("--plot", type=Path, help="a PNG of AP50 against the step")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="methods trained at once, each with its share of the cores as OMP_NUM_THREADS",
    )  # fmt: skip
    args = parser.parse_args()
    work = args.workdir
    tax, data = easy_dataset(work, args.categories, args.train, args.val)
    todo = [name for name in args.methods if not finished(work, name, args.steps)]
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for done in [
            pool.submit(train_method, work, n, tax, data, args.steps, args.eval_every, threads)
            for n in todo
        ]:
            done.result()
    seconds = {n: float((work / f"{n}.seconds").read_text()) for n in args.methods}
    baseline = random_baseline(tax, data)
    results = {name: evaluation_rows(work / name)[-1] for name in args.methods}
    (work / "convergence.json").write_text(json.dumps({"results": results, "seconds": seconds}))
    print(f"\n{args.categories} categories, {args.steps} steps, batch {BATCH}")
    print("| method | AP | AP50 | AR100 | query Gini | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['val_AP']:.4f} | {r['val_AP50']:.4f} | {r['val_AR100']:.4f} | "
            f"{r.get('val_query_gini', float('nan')):.3f} | {seconds[name]:.0f} |"
        )
    print(
        f"| random boxes | {baseline['AP']:.4f} | {baseline['AP50']:.4f} | "
        f"{baseline['AR100']:.4f} | - | - |"
    )
    if args.plot:
        plot(work, args.methods, args.plot)
        print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
