"""The Taxonomy DAG: queries, level order, restriction and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from taxonomy import CycleError, Node, Taxonomy, TaxonomyError


def random_dag(n: int, seed: int, max_parents: int = 3) -> Taxonomy:
    """Nodes 0..n-1; each node's parents are drawn from lower-numbered nodes (so it is acyclic)."""
    rng = np.random.default_rng(seed)
    nodes = [Node("0", "n0", (), 0)]
    for i in range(1, n):
        k = int(rng.integers(1, max_parents + 1))
        parents = {str(int(p)) for p in rng.integers(0, i, size=k)}
        cat = i if rng.random() < 0.6 else None
        nodes.append(Node(str(i), f"n{i}", tuple(sorted(parents)), cat))
    order = rng.permutation(n)  # storage order must not matter
    return Taxonomy([nodes[i] for i in order])


def brute_ancestors(tax: Taxonomy, node_id: str) -> set[str]:
    found, stack = set(), list(tax.parents(node_id))
    while stack:
        p = stack.pop()
        if p not in found:
            found.add(p)
            stack.extend(tax.parents(p))
    return found


def brute_longest_depth(tax: Taxonomy, node_id: str) -> int:
    parents = tax.parents(node_id)
    return 0 if not parents else 1 + max(brute_longest_depth(tax, p) for p in parents)


def test_queries_on_hand_example(vehicles):
    assert vehicles.parents("amph") == ["car", "boat"] or sorted(vehicles.parents("amph")) == [
        "boat",
        "car",
    ]
    assert sorted(vehicles.children("vehicle")) == ["boat", "car", "truck"]
    assert vehicles.ancestors("amph") == {"car", "boat", "vehicle", "thing"}
    assert vehicles.descendants("vehicle") == {"car", "sedan", "boat", "amph", "truck"}
    assert vehicles.depth("thing") == 0
    assert vehicles.depth("amph") == 3
    assert vehicles.roots() == ["thing"]
    assert sorted(vehicles.leaves()) == ["amph", "cat", "sedan", "truck"]
    assert vehicles.num_categories == 8
    assert vehicles.category_id("thing") is None
    assert vehicles.node_of_category(5) == "amph"
    assert vehicles.category_ids().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    node = vehicles.node("car")
    assert node.synonyms == ("auto", "automobile") and node.category_id == 2


def test_unknown_lookups_name_the_id(vehicles):
    with pytest.raises(KeyError, match="nope"):
        vehicles.ancestors("nope")
    with pytest.raises(KeyError, match="unknown category id 99"):
        vehicles.node_of_category(99)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ancestors_descendants_and_depth_match_brute_force(seed):
    tax = random_dag(120, seed)
    for node_id in tax.ids[:40]:
        assert tax.ancestors(node_id) == brute_ancestors(tax, node_id)
        assert tax.depth(node_id) == brute_longest_depth(tax, node_id)
        assert tax.descendants(node_id) == {
            d for d in tax.ids if node_id in brute_ancestors(tax, d)
        }


def test_ancestor_closure_matches_per_node_ancestors():
    tax = random_dag(200, 7)
    ptr, idx = tax.ancestor_closure()
    for i, node_id in enumerate(tax.ids):
        assert {tax.ids[j] for j in idx[ptr[i] : ptr[i + 1]]} == brute_ancestors(tax, node_id)


def test_level_order_puts_every_child_before_all_its_parents():
    tax = random_dag(300, 3)
    position = {}
    for step, group in enumerate(tax.level_order()):
        for i in group:
            position[tax.ids[i]] = step
    assert len(position) == len(tax)
    for node_id in tax.ids:
        for p in tax.parents(node_id):
            assert position[node_id] < position[p]
    depths = [int(tax.depths()[g[0]]) for g in tax.level_order()]
    assert depths == sorted(depths, reverse=True)


def test_restrict_links_each_category_to_nearest_category_ancestors(vehicles):
    # drop car (2): sedan and the amphibious car must climb to vehicle / boat
    sub = vehicles.restrict([1, 3, 4, 5, 8])
    assert sorted(sub.ids) == ["amph", "boat", "cat", "sedan", "vehicle"]
    assert sub.parents("sedan") == ["vehicle"]
    # amph: via car -> vehicle, via boat -> boat; vehicle lies above boat, so only boat is nearest
    assert sub.parents("amph") == ["boat"]
    assert sub.parents("cat") == []  # animal and thing are gone: cat becomes a root
    assert sub.node("amph").attributes == {"novel": True}


def test_restrict_keeps_both_parents_when_neither_is_above_the_other(vehicles):
    sub = vehicles.restrict(vehicles.category_ids())
    assert sorted(sub.parents("amph")) == ["boat", "car"]
    assert sub.parents("vehicle") == []  # `thing` is not a category


def test_restrict_unknown_category_id_is_named(vehicles):
    with pytest.raises(KeyError, match="42"):
        vehicles.restrict([1, 42])


def test_cycle_error_names_the_cycle():
    nodes = [
        Node("root", "root"),
        Node("a", "a", ("root", "c")),
        Node("b", "b", ("a",)),
        Node("c", "c", ("b",)),
        Node("d", "d", ("c",)),  # hangs below the cycle, not part of it
    ]
    with pytest.raises(CycleError) as err:
        Taxonomy(nodes)
    cycle = err.value.cycle
    assert sorted(cycle) == ["a", "b", "c"]
    parents_of = {node.id: node.parents for node in nodes}
    for parent, child in zip(cycle, cycle[1:] + cycle[:1]):  # listed parent first
        assert parent in parents_of[child]
    assert " -> ".join([*cycle, cycle[0]]) in str(err.value)


def test_self_parent_is_a_cycle():
    with pytest.raises(CycleError, match="x -> x"):
        Taxonomy([Node("x", "x", ("x",))])


def test_unknown_parent_names_the_child():
    with pytest.raises(TaxonomyError, match="'cat'.*unknown parent 'feline'"):
        Taxonomy([Node("cat", "cat", ("feline",))])


def test_duplicate_node_ids_name_both():
    with pytest.raises(TaxonomyError, match="duplicate node id 'x'.*'first'.*'second'"):
        Taxonomy([Node("x", "first"), Node("x", "second")])


def test_duplicate_category_ids_name_both_nodes():
    with pytest.raises(TaxonomyError, match="duplicate category id 3: nodes 'a' and 'b'"):
        Taxonomy([Node("a", "a", category_id=3), Node("b", "b", category_id=3)])


@pytest.mark.parametrize("bad", [-1, True, 1.5, "7"])
def test_invalid_category_ids_are_rejected(bad):
    with pytest.raises(TaxonomyError, match="category id"):
        Taxonomy([Node("a", "a", category_id=bad)])


def test_repeated_parent_is_one_edge():
    tax = Taxonomy([Node("r", "r"), Node("a", "a", ("r", "r"))])
    assert tax.num_edges == 1 and tax.parents("a") == ["r"]


def test_empty_taxonomy():
    tax = Taxonomy([])
    assert len(tax) == 0 and tax.level_order() == [] and tax.category_ids().size == 0
