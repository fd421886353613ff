"""Does a trained selector read the image, or rank by frequency? Its AUC and AR^C beside the
frequency prior's, and AR^C after the prior is taken out of its logits.

    python benchmarks/selector_prior.py RUN --train-shards DIR --val-shards DIR [--keep 30]

RUN is a stage-1 (or CQ-DINO) run folder or model file. Every val image's selection logits
s [C] are ranked as they are and as s - tau * log p, p being each category's share of training
images (+1 each, so a category never seen is not infinitely favoured): post-hoc logit
adjustment. A selector whose evidence comes from the image keeps or gains recall as tau grows
from 0; one whose ranking is the prior's loses it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

TAUS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)


def main() -> None:
    from pipelines.loader import eval_loader
    from pipelines.shards import ShardSet
    from vastdet.evaluation.runner import eval_transforms
    from vastdet.evaluation.selection import per_image_auc, prior_auc, prior_recall
    from vastdet.runtime.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--train-shards", required=True)
    parser.add_argument("--val-shards", required=True)
    parser.add_argument("--keep", type=int, default=30, help="C', the categories kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _, config = load_model(args.run)
    ids = model.category_ids.tolist()
    column = {c: i for i, c in enumerate(ids)}
    images = ShardSet.open(args.train_shards).category_images()
    counts = np.array([images.get(c, 0) for c in ids], dtype=np.float64)
    transforms = eval_transforms(config, args.run)
    loader = eval_loader(args.val_shards, 4, transforms, 1, categories=ids)
    logits, present = [], []
    with torch.no_grad():
        for batch in loader:
            if batch.empty:
                continue
            logits.append(model(batch.images, batch.masks)["selection_logits"].float())
            present += [{column[int(c)] for c in t["labels"].tolist()} for t in batch.targets]
    scores = torch.cat(logits).numpy()
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    for b, rows in enumerate(present):
        positive[b, list(rows)] = True
    pairs = sum(len(p) for p in present)
    auc = per_image_auc(torch.from_numpy(scores), positive)
    by_id = [{ids[r] for r in p} for p in present]
    print(f"{len(present)} val images, {pairs} (image, category) pairs, C = {len(ids):,}")
    print("| | selector | frequency prior |\n|---|---|---|")
    print(f"| AUC | {float(auc[~auc.isnan()].mean()):.4f} | {prior_auc(by_id, images, ids):.4f} |")
    print(f"| AR^C (C' = {args.keep}) | see below | {prior_recall(by_id, images, args.keep):.4f} |")
    log_share = np.log((counts + 1) / (counts + 1).sum())
    print("\n| tau | " + " | ".join(str(t) for t in TAUS) + " |")
    print("|---" * (len(TAUS) + 1) + "|")
    cells = []
    for tau in TAUS:
        top = np.argsort(-(scores - tau * log_share), axis=1, kind="stable")[:, : args.keep]
        kept = sum(len(p & set(t.tolist())) for p, t in zip(present, top))
        cells.append(f"{kept / pairs:.4f}")
    print(f"| AR^C of s - tau log p | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
