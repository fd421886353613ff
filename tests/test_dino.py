"""The DINO baseline: losses on empty and one-object images, denoising, post-processing, config,
and the tiny model overfitting one synthetic image on the CPU."""

from __future__ import annotations

import pytest
import torch

from pipelines.annotations import ImageRecord
from pipelines.synthetic import SynthConfig, SyntheticRenderer
from pipelines.transforms import decode_image_bytes
from taxonomy import Node, Taxonomy
from vastdet.config import ConfigError, load_config
from vastdet.models.box_ops import box_iou
from vastdet.models.build import ModelConfig, build_model
from vastdet.models.denoising import build_denoising
from vastdet.models.dino import label_columns
from vastdet.models.postprocess import PostProcess

CATEGORIES = [2, 3, 5, 8, 13]


def tiny(**overrides):
    cfg = load_config("dino_tiny", ModelConfig)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return build_model(cfg, CATEGORIES)


def batch(targets):
    images = torch.randint(0, 255, (len(targets), 3, 64, 80), dtype=torch.uint8)
    return images, torch.zeros(len(targets), 64, 80, dtype=torch.bool)


NONE = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
ONE = {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}


def test_image_without_objects_has_classification_loss_only():
    model, criterion, _ = tiny()
    model.train()
    images, masks = batch([NONE])
    out = model(images, masks, [NONE])
    losses = criterion(out, [NONE])
    assert losses["loss_ce"] > 0 and losses["loss_ce_enc"] > 0
    box_terms = {k: v for k, v in losses.items() if "bbox" in k or "giou" in k}
    assert box_terms and all(v.item() == 0 for v in box_terms.values())
    assert any(
        "_dn_" in k for k in losses
    )  # an empty denoising group keeps every rank's calls alike
    criterion.weighted_sum(losses).backward()
    # every trainable parameter took part (the label embedding through its zero-weight dummy)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_one_object_gives_every_loss_positive():
    model, criterion, _ = tiny()
    model.train()
    images, masks = batch([ONE, NONE])
    losses = criterion(model(images, masks, [ONE, NONE]), [ONE, NONE])
    assert any("_dn_" in k for k in losses)
    assert all(v.item() > 0 for v in losses.values()), {k: v.item() for k, v in losses.items()}


def test_denoising_groups_mask_and_noise():
    emb = torch.nn.Embedding(5, 8)
    labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64), torch.tensor([2, 3, 4])]
    boxes = [
        torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2),
        torch.zeros(0, 4),
        torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3),
    ]
    g = torch.Generator().manual_seed(0)
    queries, refs, mask, meta = build_denoising(
        labels,
        boxes,
        emb,
        num_queries=7,
        dn_number=100,
        label_noise=0.0,
        box_noise=1.0,
        generator=g,
    )
    assert (meta.groups, meta.single_pad, meta.pad_size) == (16, 3, 96)  # 100 // (2 * 3) groups
    assert queries.shape == (3, 96, 8) and mask.shape == (103, 103)
    assert mask[96:, :96].all() and not mask[96:, 96:].any()  # matching queries never see denoising
    assert not mask[:6, :6].any() and mask[:6, 6:96].all()  # group 0 sees only itself
    assert mask[6:12, :6].all() and not mask[6:12, 6:12].any()
    # image 2, group 0: positives (slots 0-2) moved less than half the box size, negatives (3-5) more
    from vastdet.models.box_ops import cxcywh_to_xyxy

    shift = (
        cxcywh_to_xyxy(refs[2, :6]) - cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    ).abs()
    assert (shift[:3] <= 0.1 + 1e-6).all() and (shift[3:] >= 0.1 - 1e-6).all()
    assert meta.positive_slots(0).tolist() == [6 * g + j for g in range(16) for j in (0, 1)]
    assert (queries[1] == 0).all()  # an image without targets has only empty slots
    empty = build_denoising([torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)], emb, 7)
    assert (
        empty[3].pad_size == 2 and (empty[0] == 0).all() and empty[3].positive_slots(0).numel() == 0
    )
    assert build_denoising(labels, boxes, emb, 7, dn_number=0) is None


def test_unknown_category_id_is_named():
    with pytest.raises(ValueError, match=r"\[4\]"):
        label_columns(torch.tensor([2, 4]), torch.tensor(CATEGORIES))


def test_postprocess_reports_category_ids_and_pixel_boxes():
    logits = torch.full((1, 3, 5), -9.0)
    logits[0, 1, 3] = 4.0  # query 1, column 3 -> category 8
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.25, 0.5, 0.5, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    out = {"pred_logits": logits, "pred_boxes": boxes, "category_ids": torch.tensor(CATEGORIES)}
    det = PostProcess(max_detections=4)(out, torch.tensor([[100, 200]]))[0]
    assert det["labels"][0].item() == 8 and det["scores"][0] == pytest.approx(
        torch.sigmoid(torch.tensor(4.0)).item()
    )
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))
    results = PostProcess(max_detections=2).coco_results(out, torch.tensor([[100, 200]]), [42])
    assert (results[0]["image_id"], results[0]["category_id"]) == (42, 8)
    assert results[0]["bbox"] == pytest.approx([0.0, 40.0, 100.0, 20.0])
    assert results[0]["score"] == pytest.approx(det["scores"][0].item())
    assert len(results) == 2


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("backbone: resnet18\nnum_querys: 10\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'num_querys'"):
        load_config(path, ModelConfig)
    path.write_text("num_queries: many\n")
    with pytest.raises(ConfigError, match=r"num_queries must be int, not 'many'"):
        load_config(path, ModelConfig)
    full = load_config("dino_r50_4scale", ModelConfig)
    assert (full.num_queries, full.dn_number, full.matcher_costs) == (900, 100, (2.0, 5.0, 2.0))


def test_tiny_model_overfits_one_synthetic_image():
    """Detection losses (final, auxiliary and encoder predictions) fall >= 10x and the object is
    found. Denoising draws fresh noise every step, so its loss falls but cannot reach zero."""
    tax = Taxonomy(
        [Node("r", "root", category_id=2)]
        + [Node(f"c{c}", f"c{c}", ("r",), c) for c in CATEGORIES[1:]]
    )
    record = ImageRecord(1, "x.jpg", 128, 96, [{"bbox": [30, 20, 50, 40], "category_id": 5}])
    image = decode_image_bytes(SyntheticRenderer(tax, SynthConfig())(record))[None]
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    target = [
        {
            "labels": torch.tensor([5]),
            "boxes": torch.tensor([[55 / 128, 40 / 96, 50 / 128, 40 / 96]]),
        }
    ]
    model, criterion, post = tiny()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )

    def split(losses):
        dn = {k: v for k, v in losses.items() if "_dn_" in k}
        det = {k: v for k, v in losses.items() if k not in dn}
        return criterion.weighted_sum(det).item(), criterion.weighted_sum(dn).item()

    model.train()
    history = []
    for _ in range(200):
        losses = criterion(model(image, mask, target), target)
        history.append(split(losses))
        optimizer.zero_grad()
        criterion.weighted_sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    start = history[0]
    end = [sum(h[i] for h in history[-10:]) / 10 for i in (0, 1)]
    assert start[0] / end[0] >= 10, (start, end)
    assert end[1] < 0.75 * start[1], (start, end)
    model.eval()
    with torch.no_grad():
        det = post(model(image, mask), torch.tensor([[96, 128]]))[0]
    assert det["labels"][0].item() == 5
    assert box_iou(det["boxes"][:1], torch.tensor([[30.0, 20.0, 80.0, 60.0]]))[0].item() > 0.5


def test_presets_start_from_presets_and_a_loop_is_named(tmp_path):
    from vastdet.config import from_dict

    cfg = from_dict(ModelConfig, {"preset": "cq_dino_tiny_stage1", "num_selected": 7})
    assert cfg.architecture == "cq_selector" and cfg.d_model == 32 and cfg.num_selected == 7
    (tmp_path / "a.yaml").write_text(f"preset: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"preset: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loop"):
        from_dict(ModelConfig, {"preset": str(tmp_path / "a.yaml")})
