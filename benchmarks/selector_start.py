"""Where CQ-DINO's selector starts: stage 1 alone on the easy set, from the shipped pretrained
backbone against random weights, with held-out AUC and AR^C every `--eval-every` steps.

    python benchmarks/selector_start.py [--steps 500] [--eval-every 100]
        [--workdir runs/selector_start] [--jobs 2]

The easy set is `convergence.py`'s (20 equally frequent categories, each with its own shape and
colour, 1-3 objects per 128-160 px image; 3,000 training and 300 held-out images). Stage 1 is
`cq_dino_tiny_stage1` with C' = 10, batch 4, AdamW 5e-4 after 50 warm-up steps (no decay: these
are the first steps of a stage); over the pretrained backbone (frozen batch norm, frozen stem and first stage) the backbone
trains at a tenth of it, as DINO's recipe has it; from random weights every layer trains at the
full rate (GroupNorm). (5e-4 is the best of 1e-4 to 3e-3 over the pretrained backbone in
`benchmarks/RESULTS.md`; 1e-4, the rate from random weights, left AUC at 0.52 after 500 steps.) AUC: per held-out image, the chance that a present
category outscores an absent one (0.5: the selector ignores the image); AR^C beside the
frequency prior's (the C' most frequent training categories for every image).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_end_to_end import run
from convergence import config, easy_dataset

from vastdet.runtime.metrics import evaluation_rows

STARTS = {
    "pretrained": {"backbone_weights": "vastdet:resnet18_synth"},
    "random": {"backbone_weights": None},
}
GROUPS = {"pretrained": [{"pattern": r"^backbone\.", "lr_mult": 0.1}], "random": []}
LR = 5e-4


def train(work: Path, start: str, tax: Path, data: Path, steps: int, every: int, env) -> None:
    if evaluation_rows(work / start) and evaluation_rows(work / start)[-1]["step"] >= steps:
        return
    model = {
        "preset": "cq_dino_tiny_stage1", "num_selected": 10, **STARTS[start],
    }  # fmt: skip
    cfg = config(work, start, model, tax, data, steps, every, LR, GROUPS[start], decay=False)
    run(["train", "--config", str(cfg)], env, work / f"{start}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("runs/selector_start"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = args.workdir
    tax, data = easy_dataset(work, 20, 3000, 300)
    env = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // args.jobs))}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in [
            pool.submit(train, work, s, tax, data, args.steps, args.eval_every, env) for s in STARTS
        ]:
            done.result()
    print(f"\nstage-1 selector on the easy set (20 categories, C' = 10), {args.steps} steps")
    print("| step | " + " | ".join(f"{s} AUC | {s} AR^C" for s in STARTS) + " | prior AR^C |")
    print("|---" * (2 * len(STARTS) + 2) + "|")
    rows = {s: {r["step"]: r for r in evaluation_rows(work / s)} for s in STARTS}
    for step in sorted(rows["pretrained"]):
        cells = []
        for s in STARTS:
            r = rows[s].get(step, {})
            cells += [f"{r.get('val_selector_AUC', float('nan')):.3f}"]
            cells += [f"{r.get('val_AR_C', float('nan')):.3f}"]
        prior = rows["pretrained"][step].get("val_AR_C_prior", float("nan"))
        print(f"| {step} | " + " | ".join(cells) + f" | {prior:.3f} |")


if __name__ == "__main__":
    main()
