"""CQ-DINO: tree construction (eq. 6-7), the ancestor mask, selection, contrastive alignment,
post-processing of slots, empty targets and the stage-1 -> stage-2 hand-over."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taxonomy import Node, Taxonomy
from taxonomy.hierarchy import CategoryHierarchy
from vastdet.config import from_dict, load_config
from vastdet.models.backbone import downsample_mask
from vastdet.models.build import ModelConfig, build_model
from vastdet.models.category_queries import CategoryQueries, ancestor_mask, tree_construction
from vastdet.models.cq_dino import select_categories, slot_of


def diamond() -> Taxonomy:
    """Three levels, and category 4 has two parents (2 and 3):

    1 -> 2 -> 4
    1 -> 3 -> 4, 3 -> 5
    """
    return Taxonomy(
        [
            Node("a", "root", category_id=1),
            Node("b", "left", ("a",), 2),
            Node("c", "right", ("a",), 3),
            Node("d", "shared", ("b", "c"), 4),
            Node("e", "only right", ("c",), 5),
        ]
    )


def test_tree_construction_matches_a_hand_computed_three_level_example():
    h = CategoryHierarchy.from_taxonomy(diamond(), w=0.3)
    q = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])  # rows for ids 1..5
    # eq. 7: n = (2, 1, 2, 0, 0), N_max = 2 -> alpha_v = 0.3 (1 + log(n + 1) / log 3)
    a = {n: 0.3 * (1 + math.log(n + 1) / math.log(3)) for n in (1, 2)}
    q4, q5 = 4.0, 5.0  # leaves keep their queries
    q2 = (1 - a[1]) * 2.0 + a[1] * q4
    q3 = (1 - a[2]) * 3.0 + a[2] * (q4 + q5) / 2
    q1 = (1 - a[2]) * 1.0 + a[2] * (q2 + q3) / 2  # the root sees its children's new queries
    parent = torch.as_tensor(np.concatenate([lv.parent for lv in h.levels]))
    child = torch.as_tensor(np.concatenate([lv.child for lv in h.levels]))
    sizes = [len(lv.parent) for lv in h.levels]
    out = tree_construction(q, parent, child, sizes, torch.as_tensor(h.alpha))
    assert out.squeeze(1).tolist() == pytest.approx([q1, q2, q3, q4, q5])
    # the module blends the mapped queries, then normalises, in the released code's order:
    # norm(tree(relu(proj(E)))); the norm does not commute with the blend
    module = CategoryQueries(5, 8, 8, "tree", 2, hierarchy=h)
    mapped = torch.relu(module.proj(module.embedding()))
    alpha = torch.as_tensor(h.alpha)
    expected = module.norm(tree_construction(mapped, parent, child, sizes, alpha))
    swapped = tree_construction(module.norm(mapped), parent, child, sizes, alpha)
    assert not torch.allclose(expected, swapped, atol=1e-3)
    assert torch.allclose(module(), expected, atol=1e-6)


def test_self_attention_variant_shapes_and_gradients():
    module = CategoryQueries(7, 16, 12, "self_attention", 4)
    out = module()
    assert out.shape == (7, 16)
    (
        out[2] * torch.randn(16)
    ).sum().backward()  # one category's output depends on every category's query
    grad = module.embedding.weight.grad
    assert (grad.abs().sum(1) > 0).all()
    assert module.attn.in_proj_weight.grad is not None


def test_ancestor_mask_leaves_out_strict_ancestors_only():
    h = CategoryHierarchy.from_taxonomy(diamond())
    parent = torch.as_tensor(np.concatenate([lv.parent for lv in h.levels]))
    child = torch.as_tensor(np.concatenate([lv.child for lv in h.levels]))
    sizes = [len(lv.parent) for lv in h.levels]
    present = torch.zeros(3, 5, dtype=torch.bool)
    present[0, 3] = True  # "shared" (id 4): ancestors 2, 3 and 1 (through both parents)
    present[1, [2, 4]] = True  # "right" and "only right": 1 only ("right" stays a positive)
    mask = ancestor_mask(present, parent, child, sizes)
    assert mask[0].tolist() == [True, True, True, False, False]
    assert mask[1].tolist() == [True, False, False, False, False]
    assert not mask[2].any()  # nothing present, nothing masked
    for b, ids in enumerate(([4], [3, 5])):
        assert mask[b].numpy().tolist() == h.parent_mask(ids).tolist()


def test_selection_keeps_the_top_scores_and_forced_ground_truth():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert select_categories(logits, 2).tolist() == [[1, 2], [0, 1]]
    forced = select_categories(logits, 2, [torch.tensor([3]), torch.tensor([], dtype=torch.long)])
    assert forced[0].tolist() == [3, 1] and forced[1].tolist() == [0, 1]
    assert slot_of(torch.tensor([7, 9, 4]), torch.tensor([4, 5, 7])).tolist() == [2, -1, 0]


def flat_taxonomy(n: int = 40) -> Taxonomy:
    return Taxonomy(
        [Node("r", "root", category_id=1)]
        + [Node(f"g{i}", f"group {i}", ("r",), 10 + i) for i in range(4)]
        + [Node(f"c{i}", f"kind {i}", (f"g{i % 4}",), 100 + i) for i in range(n)]
    )


def tiny(architecture: str = "cq_dino", **overrides) -> ModelConfig:
    cfg = load_config("cq_dino_tiny", ModelConfig)
    cfg.architecture = architecture
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def batch(with_objects: bool = True):
    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 96, 128), dtype=torch.uint8)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2]])
    targets = [
        {"boxes": boxes if with_objects else boxes[:0], "labels": torch.tensor([103, 117])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if not with_objects:
        targets[0]["labels"] = targets[0]["labels"][:0]
    return images, masks, targets


def test_alignment_logits_are_per_selected_slot_and_detector_gradients_reach_only_selected_rows():
    tax = flat_taxonomy()
    model, criterion, _ = build_model(
        tiny(correlation="none", num_selected=8), tax.category_ids(), tax
    )
    images, masks, targets = batch()
    model.train()
    out = model(images, masks, targets)
    assert out["pred_logits"].shape == (2, 30, 8)  # [B, Q, C']
    assert out["category_ids"].shape == (2, 8) and out["selection_logits"].shape == (2, 45)
    losses = criterion(out, targets)
    detector = {k: v for k, v in losses.items() if k != "loss_sel" and not k.startswith("diag")}
    criterion.weighted_sum(detector).backward()
    touched = model.category_queries.embedding.weight.grad.abs().sum(1) > 0
    selected = torch.zeros(45, dtype=torch.bool)
    selected[out["selected_rows"].flatten()] = True
    assert touched.tolist() == selected.tolist()
    # the detector sees the selector's image-conditioned outputs (the paper's Q'_cat [B, C', D],
    # the released code's tagging_embed rows): its loss trains the selector's attention too
    layer = model.selector.layers[0]
    for param in (layer.q.weight, layer.k.weight, layer.v.weight, model.selector.image_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert model.selector.scorer.weight.grad is None  # the scores only select, without gradient


def test_detector_categories_are_the_selector_outputs_of_the_selected_rows():
    """Q'_cat per image: the selector run on the selected rows against that image's tokens,
    mapped to the model width; the same rows in two images give two different features."""
    tax = flat_taxonomy()
    model, _, _ = build_model(tiny(correlation="none", num_selected=6), tax.category_ids(), tax)
    model.eval()
    images, masks, _ = batch()
    seen = {}
    model.transformer.register_forward_hook(lambda m, a, kw, o: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        out = model(images, masks)
        cats = model.category_queries()
        last = model.backbone_features(images)[-1]
        kv, bias = model.selector.tokens(last, downsample_mask(masks, last.shape[-2:]))
        rows = out["selected_rows"]
        expected = model.category_proj(model.selector.encode(cats[rows], kv, bias))
        both = model.selector.encode(cats[rows[:1]].expand(2, -1, -1), kv, bias)
    assert torch.allclose(seen["categories"], expected, atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)  # conditioned on each image
    assert model.selector.layers[0].heads == 2 and len(model.selector.layers) == 2


def test_unselected_ground_truth_gets_box_loss_only_and_forcing_selects_it():
    tax = flat_taxonomy()
    images, masks, targets = batch()
    model, criterion, _ = build_model(tiny(num_selected=4), tax.category_ids(), tax)
    model.train()
    out = model(images, masks, targets)
    slots = slot_of(targets[0]["labels"], out["category_ids"][0])
    forced_model, _, _ = build_model(
        tiny(num_selected=4, force_gt_categories=True), tax.category_ids(), tax
    )
    forced_model.load_state_dict(model.state_dict())
    forced_model.train()
    forced = forced_model(images, masks, targets)
    assert set(targets[0]["labels"].tolist()) <= set(forced["category_ids"][0].tolist())
    if (slots < 0).any():  # random init: usually not selected; then no class target, boxes kept
        losses = criterion(out, targets)
        assert losses["loss_bbox"] > 0 and torch.isfinite(losses["loss_ce"])


def test_empty_ground_truth_gives_finite_losses_and_every_parameter_a_gradient():
    tax = flat_taxonomy()
    model, criterion, _ = build_model(tiny(), tax.category_ids(), tax)
    images, masks, targets = batch(with_objects=False)
    model.train()
    losses = criterion(model(images, masks, targets), targets)
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0
    # no category present: ASL's negatives only, summed over images and categories
    out = model(images, masks, targets)
    p_m = (out["selection_logits"].sigmoid() - 0.05).clamp(min=0)
    expected = -(p_m.pow(7) * torch.log(1 - p_m)).sum()
    assert torch.allclose(criterion(out, targets)["loss_sel"], expected, rtol=1e-4)
    criterion.weighted_sum(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_postprocess_maps_slots_to_category_ids():
    tax = flat_taxonomy()
    model, _, post = build_model(tiny(num_selected=5), tax.category_ids(), tax)
    model.eval()
    images, masks, _ = batch()
    with torch.no_grad():
        out = model(images, masks)
    dets = post(out, torch.tensor([[96, 128], [96, 100]]))
    for b, det in enumerate(dets):
        assert set(det["labels"].tolist()) <= set(out["category_ids"][b].tolist())
    # the best detection's label is the id of the slot holding the best logit
    flat = out["pred_logits"][0].flatten().argmax()
    assert dets[0]["labels"][0] == out["category_ids"][0, flat % 5]


def test_stage_one_weights_hand_over_to_stage_two(tmp_path):
    from vastdet.runtime.loading import load_weights_from

    tax = flat_taxonomy()
    stage1, selection, post = build_model(tiny("cq_selector"), tax.category_ids(), tax)
    assert post is None
    images, masks, targets = batch()
    stage1.train()
    out = stage1(images, masks, targets)
    assert set(out) >= {"selection_logits", "category_ids"} and "pred_boxes" not in out
    assert selection(out, targets)["loss_sel"] > 0
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.5)  # "trained" weights, different from any fresh initialisation
    path = tmp_path / "stage1.pt"
    torch.save({"format": "vastdet.model/1", "model": stage1.state_dict()}, path)
    stage2, _, _ = build_model(tiny(), tax.category_ids(), tax)
    loaded = load_weights_from(stage2, path)
    assert loaded == len(stage1.state_dict())
    mine = stage2.state_dict()
    for key, value in stage1.state_dict().items():
        assert torch.equal(mine[key], value), key


def test_inference_form_keeps_only_the_encoded_queries_and_changes_no_output():
    tax = flat_taxonomy()
    model, _, _ = build_model(tiny(), tax.category_ids(), tax)
    model.eval()
    images, masks, _ = batch()
    with torch.no_grad():
        before = model(images, masks)
    params = sum(p.numel() for p in model.parameters())
    model.category_queries.freeze_for_inference()
    with torch.no_grad():
        after = model(images, masks)
    assert torch.equal(before["category_ids"], after["category_ids"])
    assert torch.allclose(before["pred_logits"], after["pred_logits"], atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) < params - 45 * 64  # the table is gone


@pytest.mark.parametrize("dn_labels", ["learned", "category"])
def test_denoising_content_is_a_learned_slot_embedding_or_the_selected_features(dn_labels):
    """The released code embeds a denoising label by its index with a learned table (Grounding
    DINO's denoising); `category` uses the selected category's own features instead."""
    tax = flat_taxonomy()
    model, criterion, _ = build_model(
        tiny(num_selected=6, force_gt_categories=True, dn_labels=dn_labels), tax.category_ids(), tax
    )
    images, masks, targets = batch()
    model.train()
    seen = {}
    model.transformer.register_forward_hook(lambda m, a, kw, o: seen.update(a=a), with_kwargs=True)
    out = model(images, masks, targets)
    dn_queries = seen["a"][6]  # [B, P, D]
    meta = out["dn_meta"]
    slot = slot_of(targets[0]["labels"][:1], out["category_ids"][0])[0]
    first = dn_queries[0, 0]  # image 0, group 0, its first ground truth (label noise may flip it)
    if dn_labels == "learned":
        assert any(torch.allclose(first, row) for row in model.dn_label_embedding.weight)
        criterion.weighted_sum(criterion(out, targets)).backward()
        assert model.dn_label_embedding.weight.grad.abs().sum() > 0
    else:
        assert model.dn_label_embedding is None
        assert meta.groups >= 1 and slot >= 0
    with pytest.raises(ValueError, match="dn_labels"):
        from_dict(ModelConfig, {"preset": "cq_dino_tiny", "dn_labels": "text"})
