"""`make demo`: the main job end to end on this machine, in minutes on 2 CPU cores.

1. A taxonomy of every WordNet noun under `carnivore.n.01` (366 categories at depths 11-18 below
   `entity`; `--under mammal.n.01` gives 1,182).
2. OpenCLIP text embeddings of the categories with the tiny registered text tower (no weights
   file: randomly initialised, and the log says so; give `--clip-checkpoint` for real ones).
3. A synthetic long-tailed dataset over the taxonomy, written to webdataset shards: objects
   inherit their shape from a high ancestor and their colour from a mid-level one, so the
   family is visible and the species is in the texture.
4. A local Ray instance runs CQ-DINO's pipeline (`cluster.pipeline`): stage 1 trains the
   selector and stage 2 the detector from it, each a Ray Train job of 2 DeepSpeed workers
   (ZeRO-2, gloo) whose checkpoints go through Ray's storage, stage 2 evaluating the val
   shards as it goes; then the evaluation of the final model is a Ray Train job of its own.
   The driver prints each stage's progress.
5. The table: AP, AP at three depths of the hierarchy (is the family right?), AP by training
   frequency (LVIS's rare/common/frequent), each beside what random boxes score on the same
   images; the selector's recall AR^C beside the frequency prior's (the 30 most frequent
   training categories for every image: what a selector that ignores the image keeps) and its
   AUC beside that prior's (every image ranking the categories by frequency, far above 0.5 on
   a long tail); the learning curve and other charts as PNGs.

Finished steps are recorded in the run folder and skipped, so a second run goes straight to
the table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import yaml

log = logging.getLogger("cluster.demo")
TRAIN, VAL = 6400, 200  # images
MIN_SIDE, MAX_SIDE = 128, 160  # image sides, px
MIN_BOX, MAX_BOX = 0.25, 0.7  # object sides as fractions of the image's short side
# the shards' JPEGs keep full colour resolution: at 4:2:0 (libjpeg's default) the selector
# learns a third slower on these small images (benchmarks/RESULTS.md, "How many images")
JPEG_SUBSAMPLING = "4:4:4"
UNDER = "carnivore.n.01"
STEPS1, STEPS2 = 2000, 800
BATCH1 = 8  # stage-1 images per worker and step (stage 2: 2)
LEVELS = (1, 2, 3)  # depths below the root scored again (8, 49 and 141 ancestors of carnivores)


def synth_config(train: int, val: int, jpeg_subsampling: str = JPEG_SUBSAMPLING):
    """The demo's synthetic data: its image and box sizes, up to 3 objects, seed 0."""
    from pipelines.synthetic import SynthConfig

    return SynthConfig(
        num_train=train, num_val=val, min_side=MIN_SIDE, max_side=MAX_SIDE, max_objects=3,
        min_box=MIN_BOX, max_box=MAX_BOX, jpeg_subsampling=jpeg_subsampling, seed=0,
    )  # fmt: skip


def prepare_vocabulary(work: Path, under: str, clip_checkpoint: str | None):
    """(taxonomy file, embedding file) of the WordNet subtree `under`, made when missing."""
    from taxonomy import load_taxonomy, save_taxonomy
    from taxonomy.embeddings import TINY_MODEL, EmbeddingSpec, embed_categories
    from taxonomy.wordnet import build_wordnet_taxonomy, hyponym_closure

    work.mkdir(parents=True, exist_ok=True)
    tax_file = work / "taxonomy.json"
    if not tax_file.is_file():
        save_taxonomy(build_wordnet_taxonomy(hyponym_closure([under])), tax_file)
    tax = load_taxonomy(tax_file)
    log.info("taxonomy: %d categories under %s", tax.num_categories, under)
    emb_file = work / "embeddings.pt"
    spec = EmbeddingSpec(
        model=TINY_MODEL, checkpoint=clip_checkpoint, templates=("a photo of a {}.",)
    )
    embed_categories(tax, spec, emb_file, progress=False)
    return tax_file, emb_file


def prepare_data(work: Path, under: str, train: int, val: int, clip_checkpoint: str | None):
    """(taxonomy file, embedding file, train shards, val shards), made when missing."""
    from pipelines.shards import write_shards
    from pipelines.synthetic import SyntheticRenderer, make_records
    from taxonomy import load_taxonomy

    tax_file, emb_file = prepare_vocabulary(work, under, clip_checkpoint)
    shards = {s: work / "shards" / s for s in ("train", "val")}
    if not all((p / "manifest.json").is_file() for p in shards.values()):
        tax = load_taxonomy(tax_file)
        cfg = synth_config(train, val)
        renderer = SyntheticRenderer(tax, cfg)
        for split, records in make_records(tax, cfg).items():
            write_shards(
                records,
                renderer,
                shards[split],
                prefix=split,
                max_samples=250,
                workers=2,
                source="synthetic seed 0",
                categories_file=tax_file,
                progress=False,
            )
    return tax_file, emb_file, shards["train"], shards["val"]


def pipeline_config(
    work: Path, tax_file, emb_file, train_shards, val_shards, steps1: int, steps2: int
) -> dict:
    """The two stages' settings: tiny CQ-DINO, small images, ZeRO-2 on every worker."""
    data = {
        "train_shards": str(train_shards),
        "val_shards": str(val_shards),
        "categories": str(tax_file),
        "batch_size": 2,
        "num_workers": 1,
        "shuffle_buffer": 100,
        "transforms": {
            "scales": [128, 144, 160],
            "max_size": 256,
            "crop_resize": [],
            "eval_size": 160,
        },
    }
    common = {"data": data, "zero_stage": 2, "log_every": 10, "steps_per_epoch": 250}
    # the tiny presets start from the shipped backbone (`vastdet:resnet18_synth`), pretrained
    # on synthetic images of a vocabulary disjoint from WordNet's. The demo keeps all of it
    # frozen (the paper trains it, at a hundredth of the rate in stage 2): a step then costs
    # 0.14 s instead of 0.52 s in stage 1 and 0.30 s instead of 0.72 s in stage 2 (one thread),
    # and on the mammals the selector reached the AUC and AR^C it reached over a trained
    # backbone and frozen stage-2 steps the leaf AP of trained ones in a third of the time
    # (benchmarks/RESULTS.md, "The demo's selector"; README, "The demo")
    model = {
        "preset": "cq_dino_tiny",
        "category_embeddings": str(emb_file),
        "train_backbone_from_stage": 5,
    }
    stage1 = {
        **common,
        "model": {**model, "architecture": "cq_selector"},
        "optim": {"lr": 2e-3, "clip_grad": 1.0, "warmup_steps": 50},
        "steps": steps1,
        "checkpoint_every": steps1,
        "output_dir": str(work / "stage1"),
    }
    # stage 1 has no boxes to evaluate. The selector learns a category from the images it sees,
    # not from its steps: over these 366 categories its recall passes the prior's after a few
    # thousand images and 0.85 after some 24,000-28,000 (benchmarks/selector_views.py). 8 images
    # a worker and step train 64 images/s here against 35 at 2 (the step's fixed cost shared),
    # and at 2e-3 the larger batch spends its images as well as 4 a step at 5e-4 or 2e-3 do
    stage1["data"] = {**data, "val_shards": None, "batch_size": BATCH1}
    low = {"pattern": r"^(category_queries|selector)\.", "lr_mult": 0.01}
    stage2 = {
        **common,
        "model": model,
        "optim": {
            "lr": 1e-3,
            "clip_grad": 0.1,
            "param_groups": [low],
            "warmup_steps": min(50, steps2 // 10),
            "decay_steps": [int(steps2 * 0.8)],
        },
        "steps": steps2,
        "checkpoint_every": max(steps2 // 2, 1),
        "output_dir": str(work / "stage2"),
        "eval": {"batch_size": 4, "num_workers": 1, "levels": list(LEVELS)},
        "eval_every": max(steps2 // 4, 1),  # the learning curve's points
    }
    return {
        "stage1": stage1,
        "stage2": stage2,
        "num_workers": 2,
        "max_failures": 1,
        "run_dir": str(work),
    }


def random_baseline(paths, evaluation: dict) -> dict:
    """The random-box baseline on the same val shards, scored the same way."""
    from taxonomy import load_taxonomy
    from vastdet.evaluation.baseline import random_baseline as baseline

    tax_file, _, train_shards, val_shards = paths
    taxonomy = load_taxonomy(tax_file)
    return baseline(
        val_shards, train_shards, taxonomy.category_ids().tolist(), taxonomy, LEVELS,
        min_box=MIN_BOX, max_box=MAX_BOX,
    )  # fmt: skip


def report(evaluation: dict, baseline: dict, categories: int, under: str) -> list[str]:
    """The demo's table: the model against random boxes, metric by metric."""
    rows = [("AP (the categories: leaves)", "AP"), ("AP50", "AP50"), ("AR100", "AR100")]
    rows += [(f"AP at depth {d}", f"AP_level{d}") for d in LEVELS]
    rows += [(f"AP50 at depth {d}", f"AP50_level{d}") for d in LEVELS]
    rows += [("APr (1-10 images)", "APr"), ("APc (11-100)", "APc"), ("APf (>100)", "APf")]
    lines = [
        "CQ-DINO demo (synthetic data, tiny model; a demonstration, not a benchmark)",
        f"  categories {categories:,} (WordNet under {under}); val images "
        f"{evaluation.get('images_evaluated', '?')}",
        f"  {'metric':<28}{'CQ-DINO':>10}{'random boxes':>14}",
    ]
    lines += [row(label, evaluation.get(key), baseline.get(key)) for label, key in rows]
    lines += [
        f"  {'selector':<28}{'CQ-DINO':>10}{'without image':>14}",
        row("AR^C (C' = 30 kept)", evaluation.get("AR_C"), evaluation.get("AR_C_prior")),
        row("selector AUC", evaluation.get("selector_AUC"), evaluation.get("selector_AUC_prior")),
    ]
    return lines


def row(label: str, model, chance) -> str:
    cells = [f"{v:.4f}" if isinstance(v, float) else "-" for v in (model, chance)]
    return f"  {label:<28}{cells[0]:>10}{cells[1]:>14}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--under", default=UNDER, help="WordNet subtree of categories")
    parser.add_argument("--train", type=int, default=TRAIN, help="training images")
    parser.add_argument("--val", type=int, default=VAL, help="validation images")
    parser.add_argument("--steps1", type=int, default=STEPS1, help="stage-1 steps")
    parser.add_argument("--steps2", type=int, default=STEPS2, help="stage-2 steps")
    parser.add_argument("--clip-checkpoint", help="a local OpenCLIP checkpoint for embeddings")
    args = parser.parse_args(argv)
    from vastdet.cli import configure_logging

    configure_logging()
    args.workdir = args.workdir.resolve()  # Ray workers run in folders of their own
    start = time.perf_counter()
    paths = prepare_data(args.workdir, args.under, args.train, args.val, args.clip_checkpoint)
    prepared = time.perf_counter() - start
    config = pipeline_config(args.workdir, *paths, args.steps1, args.steps2)
    config_file = args.workdir / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("data ready in %.0f s; pipeline: %s", prepared, config_file)

    import ray

    from cluster.local import start_local_ray
    from cluster.pipeline import load_pipeline, run_pipeline

    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        summary = run_pipeline(load_pipeline(config_file))
    finally:
        ray.shutdown()
    from taxonomy import load_taxonomy

    evaluation = summary["eval"] or {}
    baseline = random_baseline(paths, evaluation)
    categories = load_taxonomy(paths[0]).num_categories
    print()
    print("\n".join(report(evaluation, baseline, categories, args.under)))
    stage2 = args.workdir / "stage2" / "plots"
    print(f"  learning curve  {stage2 / 'validation_ap.png'}")
    print(f"  losses          {args.workdir / 'stage1' / 'plots'} and {stage2}")
    print(f"  AP by depth     {args.workdir / 'eval' / 'ap_by_level.png'}")
    print(f"  total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
