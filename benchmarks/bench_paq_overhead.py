"""What PaQ-DETR adds to the model it plugs into (its Table 7), measured here.

    python benchmarks/bench_paq_overhead.py [--image 320] [--repeats 3]

Pairs of the same detector without and with PaQ (pattern queries + one-to-many supervision):
DINO-4scale with ResNet-50 and 900 queries against PaQ-DINO with 150 patterns (the paper's
Table 7 setting), and the same for CQ-DINO (Swin-B replaced by ResNet-50 for CPU time, 1,000
categories, C' = 100). Per model, in a fresh process: parameters; FLOPs of one inference
forward by torch's FlopCounterMode (it counts matrix products and convolutions: the
`grid_sample` of deformable attention and element-wise work are not counted, for either
model); the median time of `--repeats` inference forwards; the peak resident memory of one
training step (forward, losses, backward, AdamW step) counted from after the model is built.
One image of `--image` pixels, one process with its share of the cores (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench_vocab_scaling import synthetic_taxonomy, training_step_cost

PAIRS = {
    "DINO-4scale R50": ({"preset": "dino_r50_4scale"}, {"preset": "paq_dino_r50_4scale"}),
    "CQ-DINO R50": (
        {"preset": "cq_dino_swin_b", "backbone": "resnet50", "backbone_drop_path": None},
        {"preset": "paq_cq_dino_swin_b", "backbone": "resnet50", "backbone_drop_path": None},
    ),
}
CATEGORIES = 1000


def child(settings: dict, image: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vastdet.config import from_dict
    from vastdet.models.build import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {**settings, "diagnostics": False})
    tax, ids = synthetic_taxonomy(CATEGORIES)
    model, criterion, _ = build_model(cfg, ids.tolist(), tax)
    images = torch.randint(0, 255, (1, 3, image, image), dtype=torch.uint8)
    masks = torch.zeros(1, image, image, dtype=torch.bool)
    out = {"params": sum(p.numel() for p in model.parameters())}
    model.eval()
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(images, masks)
        out["gflops"] = counter.get_total_flops() / 1e9
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images, masks)
            times.append(time.perf_counter() - start)
    out["forward_s"] = statistics.median(times)
    out["step_s"], out["train_peak_gb"] = training_step_cost(
        model, criterion, images, masks, CATEGORIES
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.image, args.repeats)))
        return
    print(f"one {args.image}x{args.image} image, inference forward and one training step")
    header = ("model", "params M", "GFLOPs", "forward s", "train peak GB", "train step s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (plain, paq) in PAIRS.items():
        rows = []
        for label, settings in ((name, plain), (f"PaQ-{name}", paq)):
            cmd = [sys.executable, __file__, "--image", str(args.image)]
            cmd += ["--repeats", str(args.repeats), "--child", json.dumps(settings)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{label} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"| {label} | {r['params'] / 1e6:.2f} | {r['gflops']:.1f} | {r['forward_s']:.2f}"
                f" | {r['train_peak_gb']:.2f} | {r['step_s']:.2f} |",
                flush=True,
            )
        a, b = rows
        print(
            f"| PaQ / plain | {b['params'] / a['params']:.3f} | {b['gflops'] / a['gflops']:.3f} |"
            f" {b['forward_s'] / a['forward_s']:.3f} | {b['train_peak_gb'] / a['train_peak_gb']:.3f}"
            f" | {b['step_s'] / a['step_s']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
