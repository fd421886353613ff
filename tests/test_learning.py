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

STEPS = {"dino_tiny": 300, "cq_dino_tiny": 300}


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


def memorised_ap50(preset: str, **overrides) -> float:
    tax, batch = handful()
    cfg = from_dict(ModelConfig, {"preset": preset, **overrides})
    torch.manual_seed(0)
    model, criterion, post = build_model(cfg, tax.category_ids().tolist(), tax)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    model.train()
    targets = [{k: v for k, v in t.items() if k != "annotations"} for t in batch.targets]
    for _ in range(STEPS[preset]):
        losses = criterion(model(batch.images, batch.masks, targets), targets)
        optimizer.zero_grad()
        criterion.weighted_sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()
    record = predict_pass(model, [batch], post)
    metrics = score(record.results, record.images, record.annotations, tax.category_ids().tolist())
    return metrics["AP50"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, overrides",
    [("dino_tiny", {}), ("cq_dino_tiny", {"num_selected": 4, "selector_dropout": 0.0})],
)
def test_tiny_detectors_memorise_a_handful_of_images(preset, overrides):
    assert memorised_ap50(preset, **overrides) >= 0.9
