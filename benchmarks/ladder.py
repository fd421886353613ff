"""The vocabulary ladder: DINO against CQ-DINO as the vocabulary grows from about 20 to V3Det's
13,204 categories, every method from the shipped pretrained backbone with the same CPU time on
a rung.

    python benchmarks/ladder.py [--rungs 20 200 2000 13204] [--budget-min 15] [--jobs 2]
        [--train 6000] [--val 400] [--workdir runs/ladder] [--plot ladder.png]

**Vocabularies.** V3Det's 13,204 categories linked to WordNet from its own category files
(`tests/data/v3det`, `vastdet taxonomy build --link`), and nested random subsets of about 20,
200 and 2,000 of them (seeded: each rung holds the one below it). Each rung's taxonomy keeps
its categories' WordNet ancestors (not categories themselves), and its category frequencies are
V3Det's real training instance counts, so every rung has V3Det's long tail.

**One renderer.** Every rung's images are drawn from the same appearance table, computed once
on the whole 13,204-category tree, so a category looks the same on every rung and only the
vocabulary changes. The same `--train` training images (1-4 objects of 20-60% of the short
side, 128-160 px) and `--val` held-out images on every rung, from different seeds.

**Methods and budget.** The tiny presets (d 32, 1 encoder and 2 decoder layers, 30 queries)
over the shipped ResNet-18 (`vastdet:resnet18_synth`, pretrained on a disjoint synthetic
vocabulary), batch 4, AdamW 1e-3, the backbone at a tenth, 100 warm-up steps and a decay at
80%. Each method gets `--budget-min` minutes of one thread's training time on a rung: its steps
come from 20-step calibration runs of every method, all made before any trains, in the same
conditions (`--jobs` at once). CQ-DINO
spends a fifth on stage 1 (the selector at 5e-4, `selector_start.py`'s rate) and the rest on stage 2 (selector and category
queries at a tenth), with C' = min(30, C / 2). DINO and CQ-DINO run on every rung; on the 2,000
rung also PaQ-DINO and PaQ-CQ-DINO, and at 6 decoder layers DINO, D (pattern queries), Q
(quality-aware one-to-many) and D+Q: PaQ-DETR's Table 6 at the paper's depth.

**Reported** per rung and method, from the held-out evaluation at the end: AP, AP50, AR100, AP at
the category tree's depths 0-2, APr/c/f, AR^C beside the frequency prior's AR^C (the C' most
frequent training categories for every image) and the selector's AUC, the gradient diagnostics
rho and eta (eq. 3-4, the last logged values), the query Gini, and the steps the budget bought;
with a random-box baseline per rung. `--plot` draws AP50 and AP against C, one line per method.
A run finished in an earlier call with the same `--workdir` is not trained again.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from bench_end_to_end import random_baseline, run
from convergence import BATCH, data_settings

from vastdet.runtime.metrics import training_rows

ROOT = Path(__file__).resolve().parent.parent
V3DET = ROOT / "tests" / "data" / "v3det"
RUNGS = (20, 200, 2000, 13204)
BACKBONE = "vastdet:resnet18_synth"
LR, SELECTOR_LR = 1e-3, 5e-4  # BATCH (4) is convergence.py's, with its data settings
LEVELS = (0, 1, 2)
FLOOR = 1e-5  # where the plot draws a zero
LOW = {"pattern": r"^(backbone|category_queries|selector)\.", "lr_mult": 0.1}
METHODS = {
    "dino": {"preset": "dino_tiny"},
    "cq_dino": {"preset": "cq_dino_tiny"},
    "paq_dino": {"preset": "paq_dino_tiny"},
    "paq_cq_dino": {"preset": "paq_cq_dino_tiny"},
    # PaQ-DETR's Table 6 at the paper's depth: intermediate layers of its own for one-to-many
    "dino_6": {"preset": "dino_tiny", "dec_layers": 6},
    "paq_dino_D_6": {"preset": "paq_dino_tiny", "one_to_many": False, "dec_layers": 6},
    "paq_dino_Q_6": {"preset": "dino_tiny", "one_to_many": True, "dec_layers": 6},
    "paq_dino_6": {"preset": "paq_dino_tiny", "dec_layers": 6},
    # taxonomy-guided selection (ours): the selector walks the tree with a beam of 16
    "cq_dino_beam": {"preset": "cq_dino_tiny", "selection": "beam", "beam_width": 16},
}
EXTRA_AT = {
    2000: ["paq_dino", "paq_cq_dino", "dino_6", "paq_dino_D_6", "paq_dino_Q_6", "paq_dino_6"],
    13204: ["cq_dino_beam"],
}


def v3det_tree(work: Path) -> Path:
    """V3Det's categories linked to WordNet, built once."""
    path = work / "v3det_tree.json"
    if not path.is_file():
        run(
            ["taxonomy", "build", "--link", str(V3DET / "v3det_2023_v1_train_cat_info.json.gz")]
            + ["--names", str(V3DET / "category_name_13204_v3det_2023_v1.txt.gz")]
            + ["-o", str(path)]
        )
    return path


def v3det_counts() -> dict[int, int]:
    """V3Det's training instance count per category id."""
    with gzip.open(V3DET / "v3det_2023_v1_train_cat_info.json.gz", "rt") as handle:
        return {int(c["id"]): int(c["instance_count"]) for c in json.load(handle)}


def nested_subsets(ids: list[int], sizes, seed: int = 0) -> dict[int, list[int]]:
    """For each size, the first `size` ids of one seeded permutation: each rung holds the
    rungs below it."""
    order = np.random.default_rng(seed).permutation(sorted(ids)).tolist()
    return {size: sorted(order[:size]) for size in sizes}


def subset_taxonomy(full, categories: list[int]):
    """The categories with their ancestors in `full`; only `categories` are categories."""
    from taxonomy import Node, Taxonomy

    keep = {int(c) for c in categories}
    nodes = {full.node_of_category(c) for c in keep}
    for node in list(nodes):
        nodes |= full.ancestors(node)
    out = []
    for node_id in full.ids:
        if node_id in nodes:
            node = full.node(node_id)
            cat = node.category_id if node.category_id in keep else None
            out.append(Node(node_id, node.name, tuple(p for p in node.parents if p in nodes), cat))
    return Taxonomy(out)


def rung_data(work: Path, full_file: Path, size: int, categories: list[int], args) -> tuple:
    """(taxonomy file, data folder with shards/{train,val}) of one rung, made when missing."""
    from pipelines.shards import write_shards
    from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
    from taxonomy import load_taxonomy, save_taxonomy

    rung = work / f"c{size}"
    tax_file, data = rung / "taxonomy.json", rung / "data"
    if (data / "shards" / "val" / "manifest.json").is_file():
        return tax_file, data
    rung.mkdir(parents=True, exist_ok=True)
    full = load_taxonomy(full_file)
    save_taxonomy(subset_taxonomy(full, categories), tax_file)
    counts = v3det_counts()
    histogram = {c: counts[c] for c in categories}
    cfg = SynthConfig(
        num_train=args.train, num_val=args.val, min_side=128, max_side=160, min_objects=1,
        max_objects=4, min_box=0.2, max_box=0.6, seed=size,
    )  # fmt: skip
    renderer = SyntheticRenderer(full, cfg)  # one appearance table for every rung
    for split, records in make_records(full, cfg, histogram).items():
        write_shards(
            records, renderer, data / "shards" / split, prefix=split, max_samples=500,
            workers=2, source=f"vocabulary ladder, {size} V3Det categories",
            categories_file=tax_file, progress=False,
        )  # fmt: skip
    return tax_file, data


def train_config(
    path: Path, model: dict, tax: Path, data: Path, steps: int, lr: float, evaluate: bool,
    groups: list[dict],
) -> Path:  # fmt: skip
    cfg = {
        "model": {**model, "backbone_weights": BACKBONE},
        "data": data_settings(tax, data, validate=evaluate),
        "optim": {
            "lr": lr,
            "param_groups": groups,
            "clip_grad": 1.0,
            "warmup_steps": min(100, steps // 10),
            "decay_steps": [int(steps * 0.8)],
        },
        "steps": steps,
        "steps_per_epoch": 500,
        "zero_stage": 0,
        "log_every": 10 if steps < 500 else 25,
        "checkpoint_every": steps,
        "eval_at_end": evaluate,
        "eval": {"batch_size": 4, "num_workers": 1, "levels": list(LEVELS)},
        "output_dir": str(path.with_suffix("")),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def stages(name: str, size: int) -> list[tuple[str, dict, float, list[dict]]]:
    """(run name, model settings, lr, parameter groups) of each stage of a method."""
    model = dict(METHODS[name])
    backbone = [{"pattern": r"^backbone\.", "lr_mult": 0.1}]
    if "cq_dino" not in name:
        return [(name, model, LR, backbone)]
    model["num_selected"] = min(30, size // 2)
    selector = {**model, "architecture": "cq_selector", "one_to_many": False, "patterns": 0}
    return [
        (f"{name}_stage1", selector, SELECTOR_LR, backbone),
        (name, model, LR, [LOW]),
    ]


def seconds_per_step(rung: Path, run_name: str, model: dict, tax, data, lr, groups, env) -> float:
    """From a 20-step calibration run's logged throughput (start-up excluded); measured once."""
    calib = rung / "calibration"
    calib.mkdir(exist_ok=True)
    out = calib / run_name
    if not training_rows(out):
        model = {k: v for k, v in model.items() if k != "init_from"}  # speed needs no weights
        cfg = train_config(calib / f"{run_name}.yaml", model, tax, data, 20, lr, False, groups)
        run(["train", "--config", str(cfg)], env, calib / f"{run_name}.log")
    rows = [r for r in training_rows(out) if r["step"] > 10]
    return sum(BATCH / r["images_per_s"] for r in rows) / len(rows)


def calibrate(rung: Path, size: int, name: str, tax, data, env) -> None:
    """Every stage's seconds per step, before any method trains: all are measured under the
    same load, so that each gets the same share of CPU time."""
    for run_name, model, lr, groups in stages(name, size):
        seconds_per_step(rung, run_name, model, tax, data, lr, groups, env)


def train_method(rung: Path, size: int, name: str, tax, data, budget: float, env) -> dict:
    """Train every stage of `name` within the budget (calibrated speeds); returns the steps."""
    parts = stages(name, size)
    shares = [0.2, 0.8] if len(parts) == 2 else [1.0]
    steps = {}
    for (run_name, model, lr, groups), share in zip(parts, shares):
        if len(parts) == 2 and run_name == name:
            model = {**model, "init_from": str(rung / f"{name}_stage1")}
        speed = seconds_per_step(rung, run_name, model, tax, data, lr, groups, env)
        steps[run_name] = max(20, int(share * budget / speed))
        evaluate = run_name == name
        cfg = train_config(
            rung / f"{run_name}.yaml", model, tax, data, steps[run_name], lr, evaluate, groups
        )
        run(["train", "--config", str(cfg)], env, rung / f"{run_name}.log")
    (rung / f"{name}.steps.json").write_text(json.dumps(steps))
    return steps


def finished(rung: Path, name: str) -> bool:
    return (rung / f"{name}.steps.json").is_file() and (
        rung / name / "eval" / "metrics.json"
    ).is_file()


def diagnostics(run_dir: Path) -> dict:
    rows = [r for r in training_rows(run_dir) if "diag_rho" in r][-10:]
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("diag_rho", "diag_eta")}


def collect(rung: Path, name: str) -> dict:
    metrics = json.loads((rung / name / "eval" / "metrics.json").read_text())
    metrics.update(diagnostics(rung / name))
    metrics["steps"] = json.loads((rung / f"{name}.steps.json").read_text())
    return metrics


COLUMNS = (
    ("AP", "AP"), ("AP50", "AP50"), ("AR100", "AR100"), ("AP_level0", "AP d0"),
    ("AP_level1", "AP d1"), ("AP_level2", "AP d2"), ("APr", "APr"), ("APc", "APc"),
    ("APf", "APf"), ("AR_C", "AR^C"), ("AR_C_prior", "prior AR^C"),
    ("selector_AUC", "sel. AUC"), ("diag_rho", "rho"), ("diag_eta", "eta"),
    ("query_gini", "Gini"),
)  # fmt: skip


def table(size: int, results: dict[str, dict]) -> str:
    lines = [
        f"\n{size:,} categories",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " | steps |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, m in results.items():
        cells = [f"{m[key]:.4f}" if key in m else "-" for key, _ in COLUMNS]
        steps = "+".join(str(v) for v in m.get("steps", {}).values()) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, dict]], out: Path) -> None:
    from vastdet.runtime.plot import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({m for rung in results.values() for m in rung})
    for ax, key in zip(axes, ("AP50", "AP")):
        for method in methods:
            points = [
                (c, max(r[method][key], FLOOR)) for c, r in sorted(results.items()) if method in r
            ]
            if points:
                style = "--" if method == "random boxes" else "-"
                ax.plot(*zip(*points), style, marker="o", label=method)
        # log scale: the methods differ by factors at large C, where both are near zero
        ax.set(xscale="log", yscale="log", xlabel="categories C")
        ax.set_ylabel(f"held-out {key} (log; 0 drawn at {FLOOR:g})")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("the vocabulary ladder: same renderer, same CPU time per method on a rung")
    save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rungs", type=int, nargs="+", default=list(RUNGS))
    parser.add_argument("--methods", nargs="+", help="only these (default: the plan)")
    parser.add_argument("--budget-min", type=float, default=15.0)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/ladder"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--data-only", action="store_true", help="make the rungs' data, stop")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    full_file = v3det_tree(work)
    from taxonomy import load_taxonomy

    all_ids = load_taxonomy(full_file).category_ids().tolist()
    subsets = nested_subsets(all_ids, [s for s in RUNGS if s < len(all_ids)] + [len(all_ids)])
    env = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // args.jobs))}
    plan = []
    for size in args.rungs:
        size = min(size, len(all_ids))
        tax, data = rung_data(work, full_file, size, subsets[size], args)
        for name in ["dino", "cq_dino"] + EXTRA_AT.get(size, []):
            if args.methods and name not in args.methods:
                continue
            if not finished(work / f"c{size}", name):
                plan.append((work / f"c{size}", size, name, tax, data))
    if args.data_only:
        return
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(calibrate, *job[:5], env) for job in plan]:
            future.result()
        futures = [
            pool.submit(train_method, rung, size, name, tax, data, args.budget_min * 60, env)
            for rung, size, name, tax, data in plan
        ]
        for future in futures:
            future.result()
    print(f"trained {len(plan)} methods in {time.perf_counter() - start:.0f} s", flush=True)
    results: dict[int, dict[str, dict]] = {}
    for size in args.rungs:
        size = min(size, len(all_ids))
        rung = work / f"c{size}"
        results[size] = {
            name: collect(rung, name)
            for name in ["dino", "cq_dino"] + EXTRA_AT.get(size, [])
            if finished(rung, name)
        }
        results[size]["random boxes"] = random_baseline(
            rung / "taxonomy.json", rung / "data", LEVELS
        )
        print(table(size, results[size]))
    (work / "ladder.json").write_text(json.dumps({str(k): v for k, v in results.items()}))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
