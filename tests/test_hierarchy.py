"""CQ-DINO §3.4 helpers: eq. 7 weights, the level-wise arrays for eq. 6, the parent mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from taxonomy import CategoryHierarchy, Node, Taxonomy, adaptive_weights


def test_eq7_against_hand_computed_values():
    # N_max = 7, so log(N_max + 1) = log 8 and log(n + 1) / log 8 = 0, 1/3, 2/3, 1
    alpha = adaptive_weights(np.array([0, 1, 3, 7]), w=0.3)
    np.testing.assert_allclose(alpha, [0.3, 0.4, 0.5, 0.6])
    alpha = adaptive_weights(np.array([2, 5]), w=0.5)
    np.testing.assert_allclose(alpha, [0.5 * (1 + math.log(3) / math.log(6)), 1.0])


def test_eq7_default_weight_is_the_papers():
    np.testing.assert_allclose(adaptive_weights(np.array([0, 1])), [0.3, 0.6])


def test_eq7_rejects_weight_outside_paper_range():
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        adaptive_weights(np.array([1]), w=0.7)


def test_eq7_flat_vocabulary_has_no_division_by_zero():
    np.testing.assert_allclose(adaptive_weights(np.zeros(4)), [0.3] * 4)


def test_hierarchy_rows_levels_and_child_counts(vehicles):
    h = CategoryHierarchy.from_taxonomy(vehicles)
    assert h.category_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    row = {c: r for r, c in enumerate(h.category_ids.tolist())}
    # category-only tree: vehicle{car, boat, truck}, car{sedan, amph}, boat{amph}, animal{cat}
    assert h.num_children.tolist() == [3, 2, 0, 1, 0, 0, 1, 0]
    assert [lv.depth for lv in h.levels] == [1, 0]
    deep = {(int(p), int(c)) for p, c in zip(h.levels[0].parent, h.levels[0].child)}
    assert deep == {(row[2], row[3]), (row[2], row[5]), (row[4], row[5])}
    np.testing.assert_allclose(h.alpha, adaptive_weights(h.num_children))


def eq6_reference(
    taxonomy: Taxonomy, queries: dict[int, np.ndarray], w: float
) -> dict[int, np.ndarray]:
    """Eq. 6 written recursively: a node's new query uses its children's new queries."""
    tree = taxonomy.restrict(taxonomy.category_ids())
    n_children = {c: len(tree.children(tree.node_of_category(c))) for c in queries}
    n_max = max(n_children.values())
    done: dict[int, np.ndarray] = {}

    def new(c: int) -> np.ndarray:
        if c not in done:
            kids = [tree.category_id(k) for k in tree.children(tree.node_of_category(c))]
            if not kids:
                done[c] = queries[c]
            else:
                a = w * (1 + math.log(len(kids) + 1) / math.log(n_max + 1))
                done[c] = (1 - a) * queries[c] + a * np.mean([new(k) for k in kids], axis=0)
        return done[c]

    return {c: new(c) for c in queries}


def test_level_arrays_reproduce_eq6_bottom_up(vehicles):
    rng = np.random.default_rng(0)
    h = CategoryHierarchy.from_taxonomy(vehicles, w=0.3)
    q = rng.normal(size=(h.num_categories, 4))
    out = q.copy()
    for level in h.levels:  # the pass model code runs, with index-add per level
        sums = np.zeros_like(out)
        np.add.at(sums, level.parent, out[level.child])
        parents = np.unique(level.parent)
        mean = sums[parents] / h.num_children[parents, None]
        a = h.alpha[parents, None]
        out[parents] = (1 - a) * out[parents] + a * mean
    expected = eq6_reference(vehicles, {int(c): q[r] for r, c in enumerate(h.category_ids)}, 0.3)
    for r, c in enumerate(h.category_ids.tolist()):
        np.testing.assert_allclose(out[r], expected[c])


def test_parent_mask_hand_example(vehicles):
    h = CategoryHierarchy.from_taxonomy(vehicles)
    masked = lambda present: set(h.category_ids[h.parent_mask(present)].tolist())  # noqa: E731
    # sedan annotated: car and vehicle must not be negatives; truck, boat, animal still are
    assert masked([3]) == {2, 1}
    # the amphibious car has two parents: both lines are masked
    assert masked([5]) == {2, 4, 1}
    # an annotated ancestor stays a positive
    assert masked([3, 1]) == {2}
    assert masked([6, 8]) == {1, 7}
    assert masked([]) == set()


def test_parent_mask_unknown_category_is_named(vehicles):
    h = CategoryHierarchy.from_taxonomy(vehicles)
    with pytest.raises(KeyError, match="99"):
        h.parent_mask([99])


def test_hierarchy_of_flat_vocabulary_has_no_levels():
    flat = Taxonomy([Node(f"c{i}", f"c{i}", category_id=i) for i in range(1, 6)])
    h = CategoryHierarchy.from_taxonomy(flat)
    assert h.levels == () and h.num_children.tolist() == [0] * 5
    assert not h.parent_mask([1, 2]).any()


def test_parent_mask_equals_category_ancestors_on_a_random_dag():
    from test_taxonomy_tree import random_dag

    tax = random_dag(150, 11)
    h = CategoryHierarchy.from_taxonomy(tax)
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(5):
        present = rng.choice(h.category_ids, size=3, replace=False).tolist()
        expected = set()
        for c in present:
            expected |= {tax.category_id(a) for a in tax.ancestors(tax.node_of_category(c))}
        expected = {c for c in expected if c is not None} - set(present)
        assert set(h.category_ids[h.parent_mask(present)].tolist()) == expected
        marks = np.zeros(h.num_categories, dtype=bool)
        marks[h.rows(present)] = True
        batch.append(marks)
    # the batched propagation [B, C] agrees with the per-image one
    stacked = h.propagate_up(np.stack(batch))
    for b, marks in enumerate(batch):
        np.testing.assert_array_equal(stacked[b], h.propagate_up(marks))


def test_official_alpha_counts_every_descendant_against_the_vocabulary(vehicles):
    """The released code's rule: 0.4 (1 + log(n + 2) / log(C + 2)), n = all descendants.
    vehicles' category tree: vehicle -> {car -> {sedan, amph}, boat -> {amph}, truck}."""
    h = CategoryHierarchy.from_taxonomy(vehicles, alpha_rule="official")
    c = h.num_categories  # 8 categories (thing is not one)
    below = {
        1: 5,
        2: 2,
        4: 1,
        3: 0,
        5: 0,
        6: 0,
        7: 1,
        8: 0,
    }  # vehicle: car, boat, truck, sedan, amph
    for cat, n in below.items():
        expected = 0.4 * (1 + np.log(n + 2) / np.log(c + 2))
        assert h.alpha[h.rows([cat])[0]] == pytest.approx(expected), cat
    paper = CategoryHierarchy.from_taxonomy(vehicles)  # direct children, w = 0.3
    assert paper.alpha[paper.rows([1])[0]] == pytest.approx(0.3 * (1 + np.log(4) / np.log(4)))
    with pytest.raises(ValueError, match="alpha rule"):
        CategoryHierarchy.from_taxonomy(vehicles, alpha_rule="guess")
