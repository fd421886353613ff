"""Taxonomy-guided (beam) selection: the tree it walks (non-category nodes, several parents),
equality with flat selection when the beam covers the tree, supervision of every level, the
fallback for flat vocabularies, and restoring a model without its taxonomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cq_dino import batch, flat_taxonomy, tiny

from taxonomy import Node, Taxonomy
from taxonomy.hierarchy import SelectionTree
from vastdet.models.beam import BeamTree
from vastdet.models.build import build_model


def wordnet_like() -> Taxonomy:
    """Categories under nodes that are not categories, and one category with two parents:

    entity ─ animal ─ dog(1) ─ puppy(2)
                    └ cat(3)
           └ thing ─ toy(4) ─ puppy(2)     (a toy puppy: two parents)
                   └ box(5)
    ghost (no category below: left out)
    """
    return Taxonomy(
        [
            Node("entity", "entity"),
            Node("animal", "animal", ("entity",)),
            Node("thing", "thing", ("entity",)),
            Node("dog", "dog", ("animal",), 1),
            Node("cat", "cat", ("animal",), 3),
            Node("toy", "toy", ("thing",), 4),
            Node("box", "box", ("thing",), 5),
            Node("puppy", "puppy", ("dog", "toy"), 2),
            Node("ghost", "ghost", ("thing",)),
        ]
    )


def test_the_tree_holds_categories_first_then_the_nodes_above_them():
    tree = SelectionTree.from_taxonomy(wordnet_like())
    # rows 0-4: categories 1..5; then entity, animal, thing (storage order); ghost left out
    assert (tree.num_categories, tree.num_rows) == (5, 8)
    entity, animal, thing = 5, 6, 7
    children = {
        r: tree.child_idx[tree.child_ptr[r] : tree.child_ptr[r + 1]].tolist() for r in range(8)
    }
    assert children == {
        0: [1], 1: [], 2: [], 3: [1], 4: [], entity: [animal, thing], animal: [0, 2],
        thing: [3, 4],
    }  # fmt: skip
    assert tree.roots.tolist() == [entity]
    # non-category rows take their children's mean, deepest first: animal and thing, then entity
    assert [sorted(set(lv.parent.tolist())) for lv in tree.mean] == [[animal, thing], [entity]]


def test_node_queries_and_positives_on_the_hand_worked_dag():
    beam = BeamTree(SelectionTree.from_taxonomy(wordnet_like()))
    cats = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])  # rows of ids 1..5
    extra = beam.node_queries(cats)
    animal, thing = (1 + 3) / 2, (4 + 5) / 2  # dog and cat; toy and box
    assert extra.squeeze(1).tolist() == pytest.approx([(animal + thing) / 2, animal, thing])
    rows = torch.tensor([[7, 0, -1], [5, 4, 6]])
    expected = torch.tensor([[thing, 1, 1], [(animal + thing) / 2, 5, animal]])  # -1 reads row 0
    torch.testing.assert_close(beam.gather(cats, extra, rows).squeeze(-1), expected)
    present = torch.zeros(2, 5, dtype=torch.bool)
    present[0, 1] = True  # puppy: dog, toy, and above them animal, thing, entity
    present[1, 4] = True  # box: thing, entity
    positive = beam.positives(present)
    assert positive[0].tolist() == [True, True, False, True, False, True, True, True]
    assert positive[1].tolist() == [False, False, False, False, True, True, False, True]


def selector(taxonomy, **overrides):
    cfg = tiny("cq_selector", **overrides)
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, taxonomy.category_ids().tolist(), taxonomy)
    return model, criterion


def test_a_beam_covering_the_tree_selects_what_flat_selection_selects():
    tax = flat_taxonomy(40)  # 45 categories in three levels
    flat, _ = selector(tax, num_selected=10)
    beam, _ = selector(tax, num_selected=10, selection="beam", beam_width=1000)
    beam.load_state_dict(flat.state_dict(), strict=False)
    images, masks, _ = batch()
    flat.eval(), beam.eval()
    with torch.no_grad():
        a, b = flat(images.float(), masks), beam(images.float(), masks)
    assert torch.equal(a["selected_rows"], b["selected_rows"])
    torch.testing.assert_close(a["selection_logits"], b["selection_logits"])
    # every node scored once per image: 45 categories, no other rows in this tree
    assert (b["beam_rows"] >= 0).sum(1).tolist() == [45, 45]


def test_a_narrow_beam_scores_few_nodes_and_still_selects_c_prime_categories():
    tax = flat_taxonomy(400)  # root, 4 groups of 100
    model, _ = selector(tax, num_selected=30, selection="beam", beam_width=1)
    images, masks, _ = batch()
    model.eval()
    with torch.no_grad():
        out = model(images.float(), masks)
    scored = (out["beam_rows"] >= 0).sum(1)
    assert (scored == 1 + 4 + 100).all()  # the root, its 4 groups, one group's 100 kinds
    assert out["selected_rows"].shape == (2, 30)
    assert (out["selection_logits"][0] > -1e4).sum() == 105


def test_training_supervises_every_level_of_the_hand_worked_dag():
    """Width 1: the walk could miss the image's paths, but training expands its positives, so
    puppy (two parents) and every ancestor through both of them are scored and positive, and
    the loss reaches their queries, the non-category nodes' through their children's."""
    tax = wordnet_like()
    model, criterion = selector(tax, num_selected=2, selection="beam", beam_width=1)
    images, masks, _ = batch()
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    model.train()
    out = model(images.float(), masks, targets)
    rows, positive = out["beam_rows"][0], out["beam_positive"][0]
    scored_positive = set(rows[positive].tolist())
    assert scored_positive == {1, 0, 3, 5, 6, 7}  # puppy, dog, toy, entity, animal, thing
    assert not out["beam_positive"][1].any()  # nothing present: no positive anywhere
    loss = criterion(out, targets)["loss_sel"]
    # by hand: ASL over the scored nodes, ancestors positive, padding out
    p = out["beam_logits"][0][rows >= 0].sigmoid()
    t = positive[rows >= 0].float()
    pm = (p - 0.05).clamp(min=0)
    by_hand = -(t * p.log() + (1 - t) * pm.detach() ** 7 * (1 - pm).log())
    other = out["beam_logits"][1][out["beam_rows"][1] >= 0].sigmoid()
    om = (other - 0.05).clamp(min=0)
    by_hand = by_hand.sum() - (om.detach() ** 7 * (1 - om).log()).sum()
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    grad = model.category_queries.embedding.weight.grad.abs().sum(1)
    assert (grad[[0, 1, 3]] > 0).all()  # dog, puppy, toy: scored directly or via a mean


def test_flat_vocabularies_fall_back_to_flat_selection():
    tax = Taxonomy([Node(f"c{i}", f"c{i}", category_id=i + 1) for i in range(12)])
    tree = SelectionTree.from_taxonomy(tax)
    assert tree.roots.tolist() == list(range(12)) and tree.num_rows == 12
    flat, _ = selector(tax, num_selected=5, correlation="none")
    beam, _ = selector(tax, num_selected=5, correlation="none", selection="beam", beam_width=1)
    beam.load_state_dict(flat.state_dict(), strict=False)
    images, masks, _ = batch()
    flat.eval(), beam.eval()
    with torch.no_grad():
        assert torch.equal(
            flat(images.float(), masks)["selected_rows"],
            beam(images.float(), masks)["selected_rows"],
        )


def test_a_restored_model_carries_its_tree():
    tax = flat_taxonomy(40)
    model, _ = selector(tax, num_selected=10, selection="beam", beam_width=2)
    cfg = tiny("cq_selector", num_selected=10, selection="beam", beam_width=2)
    again, _, _ = build_model(cfg, tax.category_ids().tolist(), None, restoring=True)
    again.load_state_dict(model.state_dict())
    images, masks, _ = batch()
    model.eval(), again.eval()
    with torch.no_grad():
        a, b = model(images.float(), masks), again(images.float(), masks)
    assert torch.equal(a["beam_rows"], b["beam_rows"])
    cfg.correlation = "none"  # (tree construction asks for the taxonomy first)
    with pytest.raises(ValueError, match="give the taxonomy"):
        build_model(cfg, tax.category_ids().tolist(), None)
    assert np.array_equal(again.beam.roots.numpy(), model.beam.roots.numpy())


@pytest.mark.parametrize("width", [1, 2, 100])
def test_every_walk_takes_the_same_number_of_steps(width):
    """ZeRO-3 gathers the selector's parameters on every call, so ranks must call it equally
    often whatever their images: depth + 1 steps (entity, thing, toy, puppy: 4), padding once
    the beam has nowhere to go."""
    beam = BeamTree(SelectionTree.from_taxonomy(wordnet_like()), beam_width=width)
    calls = []

    def score(rows):
        calls.append(rows.shape)
        return -rows.float()  # low rows first: the walk heads for dog, not thing

    rows, logits = beam.walk(score, batch=2)
    assert len(calls) == 4
    assert rows.shape == logits.shape and (rows[0] == rows[1]).all()
    scored = set(rows[0][rows[0] >= 0].tolist())
    # width 1: entity, then animal (6 < 7), then dog and cat, then puppy below dog
    expected = {5, 6, 7, 0, 2, 1} if width == 1 else set(range(8))
    assert scored == expected
