"""Linking a dataset's categories to WordNet synsets, and building their tree.

Each category is matched in this order, and the method is recorded:

1. `gloss`: its description equals a noun synset's definition (after case, spacing and final
   punctuation are normalised). V3Det's category descriptions are WordNet glosses, so this is
   the strongest evidence; when several synsets share the gloss, the one with the category's
   name among its lemmas wins.
2. `unique-name`: the name is a lemma of exactly one noun synset.
3. `gloss-overlap`: the name has several noun senses and one sense's definition shares clearly
   more words with the description than any other (Jaccard >= 0.5 and a unique best).
4. `first-sense` (only when asked for): the most frequent sense of an ambiguous name.

Everything else is reported as unmatched with the reason, never guessed silently. A synset
claimed by two categories stays with the first; the second is reported.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from taxonomy.formats.common import category_node_id
from taxonomy.tree import Taxonomy
from taxonomy.wordnet import hypernym_closure, taxonomy_from_synsets, wordnet

_WORD = re.compile(r"[a-z0-9]+")


def normalize_gloss(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .;:")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@dataclass
class CategoryLink:
    """One category's outcome: its synset and method, or the reason it stayed unmatched."""

    category_id: int
    name: str
    synset: str | None
    method: str
    reason: str = ""


@dataclass
class LinkReport:
    links: list[CategoryLink]

    @property
    def matched(self) -> list[CategoryLink]:
        return [link for link in self.links if link.synset]

    @property
    def unmatched(self) -> list[CategoryLink]:
        return [link for link in self.links if not link.synset]

    def counts(self) -> dict[str, int]:
        """Categories per method (`unmatched` included)."""
        return dict(Counter(link.method for link in self.links))

    def to_json(self) -> dict:
        return {"counts": self.counts(), "links": [asdict(link) for link in self.links]}


class _Matcher:
    def __init__(self, first_sense: bool, use_glosses: bool):
        self.wn = wordnet()
        self.first_sense = first_sense
        self.by_gloss: dict[str, list] = {}
        if use_glosses:
            for s in self.wn.all_synsets("n"):
                self.by_gloss.setdefault(normalize_gloss(s.definition()), []).append(s)

    @staticmethod
    def _has_lemma(synset, name: str) -> bool:
        key = name.lower().replace(" ", "_")
        return any(lemma.lower() == key for lemma in synset.lemma_names())

    def match(self, name: str, description: str) -> tuple[object | None, str, str]:
        """(synset or None, method, reason)."""
        if description:
            same_gloss = self.by_gloss.get(normalize_gloss(description), [])
            named = [s for s in same_gloss if self._has_lemma(s, name)]
            if len(named) == 1 or len(same_gloss) == 1:
                return (named or same_gloss)[0], "gloss", ""
        senses = self.wn.synsets(name.strip().replace(" ", "_"), pos="n")
        if len(senses) == 1:
            return senses[0], "unique-name", ""
        if not senses:
            return (
                None,
                "unmatched",
                f"no noun synset is named {name!r} and no gloss equals its description",
            )
        if description:
            words = _words(description)
            scores = sorted(
                (
                    (
                        len(words & _words(s.definition()))
                        / max(len(words | _words(s.definition())), 1),
                        s,
                    )
                    for s in senses
                ),
                key=lambda x: -x[0],
            )
            if scores[0][0] >= 0.5 and scores[0][0] > scores[1][0]:
                return scores[0][1], "gloss-overlap", ""
        if self.first_sense:
            return senses[0], "first-sense", ""
        shown = ", ".join(s.name() for s in senses[:5])
        return None, "unmatched", f"ambiguous: {len(senses)} noun senses ({shown})"


def link_to_wordnet(
    categories: Taxonomy, first_sense: bool = False, keep_unmatched: bool = True
) -> tuple[Taxonomy, LinkReport]:
    """Find each category's synset and build the hypernym tree over the matched ones.

    `categories` supplies the category ids, names, descriptions and attributes (any format: a
    name list, COCO categories, V3Det's category info file). Category nodes keep the dataset's
    name (the synset's lemmas become synonyms) and attributes. With `keep_unmatched`, unmatched
    categories stay in the taxonomy as parentless nodes, so every dataset category has a node.
    """
    cat_ids = categories.category_ids().tolist()
    nodes = [categories.node(categories.node_of_category(c)) for c in cat_ids]
    matcher = _Matcher(first_sense, use_glosses=any(n.description for n in nodes))
    links: list[CategoryLink] = []
    owner: dict[str, CategoryLink] = {}
    for cat, node in zip(cat_ids, nodes, strict=True):
        synset, method, reason = matcher.match(node.name, node.description)
        if synset is not None and synset.name() in owner:
            first = owner[synset.name()]
            synset, method = None, "unmatched"
            reason = (
                f"{first.synset} is already linked to category {first.category_id} ({first.name!r})"
            )
        link = CategoryLink(cat, node.name, synset.name() if synset else None, method, reason)
        if synset is not None:
            owner[synset.name()] = link
        links.append(link)

    wn = matcher.wn
    linked = {link.synset: link for link in links if link.synset}
    node_by_cat = dict(zip(cat_ids, nodes, strict=True))
    tree = taxonomy_from_synsets(
        hypernym_closure(wn.synset(s) for s in linked),
        category_ids={s: link.category_id for s, link in linked.items()},
        names={s: link.name for s, link in linked.items()},
        attributes={s: node_by_cat[link.category_id].attributes for s, link in linked.items()},
        metadata={"built_from": f"{len(linked)} of {len(links)} categories linked to WordNet"},
    )
    report = LinkReport(links)
    if keep_unmatched and report.unmatched:
        cols = tree.columns()
        for link in report.unmatched:
            node = node_by_cat[link.category_id]
            cols["ids"].append(category_node_id(link.category_id))
            cols["names"].append(node.name)
            cols["parents"].append(())
            cols["category_ids"].append(link.category_id)
            cols["synonyms"].append(node.synonyms)
            cols["descriptions"].append(node.description)
            cols["attributes"].append(dict(node.attributes) or None)
        tree = Taxonomy.from_columns(
            **{k: list(v) for k, v in cols.items()}, metadata=tree.metadata
        )
    return tree, report
