"""Taxonomy-guided (beam) selection against flat selection: the selector's time and memory per
image at V3Det's 13,204 categories (its tree linked to WordNet, non-category synsets included)
and at 1,000,000 (a 10-way synthetic tree), full-size selector head.

    python benchmarks/bench_beam.py [--sizes 13204 1000000] [--beams 4 16 64]
        [--workdir runs/bench_beam]

Each vocabulary size runs in a process of its own: the full-size CQ-DINO stage-1 model
(category width 768 from 768-wide embeddings, tree construction, the released selector head:
2 layers, 4 heads, FFN 3072) in its inference form (the encoded category queries only, as
`vastdet eval` and `predict` run it), then selection alone on one image's last backbone level
(512 channels, 25 x 42 positions: an 800 x 1333 image at stride 32). Time is the median of 3
selections; memory the peak resident set during them above what the model holds. Flat scores
every category; beam B walks the tree keeping the B best nodes per step. The ratio column is
flat's time over each row's, from the same process. Above `--flat-sample` categories (100,000)
flat selection is timed on that many categories and its time scaled by C / sample: it scores
categories chunk by chunk, each on its own, so its time is linear in C (at 10^6 one selection
would take about a quarter of an hour here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_vocab_scaling import peak_gb, reset_peak, rss_gb, synthetic_taxonomy

CHANNELS, H, W = 512, 25, 42


def taxonomy_for(size: int, work: Path):
    if size == 13204:
        from ladder import v3det_tree

        from taxonomy import load_taxonomy

        return load_taxonomy(v3det_tree(work))
    return synthetic_taxonomy(size)[0]


def child(size: int, beams: list[int], work: Path, flat_sample: int) -> dict:
    import torch

    from vastdet.models.build import ModelConfig, build_model

    torch.manual_seed(0)
    tax = taxonomy_for(size, work)
    ids = tax.category_ids().tolist()
    cfg = ModelConfig(
        architecture="cq_selector", backbone="resnet18", text_dim=768, num_selected=100,
        selection="beam", beam_width=max(beams),
    )  # fmt: skip
    start = time.perf_counter()
    model, _, _ = build_model(cfg, ids, tax)
    built = time.perf_counter() - start
    model.eval()
    model.category_queries.freeze_for_inference()
    feature = torch.randn(1, CHANNELS, H, W)
    masks = torch.zeros(1, H * 32, W * 32, dtype=torch.bool)
    rows = {}
    beam = model.beam

    def measure(name: str, run) -> None:
        reset_peak()
        base = rss_gb()
        times = []
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                scored, scale = run()
                times.append((time.perf_counter() - t) * scale)
        rows[name] = {
            "seconds": statistics.median(times), "peak_gb": peak_gb() - base, "scored": scored,
            "scaled_from": scored if scale != 1 else None,
        }  # fmt: skip

    def walk():
        out = model.select([feature], masks, None)
        return int((out[4]["beam_rows"] >= 0).sum()), 1.0

    cats = model.category_queries()
    sample = min(len(ids), flat_sample)

    def flat():  # the flat path's scoring (`ImageGuidedSelection.score`), on `sample` rows
        kv, bias = model.selector.tokens(feature, masks[:, ::32, ::32])
        model.selector.score(cats[:sample], kv, bias).topk(min(100, sample), dim=1)
        return sample, len(ids) / sample

    for b in beams:
        beam.beam_width = b
        measure(f"beam {b}", walk)
    measure("flat", flat)
    return {"categories": len(ids), "tree_rows": beam.num_rows, "build_s": built, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[13204, 1_000_000])
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_beam"))
    parser.add_argument("--flat-sample", type=int, default=100_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.beams, args.workdir, args.flat_sample)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(
        "| categories | selection | nodes scored per image | seconds per image | flat / this "
        "| peak GB above the model |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--workdir", str(args.workdir)]
        cmd += ["--flat-sample", str(args.flat_sample)]
        out = subprocess.run(
            cmd + ["--beams", *map(str, args.beams)], env=env, capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        flat = result["rows"]["flat"]["seconds"]
        for name, row in result["rows"].items():
            scored = f"{row['scored']:,}"
            if row["scaled_from"]:
                scored = f"{result['categories']:,} (timed on {row['scaled_from']:,}, scaled)"
            print(
                f"| {result['categories']:,} | {name} | {scored} | {row['seconds']:.4f} "
                f"| {flat / row['seconds']:.1f}x | {row['peak_gb']:.2f} |"
            )


if __name__ == "__main__":
    main()
