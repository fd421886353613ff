"""The detectors learn: tiny DINO and tiny CQ-DINO each memorise a handful of synthetic images
to AP50 >= 0.9 on those images, scored by the real evaluator. A break in matching, the losses,
the box parametrisation or post-processing keeps them from it."""

from __future__ import annotations

import pytest
import torch

from pipelines.loader import collate, target_from_meta
from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
from pipelines.transforms import decode_image_bytes, no_augmentation
from taxonomy import Node, Taxonomy
from vastdet.config import from_dict
from vastdet.evaluation.runner import predict_pass, score
from vastdet.models.build import ModelConfig, build_model

STEPS = {"dino_tiny": 300, "cq_dino_tiny": 200}
SELECTOR_STEPS = 150  # CQ-DINO's stage 1
LOW = ("selector.", "category_queries.", "backbone.")  # stage 2's parts at a tenth of the lr


def handful(count: int = 6):
    """4 categories with their own shapes and colours, `count` images of 96-112 px holding
    1-2 large objects each, as one batch (pixels, masks, targets with annotations)."""
    nodes = [Node("root", "thing")]
    for k in range(4):
        nodes += [
            Node(f"g{k}", f"family {k}", ("root",)),
            Node(f"c{k}", f"kind {k}", (f"g{k}",), k + 1),
        ]
    tax = Taxonomy(nodes)
    cfg = SynthConfig(
        num_train=count, num_val=0, min_side=96, max_side=112, min_objects=1, max_objects=2,
        min_box=0.3, max_box=0.6, zipf_exponent=0.0, seed=7,
    )  # fmt: skip
    renderer = SyntheticRenderer(tax, cfg)
    samples = []
    for record in make_records(tax, cfg)["train"]:
        image = decode_image_bytes(renderer(record))
        meta = record.sample_json()
        target = target_from_meta(meta)
        target["annotations"] = record.annotations
        samples.append(no_augmentation()(image, target, None))
    return tax, collate(samples)


def train_steps(model, criterion, batch, targets, steps: int, groups) -> None:
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    params = [p for g in groups for p in g["params"]]
    model.train()
    for _ in range(steps):
        losses = criterion(model(batch.images, batch.masks, targets), targets)
        optimizer.zero_grad()
        criterion.weighted_sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def memorised_ap50(preset: str, **overrides) -> float:
    """AP50 on the handful after training on it: DINO in one stage; CQ-DINO in its two (the
    selector alone first, then the detector from it with the selector, category queries and
    backbone at a tenth of the learning rate, as the recipe lowers them)."""
    tax, batch = handful()
    ids = tax.category_ids().tolist()
    targets = [{k: v for k, v in t.items() if k != "annotations"} for t in batch.targets]
    stage1 = None
    if preset.startswith("cq_dino"):
        cfg = from_dict(ModelConfig, {"preset": preset, **overrides, "architecture": "cq_selector"})
        torch.manual_seed(0)
        selector, criterion, _ = build_model(cfg, ids, tax)
        params = [p for p in selector.parameters() if p.requires_grad]
        train_steps(
            selector, criterion, batch, targets, SELECTOR_STEPS, [{"params": params, "lr": 1e-4}]
        )
        stage1 = selector.state_dict()
    cfg = from_dict(ModelConfig, {"preset": preset, **overrides})
    torch.manual_seed(0)
    model, criterion, post = build_model(cfg, ids, tax)
    low, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            low_lr = stage1 is not None and name.startswith(LOW)
            (low if low_lr else rest).append(param)
    if stage1 is not None:
        model.load_state_dict(stage1, strict=False)
    train_steps(
        model, criterion, batch, targets, STEPS[preset],
        [{"params": rest, "lr": 1e-3}, {"params": low, "lr": 1e-4}],
    )  # fmt: skip
    model.eval()
    record = predict_pass(model, [batch], post)
    metrics = score(record.results, record.images, record.annotations, ids)
    return metrics["AP50"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, overrides",
    [("dino_tiny", {}), ("cq_dino_tiny", {"num_selected": 4, "selector_dropout": 0.0})],
)
def test_tiny_detectors_memorise_a_handful_of_images(preset, overrides):
    assert memorised_ap50(preset, **overrides) >= 0.9
