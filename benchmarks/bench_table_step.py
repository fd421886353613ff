"""CQ-DINO's full-size training step at a vast vocabulary, side by side: the category queries
encoded and scored with autograd and the table updated by torch's AdamW (every [C, W]
activation kept for the backward pass, a checkpoint per chunk of scores, a full-size
temporary in the update), against the lean step (`LeanEncoding`, `ChunkedScores` and
`select_rows` sharing a `LeanQueries` handle: the queries become the gradient before the norm
and then the table's gradient, in place; the table updated a slice at a time, fp32 moments),
and the lean step with the table's Adam moments in bfloat16 (`optim.table_moments: bf16`,
`vastdet.engine.optim`).

    python benchmarks/bench_table_step.py [--sizes 100000 1000000] [--image 320]

The detector is `bench_vocab_scaling.py`'s (ResNet-18 for CPU time, d 256, 6 + 6 layers, 900
queries, C' = 100, a 10-way synthetic tree, 768-wide category queries) and its step: forward,
losses, backward and an AdamW step on one image, in a fresh process per case, peak resident
memory counted from after the model is built and Adam's moments exist (a step with zero
gradients and learning rate 0 makes them), so the figure is any step's, not the first one's. The cases start from the same
seed, so the same loss and the same update are expected (the first step's update does not
depend on how the moments are stored, only later ones do; `tests/test_optim.py` measures
that): the table prints the loss and the size of the table's update, and their differences
from the autograd case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_vocab_scaling import build, peak_gb, reset_peak, rss_gb

CASES = ("autograd", "lean", "lean_bf16")


def child(case: str, n: int, image: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, criterion, _ = build("cq_dino", n)
    model.category_queries.lean = model.selector.lean = case != "autograd"
    model.train()
    images = torch.randint(0, 255, (1, 3, image, image), dtype=torch.uint8)
    masks = torch.zeros(1, image, image, dtype=torch.bool)
    targets = [
        {
            "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.3]]),
            "labels": torch.tensor([1, n]),
        }
    ]
    table = model.category_queries.embedding.weight
    from vastdet.engine.optim import AdamW

    rest = [p for p in model.parameters() if p.requires_grad and p is not table]
    # autograd's case: torch's AdamW update; the lean ones: the sliced update training uses
    moments = {"autograd": {}, "lean": {"moments": "fp32"}, "lean_bf16": {"moments": "bf16"}}
    optim = AdamW([{"params": rest}, {"params": [table], **moments[case]}], lr=1e-4)
    # a step of training holds Adam's moments: make them (zero gradients, learning rate 0)
    for group in optim.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optim.step()
    optim.zero_grad(set_to_none=True)
    for group in optim.param_groups:
        group["lr"] = 1e-4
    reset_peak()
    held = rss_gb()  # the model, the table and Adam's moments, before the step
    start = time.perf_counter()
    torch.manual_seed(1)  # the same denoising noise in every case
    losses = criterion(model(images, masks, targets), targets)
    loss = criterion.weighted_sum(losses)
    before = table.detach()[:: max(1, n // 4096)].clone()
    loss.backward()
    optim.step()
    seconds = time.perf_counter() - start
    update = (table.detach()[:: max(1, n // 4096)] - before).norm().item()
    return {
        "peak_gb": peak_gb(), "held_gb": held, "step_s": seconds, "loss": loss.item(),
        "update": update,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    parser.add_argument("--image", type=int, default=320)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.image)))
        return
    print(f"image {args.image}x{args.image}, batch 1, ResNet-18, d 256, 6+6 layers, 900 queries")
    print(f"{'C':>9} {'case':<9} {'peak GiB':>8} {'held GiB':>8} {'x autograd':>10} {'step s':>7} "
          f"{'loss':>10} {'d loss':>9} {'update':>10} {'d update':>9}")  # fmt: skip
    for n in args.sizes:
        base = None
        for case in args.cases:
            cmd = [sys.executable, __file__, "--image", str(args.image), "--child", case, str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{n:>9,} {case:<9} failed ({proc.returncode}): {proc.stderr[-300:]}")
                continue
            r = json.loads(proc.stdout.splitlines()[-1])
            base = base or r
            print(
                f"{n:>9,} {case:<9} {r['peak_gb']:>8.2f} {r['held_gb']:>8.2f} "
                f"{r['peak_gb'] / base['peak_gb']:>10.2f} "
                f"{r['step_s']:>7.1f} {r['loss']:>10.5f} {r['loss'] - base['loss']:>9.1e} "
                f"{r['update']:>10.4e} {r['update'] - base['update']:>9.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
