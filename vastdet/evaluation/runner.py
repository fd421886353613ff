"""Distributed evaluation: inference over the val shards on every rank, gathered and scored on
rank 0 with the COCO or the V3Det protocol.

The same pass serves a plain model (`vastdet eval`, any number of processes, each holding the
whole model) and a DeepSpeed engine at the end of training (ZeRO-3 partitions the weights, so
every forward is collective): every rank runs the same number of batches, filler batches
included, and only real images are kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.annotations import FEDERATED_KEYS
from vastdet.config import at_least
from vastdet.evaluation import IncompleteEvaluationError
from vastdet.evaluation.coco import (
    STAT_NAMES,
    BoxArrays,
    Federated,
    category_descendants,
    evaluate_boxes,
    limit_per_image,
    novel_split,
    split_ap,
)
from vastdet.evaluation.results_file import write_results
from vastdet.evaluation.selection import prior_auc, prior_recall
from vastdet.evaluation.slices import (
    dataset_frequency_groups,
    frequency_groups,
    level_map,
    relabel,
)

log = logging.getLogger(__name__)

# maxDets per protocol; LVIS keeps 300 detections per image over all categories, one maxDet
PROTOCOLS = {"coco": (1, 10, 100), "v3det": (1, 10, 300), "lvis": (300,)}


@dataclass
class EvalConfig:
    """`coco`: 100 detections per image. `v3det`: 300, and a ground truth also counts, ignored,
    for each descendant category detected in its image (needs a category hierarchy)."""

    protocol: str = "coco"
    batch_size: int = at_least(1, 2)
    num_workers: int = at_least(0, 2)
    allow_partial: bool = False  # score even when fewer images were read than the shards hold
    levels: list[int] = at_least(0, default_factory=list)  # hierarchy depths to score AP at

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {self.protocol!r}")

    @property
    def max_dets(self) -> tuple[int, ...]:
        return PROTOCOLS[self.protocol]


@dataclass
class PassRecord:
    """One rank's evaluation pass: detections (arrays, a part per batch; `results` joins them),
    image entries and ground-truth annotations,
    [selected, present] (image, ground-truth category) pairs (CQ-DINO's AR^C; [0, 0] without
    selection), the selector's per-image AUC summed over the images that have one and their
    count, C' (0 without selection), and how often each query index's final-layer prediction
    was matched to a ground truth (empty without a matcher)."""

    detections: list[BoxArrays] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    recall: list[int] = field(default_factory=lambda: [0, 0])
    auc: list[float] = field(default_factory=lambda: [0.0, 0])
    num_selected: int = 0
    query_uses: list[int] = field(default_factory=list)

    @property
    def results(self) -> BoxArrays:
        return BoxArrays.concat(self.detections)


def gini(counts) -> float:
    """Gini coefficient of non-negative counts: 0 when every entry is equal, (n - 1) / n when
    one entry holds everything; 0 for no counts at all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


@torch.no_grad()
def predict_pass(
    forward: Callable, loader, post, device: torch.device | str = "cpu", matcher=None
) -> PassRecord:
    """This rank's `PassRecord` over an evaluation loader.

    Filler batches (`batch.empty`) are run through `forward` too, so that collective forwards
    stay in step across ranks, and their outputs are dropped. `post` None: no detections (a
    stage-1 selector). With `matcher` (the model's one-to-one matcher), each ground truth is
    matched to a final-layer prediction and the query index counted: PaQ-DETR's measure of
    query utilisation (its Table 6 Gini coefficient)."""
    from vastdet.models.criterion import column_targets

    record, uses = PassRecord(), None
    for batch in loader:
        outputs = forward(batch.images.to(device), batch.masks.to(device))
        if outputs.get("category_ids") is not None and outputs["category_ids"].dim() == 2:
            record.num_selected = int(outputs["category_ids"].shape[1])
        if batch.empty:
            continue
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        ids = [int(t["image_id"]) for t in batch.targets]
        if post is not None:
            record.detections.append(detection_arrays(post, outputs, sizes, ids))
        if matcher is not None and "pred_boxes" in outputs:
            n = outputs["pred_logits"].shape[1]
            uses = uses if uses is not None else torch.zeros(n, dtype=torch.int64)
            for queries, _ in matcher(outputs, column_targets(outputs, batch.targets)):
                uses += torch.bincount(queries, minlength=n)
        selected = outputs.get("category_ids")
        if "selection_logits" in outputs:
            aucs = selector_auc(outputs, batch.targets)
            aucs = aucs[~aucs.isnan()]
            record.auc[0] += float(aucs.sum())
            record.auc[1] += len(aucs)
        for b, (image_id, target) in enumerate(zip(ids, batch.targets)):
            height, width = (int(v) for v in target["orig_size"])
            federated = {k: target[k] for k in FEDERATED_KEYS if k in target}
            record.images.append({"id": image_id, "height": height, "width": width, **federated})
            record.annotations.extend({**a, "image_id": image_id} for a in target["annotations"])
            if selected is not None and selected.dim() == 2:
                present = {a["category_id"] for a in target["annotations"]}
                record.recall[0] += len(present & set(selected[b].tolist()))
                record.recall[1] += len(present)
    record.query_uses = uses.tolist() if uses is not None else []
    return record


def detection_arrays(post, outputs: dict, sizes: torch.Tensor, image_ids: list[int]) -> BoxArrays:
    """A batch's detections as arrays (`PostProcess.coco_boxes`), not a dict per detection."""
    parts = []
    for image_id, (scores, labels, xywh) in zip(image_ids, post.coco_boxes(outputs, sizes)):
        parts.append(
            BoxArrays(
                np.full(len(scores), image_id, dtype=np.int64),
                labels.numpy().astype(np.int64),
                xywh.double().numpy(),
                scores.double().numpy(),
            )
        )
    return BoxArrays.concat(parts)


def selector_auc(outputs: dict, targets: list[dict]) -> torch.Tensor:
    """Each image's AUC of the selection logits [B, C], its ground-truth categories against
    the rest ([B]; NaN for an image without ground truth)."""
    from vastdet.evaluation.selection import per_image_auc

    logits, ids = outputs["selection_logits"], outputs["all_category_ids"].to("cpu")
    positive = torch.zeros(logits.shape, dtype=torch.bool)
    for b, target in enumerate(targets):
        present = torch.as_tensor(
            [a["category_id"] for a in target["annotations"]], dtype=torch.int64
        )
        rows = torch.searchsorted(ids, present)
        positive[b, rows[rows < len(ids)]] = True
    return per_image_auc(logits.detach().to("cpu"), positive)


def gather_to_rank0(items: list) -> list | None:
    """Every rank's list concatenated in rank order on rank 0; None on the others."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return items
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if rank == 0 else None


def ground_truth(images: list[dict], annotations: list[dict], category_ids: Sequence[int]) -> dict:
    """A COCO ground-truth document; annotation ids are renumbered from 1 (pycocotools never
    counts a ground truth with id 0 as matched)."""
    seen: set[int] = set()
    for img in images:
        if img["id"] in seen:
            raise ValueError(f"image {img['id']} was evaluated twice: check the val shards")
        seen.add(img["id"])
    known = set(int(c) for c in category_ids)
    unknown = sorted({a["category_id"] for a in annotations} - known)
    if unknown:
        raise ValueError(
            f"ground-truth category ids {unknown[:10]} are not in the model's vocabulary "
            f"({len(known)} categories): evaluate with the category file the model was trained on"
        )
    anns = [
        {
            **a,
            "id": k + 1,
            "iscrowd": int(a.get("iscrowd", 0)),
            "area": float(a.get("area", a["bbox"][2] * a["bbox"][3])),
        }
        for k, a in enumerate(annotations)
    ]
    return {
        "images": sorted(images, key=lambda i: i["id"]),
        "annotations": anns,
        "categories": [{"id": int(c)} for c in sorted(known)],
    }


def score(
    results: BoxArrays | list[dict],
    images: list[dict],
    annotations: list[dict],
    category_ids: Sequence[int],
    protocol: str = "coco",
    taxonomy=None,
    levels: Sequence[int] = (),
    category_images: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """The 12 COCO numbers (AP at the protocol's largest maxDet), base/novel AP when the
    taxonomy marks novel categories, AP and AP50 at each hierarchy depth in `levels`
    (`AP_level<d>`, `AP50_level<d>`; needs the taxonomy), and APr/APc/APf when the training
    set's per-category image counts are given (`vastdet.evaluation.slices`)."""
    if protocol == "v3det" and taxonomy is None:
        raise ValueError("the v3det protocol needs the category hierarchy (a taxonomy file)")
    federated = None
    if protocol == "lvis":
        if not any(k in img for img in images for k in FEDERATED_KEYS):
            raise ValueError(
                "the lvis protocol needs LVIS's per-image neg_category_ids and "
                "not_exhaustive_category_ids, and these images have neither: shard the LVIS "
                "annotation file itself (`vastdet data shard`), which keeps them"
            )
        federated = Federated.from_images(images)
    if levels and taxonomy is None:
        raise ValueError("AP by hierarchy level needs the category hierarchy (a taxonomy file)")
    if not isinstance(results, BoxArrays):
        results = BoxArrays.from_results(results)
    gt = ground_truth(images, annotations, category_ids)
    descendants = category_descendants(taxonomy) if protocol == "v3det" else None
    if federated is not None:
        results = limit_per_image(results, PROTOCOLS[protocol][-1])
    evaluation = evaluate_boxes(gt, results, PROTOCOLS[protocol], descendants, federated)
    metrics = dict(evaluation.stats)
    groups = novel_split(taxonomy) if taxonomy is not None else {}
    metrics.update({f"AP_{name}": v for name, v in split_ap(evaluation, groups).items()})
    bins = {}
    if federated is not None and taxonomy is not None:
        bins = dataset_frequency_groups(taxonomy)
    if not bins and category_images is not None:
        bins = frequency_groups(category_images)
    metrics.update({f"AP{name}": v for name, v in split_ap(evaluation, bins).items()})
    for depth in levels:
        mapping = level_map(taxonomy, depth)
        coarse = sorted(set(mapping.values()))
        level_gt = ground_truth(images, relabel(annotations, mapping), coarse)
        stats = evaluate_boxes(level_gt, results.relabel(mapping), PROTOCOLS[protocol]).stats
        metrics.update({f"AP_level{depth}": stats["AP"], f"AP50_level{depth}": stats["AP50"]})
    metrics.update(images=len(gt["images"]), detections=len(results))
    return metrics


def evaluate_model(
    forward: Callable,
    post,
    category_ids: Sequence[int],
    val_shards,
    transforms: Callable,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    taxonomy=None,
    output_dir: str | os.PathLike | None = None,
    matcher=None,
    category_images: Mapping[int, int] | None = None,
) -> tuple[dict[str, float], BoxArrays] | None:
    """(metrics, detections as arrays) on rank 0, None elsewhere; rank 0 also writes `metrics.json` and
    `results.json` to `output_dir` when given. Every rank must call this. The postprocessor
    keeps at least the protocol's detections per image. With `matcher`, the metrics include
    `query_gini`: the Gini coefficient of how often each query index is matched to a ground
    truth over the whole set (`gini`).

    Samples that cannot be scored (corrupt images, bad boxes, category ids outside
    `category_ids`) are skipped and counted; the metrics record `images_expected` (the
    manifest's count), `images_evaluated` and `skipped` by kind, and rank 0 raises
    `IncompleteEvaluationError` after writing them when images are missing, unless
    `cfg.allow_partial`."""
    from pipelines.loader import eval_loader

    if post is not None:
        post.max_detections = max(post.max_detections, cfg.max_dets[-1])
    loader = eval_loader(
        val_shards, cfg.batch_size, transforms, cfg.num_workers, categories=category_ids
    )
    record = predict_pass(forward, loader, post, device, matcher)
    results = gather_to_rank0([record.results])
    images = gather_to_rank0(record.images)
    annotations = gather_to_rank0(record.annotations)
    recall = gather_to_rank0([record.recall])
    auc = gather_to_rank0([record.auc])
    uses = gather_to_rank0([record.query_uses])
    skipped = gather_to_rank0([loader.skipped()])
    if results is None:
        return None
    results = BoxArrays.concat(results)
    selected, present = (sum(r[i] for r in recall) for i in (0, 1))
    if post is None:
        metrics = {"images": len(images)}
    else:
        metrics = score(
            results,
            images,
            annotations,
            category_ids,
            cfg.protocol,
            taxonomy,
            cfg.levels,
            category_images,
        )
    per_image = {}  # each image's ground-truth categories
    for a in annotations:
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    if present:
        metrics["AR_C"] = selected / present  # ground-truth categories kept by the selection
        if category_images:  # the same count of the most frequent training categories
            metrics["AR_C_prior"] = prior_recall(
                per_image.values(), category_images, record.num_selected
            )
    if sum(a[1] for a in auc):
        metrics["selector_AUC"] = sum(a[0] for a in auc) / sum(a[1] for a in auc)
        if category_images:  # every image ranking the categories by their training images
            metrics["selector_AUC_prior"] = prior_auc(
                per_image.values(), category_images, category_ids
            )
    uses = [u for u in uses if u]
    if uses:  # per query index, summed over ranks
        metrics["query_gini"] = gini(np.sum(uses, axis=0))
    expected = val_shards.num_samples
    metrics.update(images_expected=expected, images_evaluated=len(images))
    metrics["skipped"] = dict(sum((Counter(s) for s in skipped), Counter()))
    if metrics["skipped"]:
        log.warning("evaluation skipped samples: %s", metrics["skipped"])
    if output_dir is not None:
        write_json(Path(output_dir) / "metrics.json", metrics)
        write_results(Path(output_dir) / "results.json", results)
        if cfg.levels and post is not None:
            plot_levels(metrics, cfg.levels, Path(output_dir) / "ap_by_level.png")
    if len(images) < expected and not cfg.allow_partial:
        raise IncompleteEvaluationError(
            f"evaluated {len(images)} of the {expected} images the val shards list "
            f"(skipped: {metrics['skipped'] or 'none counted: missing or truncated shards?'}); "
            "the numbers would describe a subset. Fix the shards (`vastdet data inspect "
            "--verify`) or allow partial evaluation (`--allow-partial`, eval.allow_partial)"
        )
    return metrics, results


def run_matcher(config: dict, source: str):
    """The one-to-one matcher of a run's saved model configuration (query-use counts)."""
    from vastdet.config import from_dict
    from vastdet.models.build import ModelConfig, build_matcher

    return build_matcher(from_dict(ModelConfig, config["model"], source, "model"))


def eval_transforms(config: dict, source: str) -> Callable:
    """The evaluation transforms of a run's saved configuration."""
    from pipelines.transforms import TransformConfig, build_transforms
    from vastdet.config import from_dict

    transforms = from_dict(TransformConfig, config["data"]["transforms"], source, "data.transforms")
    return build_transforms(transforms, train=False)


def plot_levels(metrics: dict, levels: Sequence[int], path: Path) -> Path:
    """A chart of AP and AP50 against the hierarchy depth they were scored at."""
    from vastdet.runtime.plot import outside_legend, pyplot, save_figure

    plt = pyplot()

    depths = sorted(levels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("AP", "AP50"):
        ax.plot(depths, [metrics[f"{name}_level{d}"] for d in depths], marker="o", label=name)
    ax.set(xlabel="hierarchy depth (categories mapped to their ancestor there)", ylabel="AP")
    ax.set_xticks(depths)
    ax.grid(alpha=0.3)
    outside_legend(ax)
    return save_figure(fig, path)


def format_metrics(metrics: dict) -> str:
    """One line per number, COCO's names first; counts as integers, skip counts by kind."""

    def shown(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"

    names = sorted(metrics, key=_stat_order)
    return "\n".join(f"{n:<16} {shown(metrics[n])}" for n in names)


def _stat_order(name: str) -> tuple:
    """COCO's order for the summary numbers (recall by its maxDet), then the rest by name."""
    if name in STAT_NAMES[:6]:
        return (0, STAT_NAMES.index(name), name)
    if name.startswith("AR") and name[2:].isdigit():
        return (1, int(name[2:]), name)
    if name in ("ARs", "ARm", "ARl"):
        return (2, ("ARs", "ARm", "ARl").index(name), name)
    return (3, 0, name)


def run_eval(
    model_path: str | os.PathLike,
    val_shards: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: EvalConfig,
    categories: str | os.PathLike | None = None,
    train_shards: str | os.PathLike | None = None,
) -> dict[str, float] | None:
    """`vastdet eval`: a trained model (exported file or run folder) over the val shards.

    Runs as one process or under any launcher (every rank holds the whole model and reads its
    share of the shards); rank 0 writes `metrics.json` and `results.json` to `output_dir`.
    APr/APc/APf take their training-image counts from `train_shards`, else from the training
    shards the run names (when they can be opened here)."""
    from pipelines.shards import ShardSet
    from pipelines.sources import is_url
    from vastdet.runtime.distributed import init_distributed, prepare_deepspeed
    from vastdet.runtime.loading import check_run_dir, load_model

    check_run_dir(model_path)  # before joining a process group: a wrong path fails at once
    if categories is not None and not is_url(categories) and not Path(categories).is_file():
        raise FileNotFoundError(f"no category file {categories}")
    rank, _ = init_distributed(prepare_deepspeed())
    model, post, config = load_model(model_path)
    transforms = eval_transforms(config, str(model_path))
    shards = ShardSet.open(val_shards)
    taxonomy = find_taxonomy(categories, config["data"].get("categories"), shards.categories_file)
    device = next(model.parameters()).device
    out = evaluate_model(
        model,
        post,
        model.category_ids.tolist(),
        shards,
        transforms,
        cfg,
        device,
        taxonomy,
        output_dir,
        run_matcher(config, str(model_path)),
        training_counts(train_shards or config["data"].get("train_shards")),
    )
    return out[0] if rank == 0 and out is not None else None


def training_counts(train_shards: str | os.PathLike | None) -> dict[int, int] | None:
    """Per-category training-image counts from a training manifest, or None (none given, or
    not readable from here)."""
    from pipelines.shards import ShardSet

    if not train_shards:
        return None
    try:
        return ShardSet.open(train_shards).category_images()
    except (OSError, ValueError):
        return None


def manifest_categories(shards: str | os.PathLike | None) -> Path | None:
    """The category file a shard set's manifest names, or None (no shards, or unreadable)."""
    from pipelines.shards import ShardSet

    if not shards:
        return None
    try:
        return ShardSet.open(shards).categories_file
    except (OSError, ValueError):
        return None


def find_taxonomy(*candidates: str | os.PathLike | None):
    """The taxonomy in the first candidate file that exists (the hierarchy and novel flags
    evaluation uses), or None."""
    from pipelines.sources import is_url, local_copy
    from taxonomy import load_taxonomy

    for path in candidates:
        if path and is_url(path):
            path = local_copy(path)
        if path and Path(path).is_file():
            return load_taxonomy(path)
    return None


def write_json(path: Path, data) -> None:
    from taxonomy.files import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data))
