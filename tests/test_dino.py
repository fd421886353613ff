"""The DINO baseline: losses on empty and one-object images, denoising, post-processing, config,
and the tiny model overfitting one synthetic image on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.annotations import ImageRecord
from pipelines.synthetic import SynthConfig, SyntheticRenderer
from pipelines.transforms import decode_image_bytes
from taxonomy import Node, Taxonomy
from vastdet.config import ConfigError, load_config
from vastdet.models.box_ops import box_iou
from vastdet.models.build import ModelConfig, build_model
from vastdet.models.denoising import build_denoising, denoising_groups
from vastdet.models.dino import label_columns
from vastdet.models.postprocess import PostProcess
from vastdet.models.transformer import valid_ratios

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
    # DINO doubles dn_number, then divides by twice the largest target count: 200 // 6 groups
    assert (meta.groups, meta.single_pad, meta.pad_size) == (33, 3, 198)
    assert queries.shape == (3, 198, 8) and mask.shape == (205, 205)
    assert mask[198:, :198].all() and not mask[198:, 198:].any()  # matching never sees denoising
    assert not mask[:6, :6].any() and mask[:6, 6:198].all()  # group 0 sees only itself
    assert mask[6:12, :6].all() and not mask[6:12, 6:12].any()
    # image 2, group 0: positives (slots 0-2) moved less than half the box size, negatives (3-5) more
    from vastdet.models.box_ops import cxcywh_to_xyxy

    shift = (
        cxcywh_to_xyxy(refs[2, :6]) - cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    ).abs()
    assert (shift[:3] <= 0.1 + 1e-6).all() and (shift[3:] >= 0.1 - 1e-6).all()
    assert meta.positive_slots(0).tolist() == [6 * g + j for g in range(33) for j in (0, 1)]
    assert (queries[1] == 0).all()  # an image without targets has only empty slots
    empty = build_denoising([torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)], emb, 7)
    assert (
        empty[3].pad_size == 2 and (empty[0] == 0).all() and empty[3].positive_slots(0).numel() == 0
    )
    assert build_denoising(labels, boxes, emb, 7, dn_number=0) is None
    # below 100 doubled queries DINO takes the doubled number as the group count
    assert denoising_groups(10, 3) == 20 and denoising_groups(50, 4) == 12
    assert denoising_groups(100, 0) == 1 and denoising_groups(100, 500) == 1


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


@pytest.mark.slow
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


def decoder_inputs(transformer, b: int = 2, n: int = 5):
    """A padded memory over the transformer's levels and initial references for calling
    `decode` directly; image 1 is padded on the right."""
    torch.manual_seed(1)
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2)][: transformer.levels]
    masks = []
    for h, w in sizes:
        m = torch.zeros(b, h, w, dtype=torch.bool)
        m[1, :, max(1, round(w * 0.6)) :] = True
        masks.append(m)
    memory = torch.randn(b, sum(h * w for h, w in sizes), transformer.d_model)
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    refs = torch.rand(b, n, 4) * 0.5 + 0.25
    tgt = torch.randn(b, n, transformer.d_model)
    return tgt, refs, memory, torch.tensor(sizes), mask, valid_ratios(masks)


def test_decoder_follows_dino_position_refinement_and_look_forward_twice():
    """Per layer, as DINO's released code computes it: the query position is the sine embedding
    of the reference scaled by the first level's valid ratios; the next reference is refined
    from the output *before* the final norm and detached; the box prediction uses the normed
    output and the previous refinement before detaching (look forward twice)."""
    from vastdet.models.transformer import box_sine_embedding, inverse_sigmoid

    model, _, _ = tiny()
    t = model.transformer
    tgt, refs, memory, shapes, mask, ratios = decoder_inputs(t)
    heads = model.box_heads()
    for head in heads:  # non-zero box heads, so that refinements move the boxes
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    # a trained final norm (at init it would repeat the layer's own closing norm)
    torch.nn.init.normal_(t.decoder_norm.weight)
    torch.nn.init.normal_(t.decoder_norm.bias)
    positions, pre_norm = [], []
    t.ref_point_head.register_forward_hook(lambda m, a, o: positions.append(a[0]))
    for layer in t.decoder:
        layer.register_forward_hook(lambda m, a, o: pre_norm.append(o))
    hs, boxes = t.decode(tgt, refs, memory, shapes, mask, ratios, heads, None)
    level0 = torch.cat([ratios, ratios], -1)[:, None, 0]  # [B, 1, 4]
    assert torch.allclose(positions[0], box_sine_embedding(refs * level0, t.d_model))
    refined = (heads[0](pre_norm[0]) + inverse_sigmoid(refs)).sigmoid()
    assert torch.allclose(positions[1], box_sine_embedding(refined * level0, t.d_model), atol=1e-6)
    assert torch.allclose(boxes[0], (heads[0](hs[0]) + inverse_sigmoid(refs)).sigmoid())
    assert torch.allclose(boxes[1], (heads[1](hs[1]) + inverse_sigmoid(refined)).sigmoid())
    assert torch.allclose(hs[0], t.decoder_norm(pre_norm[0]))
    assert not torch.allclose(heads[0](hs[0]), heads[0](pre_norm[0]))  # the two differ
    # look forward twice: layer 1's box loss reaches layer 0's refinement (shared head here)
    boxes[1].sum().backward()
    assert heads[0].layers[-1].weight.grad.abs().sum() > 0


def test_inverse_sigmoid_and_position_encoding_as_dino():
    from vastdet.models.position_encoding import SinePositionEncoding
    from vastdet.models.transformer import inverse_sigmoid

    assert inverse_sigmoid(torch.tensor(0.0)).item() == pytest.approx(math.log(1e-3))
    assert inverse_sigmoid(torch.tensor(1.0)).item() == pytest.approx(-math.log(1e-3))
    # no half-pixel offset: the k-th of W valid columns sits at 2 pi k / W
    pos = SinePositionEncoding(num_feats=4)(torch.zeros(1, 2, 4, dtype=torch.bool))
    x_first_sin = pos[0, 4, 0, :]  # channels 4..7 encode x; channel 4 is sin(x / 20^0)
    expected = torch.sin(torch.arange(1, 5) / 4 * 2 * math.pi)
    assert torch.allclose(x_first_sin, expected, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_heads_are_shared_or_one_per_decoder_layer(shared):
    model, criterion, _ = tiny(share_heads=shared)
    boxes = model.box_heads()
    assert (boxes[0] is boxes[1]) == shared
    assert (model.class_logits.__self__.class_head.__class__.__name__ == "ModuleList") != shared
    model.train()
    images, masks = batch([ONE])
    criterion.weighted_sum(criterion(model(images, masks, [ONE]), [ONE])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    per_layer = sum(p.numel() for p in model.parameters())
    shared_count = sum(p.numel() for p in tiny(share_heads=True)[0].parameters())
    layers = len(model.transformer.decoder)
    head = sum(p.numel() for p in boxes[0].parameters())
    head += sum(p.numel() for p in model.enc_class_head.parameters())  # a class head's size
    assert per_layer - shared_count == (0 if shared else (layers - 1) * head)


def test_weight_decay_reaches_every_parameter_unless_one_dimensional_ones_are_exempt():
    from vastdet.engine.config import OptimConfig
    from vastdet.engine.train import parameter_groups

    model, _, _ = tiny()
    groups = parameter_groups(model, OptimConfig(weight_decay=0.05))
    norm_bias = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1]
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) in decayed for p in norm_bias)  # DINO decays every parameter
    exempt = parameter_groups(model, OptimConfig(weight_decay=0.05, decay_1d=False))
    decayed = {id(p) for g in exempt if g["weight_decay"] > 0 for p in g["params"]}
    assert not any(id(p) in decayed for p in norm_bias)
