"""Pretraining a small backbone for CPU work: the part ImageNet plays for V3Det, on synthetic
images of a vocabulary no detector here is evaluated on.

Real detectors start from an ImageNet backbone; a detector trained from random weights on two
CPU cores never reaches the regime where CQ-DINO and DINO differ. This recipe trains a
torchvision ResNet-18 (batch norm) on images drawn by the synthetic renderer
(`pipelines.synthetic`) from a **made-up tree** of `categories` leaf categories whose node ids
(`pt...`) occur in no WordNet, V3Det or benchmark vocabulary: it learns the renderer's shapes,
colours, textures and proportions as ImageNet teaches edges and textures, never the categories
the detectors are scored on.

Two objectives on one trunk, both at the scale detection reads:
- every annotated box is classified from features RoI-aligned on the stride-16 and stride-32
  maps (softmax cross-entropy), among the leaves and, coarse to fine, among the tree's nodes at
  each depth its path reaches: localised features, as a detector's heads need (the coarse
  levels, few classes each, give the trunk its first signal long before 1,000-way leaves do);
- every image is tagged with the leaves it holds from the pooled stride-32 map (binary
  cross-entropy): the multi-label task CQ-DINO's selector solves on the same map.

The weights (the trunk only, without the pretraining heads or `fc`) are written as safetensors
in float16 with a JSON record beside them: sha256, the command, the vocabulary, time, steps and
held-out accuracy. `vastdet pretrain-backbone -o FILE` runs the recipe; `make backbone` writes
the file the tiny presets name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from taxonomy import Node, Taxonomy

log = logging.getLogger(__name__)

ID_PREFIX = "pt"  # node ids of the pretraining tree; no other vocabulary here uses it


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe: vocabulary, data, schedule."""

    categories: int = 1000
    train_images: int = 40_000
    val_images: int = 2_000
    image_size: int = 128
    batch_size: int = 64
    steps: int = 2_500
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    seed: int = 0


def pretraining_taxonomy(categories: int, seed: int = 0) -> Taxonomy:
    """A random tree with `categories` leaf categories (ids 1..categories) under one root,
    paths 4-9 levels long with 2-5 children per internal node (WordNet-like depths, so the
    renderer's shape, colour and lightness come from different ancestors); internal nodes are
    not categories. Node ids are `pt<number>`."""
    if categories < 2:
        raise ValueError("the pretraining vocabulary needs at least 2 categories")
    rng = np.random.default_rng(seed)
    nodes: list[tuple[str, str | None, int]] = [(f"{ID_PREFIX}0", None, 0)]  # id, parent, depth
    frontier, leaves = [0], []
    while frontier and len(leaves) < categories:
        index = frontier.pop(int(rng.integers(len(frontier))))
        node_id, _, depth = nodes[index]
        if depth >= 4 and (depth >= 9 or rng.random() < 0.35):
            leaves.append(index)
            continue
        for _ in range(int(rng.integers(2, 6))):
            nodes.append((f"{ID_PREFIX}{len(nodes)}", node_id, depth + 1))
            frontier.append(len(nodes) - 1)
    keep = set((leaves + frontier)[:categories])  # unexpanded nodes end as leaves if needed
    # keep the kept leaves and their ancestors only
    parent_of = {n[0]: n[1] for n in nodes}
    needed: set[str] = set()
    for index in keep:
        node_id = nodes[index][0]
        while node_id is not None and node_id not in needed:
            needed.add(node_id)
            node_id = parent_of[node_id]
    category = {nodes[i][0]: k + 1 for k, i in enumerate(sorted(keep))}
    return Taxonomy(
        Node(
            node_id,
            f"pretraining {'category' if node_id in category else 'node'} {node_id[2:]}",
            (parent,) if parent else (),
            category.get(node_id),
        )
        for node_id, parent, _ in nodes
        if node_id in needed
    )


def _render_chunk(job) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from pipelines.synthetic import SyntheticRenderer

    taxonomy, cfg, records = job
    renderer = SyntheticRenderer(taxonomy, cfg)
    out = []
    for record in records:
        pixels = np.asarray(renderer.image(record), dtype=np.uint8)
        boxes = np.array([a["bbox"] for a in record.annotations], dtype=np.float32)
        boxes[:, 2:] += boxes[:, :2]  # xyxy in pixels
        labels = np.array([a["category_id"] for a in record.annotations], dtype=np.int64)
        out.append((pixels, boxes, labels))
    return out


@dataclass
class RenderedSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    boxes: list[torch.Tensor]  # [n_i, 4] xyxy pixels
    labels: list[torch.Tensor]  # [n_i] category ids (1-based)


def render_splits(
    taxonomy: Taxonomy, cfg: PretrainConfig, workers: int = 2
) -> dict[str, RenderedSplit]:
    """Both splits drawn by the synthetic renderer at `image_size` square, 1-6 objects each
    covering 8-60% of the side, the leaves equally frequent (every appearance seen)."""
    from pipelines.parallel import map_jobs
    from pipelines.synthetic import SynthConfig, make_records

    synth = SynthConfig(
        num_train=cfg.train_images, num_val=cfg.val_images, min_side=cfg.image_size,
        max_side=cfg.image_size, min_objects=1, max_objects=6, min_box=0.08, max_box=0.6,
        zipf_exponent=0.0, seed=cfg.seed,
    )  # fmt: skip
    splits = {}
    for split, records in make_records(taxonomy, synth).items():
        jobs = [(taxonomy, synth, records[k : k + 500]) for k in range(0, len(records), 500)]
        rendered = [item for chunk in map_jobs(_render_chunk, jobs, workers) for item in chunk]
        splits[split] = RenderedSplit(
            torch.from_numpy(np.stack([p for p, _, _ in rendered])).permute(0, 3, 1, 2).clone(),
            [torch.from_numpy(b) for _, b, _ in rendered],
            [torch.from_numpy(lab) for _, _, lab in rendered],
        )
    return splits


class PathTargets:
    """Each leaf category's primary-path node at every depth, as targets over the nodes at
    that depth: `column[k, d]` is the index among depth-d nodes of category k's ancestor there
    (-1 below its own depth)."""

    def __init__(self, taxonomy: Taxonomy):
        from pipelines.synthetic import primary_path

        depths = taxonomy.depths()
        ids = taxonomy.ids
        self.sizes = [int((depths == d).sum()) for d in range(1, int(depths.max()) + 1)]
        position = {}
        for d in range(1, int(depths.max()) + 1):
            for rank, i in enumerate(np.flatnonzero(depths == d)):
                position[ids[i]] = rank
        cats = taxonomy.category_ids().tolist()
        self.column = torch.full((max(cats) + 1, len(self.sizes)), -1, dtype=torch.int64)
        for cat in cats:
            for d, node in enumerate(primary_path(taxonomy, taxonomy.node_of_category(cat))[1:]):
                self.column[cat, d] = position[node]

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor, smoothing: float):
        """Mean over depths of the cross-entropy at each depth, over the boxes whose path
        reaches it; `labels` are category ids."""
        targets = self.column[labels]
        terms = []
        for d, level_logits in enumerate(logits):
            keep = targets[:, d] >= 0
            if keep.any():
                terms.append(
                    F.cross_entropy(level_logits[keep], targets[keep, d], label_smoothing=smoothing)
                )
        return torch.stack(terms).mean()


class PretrainNet(nn.Module):
    """ResNet-18 trunk (batch norm) with the pretraining heads: box classification (leaves, and
    the nodes at each depth) from RoI-aligned stride-16 (4x4) and stride-32 (2x2) features, and
    image tagging from the pooled stride-32 map."""

    def __init__(self, categories: int, level_sizes: list[int] = ()):
        super().__init__()
        self.trunk = torchvision.models.resnet18(weights=None)
        del self.trunk.fc  # the detector never has it; the saved file leaves it out
        self.box_features = nn.Sequential(nn.Linear(256 * 16 + 512 * 4, 512), nn.ReLU(inplace=True))
        self.box_head = nn.Linear(512, categories)
        self.level_heads = nn.ModuleList(nn.Linear(512, n) for n in level_sizes)
        self.image_head = nn.Linear(512, categories)
        # start at the prior of a category being present (~3.5 of `categories`), as focal-loss
        # heads do: from zero the tagging loss's first gradients swamp the trunk's
        nn.init.constant_(self.image_head.bias, -math.log((categories - 3.5) / 3.5))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        c4 = t.layer3(t.layer2(t.layer1(x)))
        return c4, t.layer4(c4)

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]):
        """images [B, 3, S, S] normalised; boxes per image [n_i, 4] xyxy pixels ->
        (box logits [sum n_i, K], image logits [B, K], per depth d the box logits over that
        depth's nodes [sum n_i, N_d])."""
        from torchvision.ops import roi_align

        c4, c5 = self.features(images)
        r4 = roi_align(c4, boxes, 4, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
        r5 = roi_align(c5, boxes, 2, spatial_scale=1 / 32, sampling_ratio=2, aligned=True)
        pooled = self.box_features(torch.cat([r4.flatten(1), r5.flatten(1)], 1))
        levels = [head(pooled) for head in self.level_heads]
        return self.box_head(pooled), self.image_head(c5.mean((2, 3))), levels


def _batch(split: RenderedSplit, index: torch.Tensor, flip: torch.Tensor | None):
    from pipelines.transforms import normalize_images

    images = split.images[index]
    boxes = [split.boxes[i].clone() for i in index.tolist()]
    labels = torch.cat([split.labels[i] for i in index.tolist()]) - 1
    if flip is not None:
        size = images.shape[-1]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        for b, flipped in enumerate(flip.tolist()):
            if flipped:
                boxes[b][:, [0, 2]] = size - boxes[b][:, [2, 0]]
    return normalize_images(images), boxes, labels


def _tags(labels: list[torch.Tensor], categories: int) -> torch.Tensor:
    tags = torch.zeros(len(labels), categories)
    for b, lab in enumerate(labels):
        tags[b, lab - 1] = 1.0
    return tags


@torch.no_grad()
def evaluate(net: PretrainNet, split: RenderedSplit, categories: int, batch: int = 128) -> dict:
    """Held-out box top-1 accuracy and mean per-image tagging AUC (present against absent)."""
    from vastdet.evaluation.selection import per_image_auc

    net.eval()
    correct = total = 0
    aucs = []
    for start in range(0, len(split.images), batch):
        index = torch.arange(start, min(start + batch, len(split.images)))
        images, boxes, labels = _batch(split, index, None)
        box_logits, image_logits, _ = net(images, boxes)
        correct += int((box_logits.argmax(1) == labels).sum())
        total += len(labels)
        tags = _tags([split.labels[i] for i in index.tolist()], categories)
        aucs += per_image_auc(image_logits, tags.bool()).tolist()
    net.train()
    return {"box_top1": correct / max(total, 1), "image_auc": float(np.mean(aucs))}


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def trunk_state(net: PretrainNet) -> dict[str, torch.Tensor]:
    """The trunk's weights in torchvision's key layout, float16, without `fc` or the heads."""
    state = {}
    for key, value in net.trunk.state_dict().items():
        if value.is_floating_point():
            if value.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"{key} does not fit float16")
            value = value.to(torch.float16)
        state[key] = value.contiguous()
    return state


def pretrain(cfg: PretrainConfig, output: str | os.PathLike, workers: int = 2) -> dict:
    """Run the recipe and write `output` (safetensors) and its record `output` with `.json`;
    returns the record."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from taxonomy.files import atomic_output, file_sha256

    start = time.time()
    torch.manual_seed(cfg.seed)
    taxonomy = pretraining_taxonomy(cfg.categories, cfg.seed)
    log.info("pretraining vocabulary: %s", taxonomy)
    splits = render_splits(taxonomy, cfg, workers)
    rendered_s = time.time() - start
    paths = PathTargets(taxonomy)
    net = PretrainNet(cfg.categories, paths.sizes)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}], lr=cfg.lr
    )
    train, generator = splits["train"], torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(train.images), generator=generator), 0
    history = []
    bar = tqdm(range(cfg.steps), desc="pretraining", unit="step")
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train.images), generator=generator), 0
        index = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        flip = torch.rand(len(index), generator=generator) < 0.5
        images, boxes, labels = _batch(train, index, flip)
        box_logits, image_logits, level_logits = net(images, boxes)
        tags = _tags([train.labels[i] for i in index.tolist()], cfg.categories)
        box_loss = F.cross_entropy(box_logits, labels, label_smoothing=cfg.label_smoothing)
        level_loss = paths.loss(level_logits, labels + 1, cfg.label_smoothing)
        tag_loss = F.binary_cross_entropy_with_logits(image_logits, tags, reduction="none")
        tag_loss = tag_loss.sum(1).mean() / 10
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        (box_loss + level_loss + tag_loss).backward()
        optimizer.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            row = {
                "step": step,
                "box_loss": box_loss.item(),
                "level_loss": level_loss.item(),
                "tag_loss": tag_loss.item(),
            }
            history.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
    held_out = evaluate(net, splits["val"], cfg.categories)
    log.info("held-out: %s", held_out)
    output = Path(output)
    with atomic_output(output) as tmp:
        save_file(trunk_state(net), str(tmp), metadata={"format": "pt", "layout": "torchvision"})
    record = {
        "file": output.name,
        "sha256": file_sha256(output),
        "architecture": "resnet18 (torchvision layout, batch-norm statistics, no fc), float16",
        "command": " ".join(["vastdet pretrain-backbone", *_flags(cfg), f"-o {output.name}"]),
        "recipe": asdict(cfg),
        "vocabulary": {
            "kind": "synthetic tree of made-up node ids, disjoint from WordNet, V3Det and the "
            "benchmark vocabularies",
            "id_prefix": ID_PREFIX,
            "categories": taxonomy.num_categories,
            "nodes": len(taxonomy),
            "max_depth": taxonomy.max_depth,
            "seed": cfg.seed,
        },
        "held_out": held_out,
        "loss_history": history,
        "seconds": {"rendering": round(rendered_s), "total": round(time.time() - start)},
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        "threads": torch.get_num_threads(),
    }
    with atomic_output(output.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _flags(cfg: PretrainConfig) -> list[str]:
    """Command-line flags for the settings that differ from the defaults."""
    default = PretrainConfig()
    return [
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if getattr(default, k) != v
    ]


def add_arguments(parser) -> None:
    for key, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("-o", "--output", type=Path, required=True, help="a .safetensors file")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes")


def main_from_args(args) -> dict:
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    if args.output.suffix != ".safetensors":
        raise ValueError(f"{args.output}: the pretrained backbone is written as .safetensors")
    return pretrain(cfg, args.output, args.workers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: vastdet pretrain-backbone -o FILE")
