"""How many image views CQ-DINO's selector needs before it reads the image, and how the batch
and learning rate spend them: stage 1's selector trained on the demo's data, AR^C and AUC every
`--every` views beside the frequency prior's, and a linear probe on the same features as a
reference for what the features allow.

    python benchmarks/selector_views.py [--under carnivore.n.01] [--train 6400] [--val 300]
        [--settings 4:5e-4,4:2e-3,16:2e-3] [--views 24000] [--every 4000]
        [--workdir runs/selector_views]

The data are the demo's (`cluster.demo`: its image and box sizes, up to 3 objects, Zipf 1.1
frequencies, seed 0) over the WordNet subtree `--under`; the model is `cq_dino_tiny_stage1` over
the shipped backbone, which the demo keeps frozen (batch-norm statistics included), so its
features are computed once and cached in the work folder, and each setting trains the category
queries and the selector head on them: the demo's stage 1 without its scale and flip
augmentation and with one process in place of two data-parallel workers. A setting `B:LR` is B images a step at
learning rate LR (AdamW, weight decay 1e-4, 50 warm-up steps, gradients clipped at 1.0, as the
demo's stage 1). The probe is a linear multi-label classifier (binary cross-entropy, Adam 3e-3,
64 images a step) on each image's mean-pooled last-level features.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROBE_BATCH, PROBE_LR = 64, 3e-3


def features(under: str, train: int, val: int, subsampling: str, work: Path) -> dict:
    """({"train"|"val": {"features": [N, 512, h, w], "masks": padding [N, H, W], "labels":
    category ids per image}}, the taxonomy file, the category embeddings file), each made and
    cached in `work` when missing."""
    from cluster.demo import MAX_SIDE, prepare_vocabulary, synth_config
    from pipelines.synthetic import SyntheticRenderer, make_records
    from pipelines.transforms import decode_image_bytes, normalize_images
    from taxonomy import load_taxonomy

    tax_file, emb_file = prepare_vocabulary(work, under, None)
    cache = work / f"features_{train}_{val}_{subsampling.replace(':', '')}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True), tax_file, emb_file
    tax = load_taxonomy(tax_file)
    cfg = synth_config(train, val, subsampling)
    renderer = SyntheticRenderer(tax, cfg)
    backbone = stage1_model(tax_file, emb_file)[0].backbone.eval()
    out = {}
    for split, records in make_records(tax, cfg).items():
        feats, masks, labels = [], [], []
        for i in range(0, len(records), 32):
            chunk = records[i : i + 32]
            images = torch.zeros(len(chunk), 3, MAX_SIDE, MAX_SIDE)
            mask = torch.ones(len(chunk), MAX_SIDE, MAX_SIDE, dtype=torch.bool)
            for j, r in enumerate(chunk):
                image = decode_image_bytes(renderer(r))  # the shards' JPEG, as training reads it
                images[j, :, : r.height, : r.width] = normalize_images(image)
                mask[j, : r.height, : r.width] = False
                labels.append(sorted({a["category_id"] for a in r.annotations}))
            with torch.no_grad():
                feats.append(backbone(images)[-1])
            masks.append(mask)
        out[split] = {"features": torch.cat(feats), "masks": torch.cat(masks), "labels": labels}
        print(f"{split}: {len(records)} images, features {tuple(out[split]['features'].shape)}")
    torch.save(out, cache)
    return out, tax_file, emb_file


def stage1_model(tax_file: Path, emb_file: Path):
    """The demo's stage-1 model (`cq_dino_tiny_stage1`, the shipped backbone frozen) and its
    selection loss."""
    from taxonomy import load_taxonomy
    from vastdet.config import from_dict
    from vastdet.models.build import ModelConfig, build_model

    tax = load_taxonomy(tax_file)
    cfg = from_dict(
        ModelConfig,
        {
            "preset": "cq_dino_tiny_stage1",
            "category_embeddings": str(emb_file),
            "train_backbone_from_stage": 5,
        },
    )
    model, criterion, _ = build_model(cfg, tax.category_ids().tolist(), tax)
    return model, criterion


def recall_auc(scores: torch.Tensor, positive: torch.Tensor, keep: int) -> tuple[float, float]:
    """(AR^C: the share of (image, present category) pairs among each image's `keep` best
    scores, mean per-image AUC)."""
    from vastdet.evaluation.selection import per_image_auc

    top = scores.topk(keep, 1).indices
    kept = torch.zeros_like(positive).scatter_(1, top, True) & positive
    auc = per_image_auc(scores, positive)
    return kept.sum().item() / positive.sum().item(), float(auc[~auc.isnan()].mean())


def positives(labels: list[list[int]], category_ids: torch.Tensor) -> torch.Tensor:
    """[N, C] bool: the categories present in each image, as the selection loss takes them."""
    from vastdet.models.cq_dino import selection_targets

    targets = [{"labels": torch.tensor(cats, dtype=torch.int64)} for cats in labels]
    return selection_targets(targets, category_ids, len(category_ids))


def train_selector(data, tax_file, emb_file, batch, lr, views, every, keep):
    """[(views, AR^C, AUC)] of the selector trained `views` images at `batch` a step."""
    from vastdet.engine.optim import AdamW

    torch.manual_seed(0)
    model, criterion = stage1_model(tax_file, emb_file)
    model.backbone = None  # its features are cached
    train, val = data["train"], data["val"]
    positive = positives(val["labels"], model.category_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = AdamW(params, lr=lr, weight_decay=1e-4)
    order = torch.randperm(len(train["labels"]), generator=torch.Generator().manual_seed(0))
    rows, at, seen = [], 0, 0
    for step in range(1, views // batch + 1):
        if at + batch > len(order):
            order, at = torch.randperm(len(order)), 0
        idx = order[at : at + batch].tolist()
        at += batch
        targets = [{"labels": torch.tensor(train["labels"][i])} for i in idx]
        model.train()
        _, _, logits, picked, _ = model.select(
            [train["features"][idx]], train["masks"][idx], targets
        )
        loss = criterion(model.selection_outputs(logits, picked), targets)["loss_sel"]
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        seen += batch
        if seen // every != (seen - batch) // every or step == views // batch:
            model.eval()
            with torch.no_grad():
                chunks = [
                    model.select([val["features"][i : i + 64]], val["masks"][i : i + 64], None)
                    for i in range(0, len(positive), 64)
                ]
            scores = torch.cat([logits for _, _, logits, _, _ in chunks])
            rows.append((seen, *recall_auc(scores, positive, keep)))
    return rows


def train_probe(data, category_ids: torch.Tensor, views, every, keep):
    """[(views, AR^C, AUC)] of a linear probe on mean-pooled features."""
    from vastdet.models.backbone import downsample_mask

    torch.manual_seed(0)
    train, val = data["train"], data["val"]

    def pooled(split):  # the masked mean, as the selector's global token takes it
        feats = split["features"]
        keep_ = (~downsample_mask(split["masks"], feats.shape[-2:])).to(feats.dtype)[:, None]
        return (feats * keep_).sum((2, 3)) / keep_.sum((2, 3)).clamp(min=1)

    x, xv = pooled(train), pooled(val)
    y = positives(train["labels"], category_ids).float()
    positive = positives(val["labels"], category_ids)
    head = torch.nn.Linear(x.shape[1], len(category_ids))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optim = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    order, at, seen, rows = torch.randperm(len(x)), 0, 0, []
    while seen < views:
        if at + PROBE_BATCH > len(order):
            order, at = torch.randperm(len(x)), 0
        idx = order[at : at + PROBE_BATCH]
        at += PROBE_BATCH
        loss = F.binary_cross_entropy_with_logits(head(x[idx]), y[idx], reduction="sum") / len(idx)
        optim.zero_grad()
        loss.backward()
        optim.step()
        seen += PROBE_BATCH
        if seen // every != (seen - PROBE_BATCH) // every or seen >= views:
            with torch.no_grad():
                rows.append((seen, *recall_auc(head(xv), positive, keep)))
    return rows


def main() -> None:
    from cluster.demo import JPEG_SUBSAMPLING
    from taxonomy import load_taxonomy
    from vastdet.evaluation.selection import prior_auc, prior_recall

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--under", default="carnivore.n.01", help="WordNet subtree")
    parser.add_argument("--train", type=int, default=6400, help="training images")
    parser.add_argument("--val", type=int, default=300, help="held-out images")
    parser.add_argument("--settings", default="4:5e-4,4:2e-3,16:2e-3", help="BATCH:LR,...")
    parser.add_argument("--views", type=int, default=24000, help="training images seen")
    parser.add_argument("--every", type=int, default=4000, help="views between evaluations")
    parser.add_argument("--keep", type=int, default=30, help="C', the categories kept")
    parser.add_argument(
        "--subsampling", default=JPEG_SUBSAMPLING, help="the JPEGs' chroma subsampling"
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/selector_views"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data, tax_file, emb_file = features(
        args.under, args.train, args.val, args.subsampling, args.workdir / args.under
    )
    ids = sorted(load_taxonomy(tax_file).category_ids().tolist())
    counts: dict[int, int] = {}
    for cats in data["train"]["labels"]:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    val = data["val"]["labels"]
    print(
        f"{len(ids):,} categories under {args.under}; {args.train} training images, "
        f"{len(val)} held out, JPEG {args.subsampling}; features in "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(
        f"frequency prior: AR^C {prior_recall(val, counts, args.keep):.3f}, "
        f"AUC {prior_auc(val, counts, ids):.3f}"
    )
    results = {}
    for setting in args.settings.split(","):
        batch, lr = setting.split(":")
        t = time.perf_counter()
        results[f"selector, {batch} a step, lr {lr}"] = train_selector(
            data, tax_file, emb_file, int(batch), float(lr), args.views, args.every, args.keep
        )
        print(f"  selector {setting}: {time.perf_counter() - t:.0f} s", flush=True)
    results[f"linear probe, {PROBE_BATCH} a step, lr {PROBE_LR}"] = train_probe(
        data, torch.tensor(ids), args.views, args.every, args.keep
    )
    marks = [v for v, _, _ in next(iter(results.values()))]
    print("\nAR^C (AUC) after so many training images seen:")
    print("| setting | " + " | ".join(f"{v:,}" for v in marks) + " |")
    print("|---" * (len(marks) + 1) + "|")
    for name, rows in results.items():
        by = {v: (r, a) for v, r, a in rows}
        cells = []
        for v in marks:
            near = min(by, key=lambda k: abs(k - v))
            cells.append(f"{by[near][0]:.3f} ({by[near][1]:.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
