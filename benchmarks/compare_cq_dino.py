"""CQ-DINO against the DINO baseline on a synthetic vocabulary of >= 2,000 hierarchical,
long-tailed WordNet categories, each given the same CPU time for training.

    python benchmarks/compare_cq_dino.py [--under device.n.01] [--budget-min 8]
        [--workdir runs/compare]

Both use the tiny presets (ResNet-18, d 32, 1 + 2 layers, 30 queries) on one process. Each
method's seconds per step are measured first (a 15-step run), then its steps are set to fill
the budget: DINO trains for all of it; CQ-DINO spends 20% on stage 1 (selector) and 80% on
stage 2 (detector from stage 1, backbone and category module at 1% learning rate), once with
unselected ground truths left without a class target and once with ground-truth categories
forced into the selection during training. Category queries start from the tiny text tower's
embeddings (random weights: they carry no language knowledge). Reported: AP, AP50, AR100 and
AR^C on the val shards (same evaluator), and the last logged gradient diagnostics rho (eq. 3)
and eta (eq. 4) of each run's classification logits, next to a random-box baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_end_to_end import evaluate_run, prepare, random_baseline, run, train_config

from vastdet.runtime.metrics import training_rows

BATCH, LR = 4, 4e-4
LOW = [{"pattern": r"^(backbone|category_queries|selector)\.", "lr_mult": 0.01}]


def seconds_per_step(work: Path, name: str, model, tax: Path, data: Path) -> float:
    """From a 15-step run's last logged throughput (start-up excluded)."""
    run(
        [
            "train",
            "--config",
            str(train_config(work, f"calib_{name}", model, tax, data, 15, BATCH, LR)),
        ]
    )
    last = training_rows(work / f"calib_{name}")[-1]
    return BATCH / last["images_per_s"]


def last_diagnostics(run_dir: Path) -> dict:
    lines = [m for m in training_rows(run_dir) if "diag_rho" in m][-5:]
    if not lines:
        return {}
    return {k: sum(m[k] for m in lines) / len(lines) for k in ("diag_rho", "diag_eta")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--under", default="device.n.01")
    parser.add_argument("--budget-min", type=float, default=8.0)
    parser.add_argument("--selected", type=int, default=50, help="C' for CQ-DINO")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()
    work = args.workdir
    tax, data = prepare(work, args.under, args.train, args.val)
    emb = work / "embeddings.pt"
    if not emb.is_file():
        run(["taxonomy", "embed", str(tax), "--model", "vastdet-tiny-clip", "-o", str(emb)])
    cq = {"preset": "cq_dino_tiny", "category_embeddings": str(emb), "num_selected": args.selected}
    selector = {**cq, "architecture": "cq_selector"}
    budget = args.budget_min * 60
    speed = {
        "dino": seconds_per_step(work, "dino", "dino_tiny", tax, data),
        "selector": seconds_per_step(work, "selector", selector, tax, data),
        "cq_dino": seconds_per_step(work, "cq_dino", cq, tax, data),
    }
    print("seconds per step:", {k: round(v, 3) for k, v in speed.items()}, flush=True)
    results, seconds = {}, {}
    steps = int(budget / speed["dino"])
    start = time.perf_counter()
    run(
        [
            "train",
            "--config",
            str(train_config(work, "dino", "dino_tiny", tax, data, steps, BATCH, LR)),
        ]
    )
    seconds["dino"] = time.perf_counter() - start
    results["dino"] = evaluate_run(work / "dino", data) | last_diagnostics(work / "dino")
    for name, force in (("cq_dino", False), ("cq_dino_forced", True)):
        s1 = int(0.2 * budget / speed["selector"])
        s2 = int(0.8 * budget / speed["cq_dino"])
        start = time.perf_counter()
        stage1 = train_config(
            work,
            f"{name}_stage1",
            {**selector, "force_gt_categories": force},
            tax,
            data,
            s1,
            BATCH,
            1e-3,
            [],
        )
        run(["train", "--config", str(stage1)])
        model = {**cq, "force_gt_categories": force, "init_from": str(work / f"{name}_stage1")}
        run(
            [
                "train",
                "--config",
                str(train_config(work, name, model, tax, data, s2, BATCH, LR, LOW)),
            ]
        )
        seconds[name] = time.perf_counter() - start
        results[name] = evaluate_run(work / name, data) | last_diagnostics(work / name)
    results["random boxes"] = random_baseline(tax, data)
    (work / "comparison.json").write_text(json.dumps({"results": results, "seconds": seconds}))
    print(f"\n{args.under}: synthetic, long-tailed; budget {args.budget_min:g} min per method")
    cols = ("AP", "AP50", "AR100", "AR_C", "diag_rho", "diag_eta")
    print(f"{'method':<16}" + "".join(f"{c:>10}" for c in cols) + f"{'train s':>10}")
    for name, m in results.items():
        cells = "".join(f"{m[c]:10.4f}" if c in m else f"{'-':>10}" for c in cols)
        print(f"{name:<16}{cells}{seconds.get(name, 0):10.0f}")


if __name__ == "__main__":
    main()
