"""How cost grows with the vocabulary (CQ-DINO's Tables 4 and 7), measured on this machine.

    python benchmarks/bench_vocab_scaling.py [--sizes 1000 13204 100000 1000000] [--image 320]

Three classifiers on the same detector (ResNet-18 backbone for CPU time, otherwise the paper's
widths: d 256, 6 + 6 layers, 900 queries, 8 heads):

- `cq_dino`: CQ-DINO, C' = 100 categories selected per image (tree construction on a synthetic
  10-way hierarchy, 768-wide category queries as from CLIP ViT-L/14);
- `dino`: DINO's all-class head (one logit per category for every query);
- `cq_all`: CQ-DINO's contrastive classification over all categories, no selection (C' = C:
  every category query goes through the feature enhancer and the decoder), Table 4's first rows.

Each (classifier, C) runs in a fresh process: parameters, one inference forward (median time of
3; CQ-DINO in its inference form, `CategoryQueries.freeze_for_inference`: the encoded [C, 256]
queries replace the [C, 768] table, its projection and the tree pass) and one training step (forward, backward, AdamW step) on one image, peak resident memory of
each, counted from after the model is built (VmHWM reset), so it covers the model held plus
the work. Per-category figures are slopes against the smallest vocabulary, so the shared
detector cancels out. A case whose estimated training memory exceeds `--limit-gb` is not run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

D, TEXT_DIM, QUERIES, LAYERS = 256, 768, 900, 6


def synthetic_taxonomy(n: int):
    """n categories in a 10-way tree (category i's parent is (i - 1) // 10)."""
    import numpy as np

    from taxonomy import Taxonomy

    ids = [f"n{i}" for i in range(n)]
    parents = [[] if i == 0 else [f"n{(i - 1) // 10}"] for i in range(n)]
    return Taxonomy.from_columns(
        ids,
        [f"category {i}" for i in range(n)],
        parents,
        list(range(1, n + 1)),
        [()] * n,
        [""] * n,
        [{}] * n,
    ), np.arange(1, n + 1)


def build(kind: str, n: int):
    from vastdet.models.build import ModelConfig, build_model

    tax, ids = synthetic_taxonomy(n)
    cfg = ModelConfig(
        architecture="dino" if kind == "dino" else "cq_dino",
        backbone="resnet18",
        num_queries=QUERIES,
        dn_number=100,
        text_dim=TEXT_DIM,
        num_selected=n if kind == "cq_all" else 100,
        diagnostics=False,
    )
    return build_model(cfg, ids.tolist(), tax)


def reset_peak() -> None:
    """Start the peak-memory count afresh (Linux: writing 5 to clear_refs resets VmHWM), so
    the figure covers the measured work and the model it holds, not how it was built."""
    import ctypes
    import gc

    gc.collect()
    try:  # hand memory freed while building (the [C, 768] table) back to the OS first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_gb() -> float:
    """This process's resident memory now, GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def peak_gb() -> float:
    """Peak resident memory since the last `reset_peak` (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(kind: str, n: int, image: int, mode: str) -> dict:
    import torch

    torch.manual_seed(0)
    model, criterion, _ = build(kind, n)
    params = sum(p.numel() for p in model.parameters())
    images = torch.randint(0, 255, (1, 3, image, image), dtype=torch.uint8)
    masks = torch.zeros(1, image, image, dtype=torch.bool)
    result = {"kind": kind, "categories": n, "params": params, "mode": mode}
    if mode == "infer":
        model.eval()
        if kind != "dino":  # the inference form: encoded category queries only
            model.category_queries.freeze_for_inference()
        reset_peak()
        times = []
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                model(images, masks)
                times.append(time.perf_counter() - start)
        result.update(forward_s=statistics.median(times), peak_gb=peak_gb())
    else:
        step_s, result["peak_gb"] = training_step_cost(model, criterion, images, masks, n)
        result["step_s"] = step_s
    return result


def training_step_cost(model, criterion, images, masks, last_category: int) -> tuple[float, float]:
    """(seconds, peak resident GB) of one training step (forward, losses, backward, AdamW) on
    two boxes of categories 1 and `last_category`, the peak counted from this call."""
    import torch

    model.train()
    targets = [
        {
            "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.3]]),
            "labels": torch.tensor([1, last_category]),
        }
    ]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak()
    start = time.perf_counter()
    losses = criterion(model(images, masks, targets), targets)
    criterion.weighted_sum(losses).backward()
    optim.step()
    return time.perf_counter() - start, peak_gb()


def estimated_train_gb(kind: str, n: int, image: int) -> float:
    """A rough lower bound: per-category parameters x 4 (weights, gradients, two Adam moments)
    plus the per-category activations the classifier keeps for backward."""
    if kind == "dino":
        per_cat = 2 * (D + 1) + D  # two class heads and the denoising label embedding
        activations = (LAYERS + 1) * QUERIES * n * 4 * 3  # logits, sigmoid, focal terms
    else:
        per_cat = TEXT_DIM
        selected = n if kind == "cq_all" else 100
        tokens = sum((image // s) ** 2 for s in (8, 16, 32, 64))
        activations = n * D * 4 * 8 + LAYERS * 8 * tokens * selected * 4 * 3
    return (per_cat * n * 4 * 4 + activations) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 13204, 100000, 1000000])
    parser.add_argument("--kinds", nargs="+", default=["cq_dino", "dino", "cq_all"])
    parser.add_argument("--image", type=int, default=320)
    parser.add_argument("--limit-gb", type=float, default=20.0)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, mode = args.child
        print(json.dumps(child(kind, int(n), args.image, mode)))
        return
    rows: dict[tuple[str, int], dict] = {}
    for kind in args.kinds:
        for n in args.sizes:
            row: dict = {}
            estimate = estimated_train_gb(kind, n, args.image)
            for mode in ("infer", "train"):
                if mode == "train" and estimate > args.limit_gb:
                    row["train_skipped"] = f"est. {estimate:.0f} GB"
                    continue
                if mode == "infer" and estimate / 3 > args.limit_gb:
                    row["infer_skipped"] = f"est. {estimate / 3:.0f} GB"
                    continue
                cmd = [sys.executable, __file__, "--image", str(args.image)]
                cmd += ["--child", kind, str(n), mode]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row[f"{mode}_skipped"] = f"failed ({proc.returncode})"
                    print(proc.stderr[-2000:], file=sys.stderr)
                    continue
                row.update({f"{mode}_{k}": v for k, v in json.loads(proc.stdout).items()})
            rows[kind, n] = row
            print(kind, n, json.dumps(row), file=sys.stderr, flush=True)
    report(rows, args.sizes, args.kinds)


def report(rows, sizes, kinds) -> None:
    base = sizes[0]
    print(f"\nimage {'x'.join(['320'] * 2)}, batch 1, ResNet-18, d 256, 6+6 layers, 900 queries")
    header = (
        f"{'classifier':<9} {'C':>9} {'params/cat':>11} {'infer kB/cat':>13} "
        f"{'train kB/cat':>13} {'forward s':>10} {'train step s':>13}"
    )
    print(header)
    for kind in kinds:
        b = rows.get((kind, base), {})
        for n in sizes:
            r = rows.get((kind, n), {})

            def slope(mode, r=r, n=n, b=b):
                key = f"{mode}_peak_gb"
                if n == base or key not in r or key not in b:
                    return "-" if n == base else r.get(f"{mode}_skipped", "-")
                return f"{(r[key] - b[key]) * 2**30 / (n - base) / 1e3:.2f}"

            params = (
                f"{(r['infer_params'] - b['infer_params']) / (n - base) / 1e3:.2f}K"
                if n != base and "infer_params" in r and "infer_params" in b
                else "-"
            )
            fwd = f"{r['infer_forward_s']:.2f}" if "infer_forward_s" in r else "-"
            step = f"{r['train_step_s']:.2f}" if "train_step_s" in r else "-"
            print(
                f"{kind:<9} {n:>9,} {params:>11} {slope('infer'):>13} {slope('train'):>13} "
                f"{fwd:>10} {step:>13}"
            )
    for n in sizes:
        cq, flat = rows.get(("cq_dino", n), {}), rows.get(("cq_all", n), {})
        if "infer_forward_s" in cq and "infer_forward_s" in flat:
            ratio = flat["infer_forward_s"] / cq["infer_forward_s"]
            print(f"C = {n:,}: forward without selection / with selection = {ratio:.1f}x")


if __name__ == "__main__":
    main()
