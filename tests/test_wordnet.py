"""Taxonomies from the real WordNet 3.0 (installed offline by `make setup`), and linking."""

from __future__ import annotations

import pytest

from taxonomy import Node, Taxonomy
from taxonomy.link import link_to_wordnet
from taxonomy.wordnet import build_wordnet_taxonomy, hyponym_closure, resolve_synsets


@pytest.fixture(scope="module")
def whole_wordnet() -> Taxonomy:
    return build_wordnet_taxonomy()


def test_cat_has_feline_mammal_and_entity_among_its_ancestors():
    tax = build_wordnet_taxonomy(["cat.n.01"])
    cat = tax.node_of_category(1)
    assert cat == "n02121620" and tax.name(cat) == "cat"
    names = {tax.node(a).attributes["synset"] for a in tax.ancestors(cat)}
    assert {"feline.n.01", "mammal.n.01", "entity.n.01"} <= names
    assert tax.roots() == ["n00001740"]
    assert tax.node("n00001740").attributes["synset"] == "entity.n.01"


def test_whole_noun_hierarchy(whole_wordnet):
    assert len(whole_wordnet) == 82115
    assert whole_wordnet.num_categories == 82115
    assert whole_wordnet.roots() == ["n00001740"]
    # instance nouns hang from their instance hypernyms instead of floating as roots
    assert "n08524735" in whole_wordnet.parents(  # city.n.01
        next(
            i
            for i in whole_wordnet.ids
            if whole_wordnet.node(i).attributes["synset"] == "new_york.n.01"
        )
    )


def test_closure_categories_modes():
    given = build_wordnet_taxonomy(["dog.n.01", "cat.n.01"], categories="given")
    assert given.category_names() == {1: "dog", 2: "cat"}
    every = build_wordnet_taxonomy(["dog.n.01", "cat.n.01"], categories="all")
    assert every.num_categories == len(every) and every.category_names()[1] == "dog"
    none = build_wordnet_taxonomy(["dog.n.01"], categories="none")
    assert none.num_categories == 0


def test_a_subtree_under_a_synset_is_every_category_below_it():
    items = hyponym_closure(["dog.n.01"])
    assert items[0] == "dog.n.01" and "poodle.n.01" in items and len(set(items)) == len(items)
    tax = build_wordnet_taxonomy(items)
    dog = tax.node_of_category(1)
    assert tax.num_categories == len(items) == 1 + len(tax.descendants(dog))
    with pytest.raises(ValueError, match="not WordNet nouns"):
        hyponym_closure(["no_such_thing.n.01"])


def test_resolution_reports_how_words_were_read():
    res = resolve_synsets(["dog", "n02121620", "tiger.n.02", "qwertyuiop", "run.v.01"])
    assert res.how["dog"] == "dog.n.01 (first of 7 senses)"
    assert res.how["n02121620"] == "cat.n.01 (offset)"
    assert set(res.unresolved) == {"qwertyuiop", "run.v.01"}
    with pytest.raises(ValueError, match="qwertyuiop"):
        build_wordnet_taxonomy(["cat", "qwertyuiop"])


@pytest.fixture(scope="module")
def linked():
    ashtray_gloss = "A receptacle for the ash from smokers' cigars or cigarettes."
    categories = Taxonomy(
        [
            Node(
                "category:1",
                "ashtray",
                category_id=1,
                description=ashtray_gloss,
                attributes={"novel": True},
            ),
            Node("category:2", "refrigerator magnet", category_id=2),
            Node("category:3", "bank", category_id=3),  # 10 noun senses, no description
            Node(
                "category:4", "ashtray", category_id=4, description=ashtray_gloss
            ),  # same synset again
            Node("category:5", "aardvark", category_id=5),  # one noun sense
        ]
    )
    return categories, link_to_wordnet(categories)


def test_link_methods_and_unmatched_reasons(linked):
    _, (tax, report) = linked
    by_id = {link.category_id: link for link in report.links}
    assert (by_id[1].synset, by_id[1].method) == ("ashtray.n.01", "gloss")
    assert (by_id[5].synset, by_id[5].method) == ("aardvark.n.01", "unique-name")
    assert by_id[2].synset is None and "no noun synset" in by_id[2].reason
    assert by_id[3].synset is None and by_id[3].reason.startswith("ambiguous: 10 noun senses")
    assert by_id[4].synset is None and "already linked to category 1" in by_id[4].reason
    assert report.counts() == {"gloss": 1, "unique-name": 1, "unmatched": 3}


def test_linked_tree_keeps_dataset_names_attributes_and_unmatched(linked):
    _, (tax, _) = linked
    ashtray = tax.node_of_category(1)
    assert ashtray == "n02747802"
    assert tax.node(ashtray).attributes == {"novel": True, "synset": "ashtray.n.01"}
    assert "n00001740" in tax.ancestors(ashtray)
    assert tax.node_of_category(2) == "category:2" and tax.parents("category:2") == []
    assert tax.num_categories == 5


def test_link_first_sense_is_opt_in_and_reported(linked):
    categories, _ = linked
    _, report = link_to_wordnet(categories.restrict([3]), first_sense=True)
    assert (report.links[0].synset, report.links[0].method) == ("bank.n.01", "first-sense")
    tax, report = link_to_wordnet(categories.restrict([2, 5]), keep_unmatched=False)
    assert tax.category_ids().tolist() == [5]
