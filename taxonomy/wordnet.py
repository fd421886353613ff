"""Taxonomies from WordNet's noun hierarchy through nltk.

Node ids are V3Det's form, `n` + the 8-digit WordNet 3.0 noun offset (`entity.n.01` is
`n00001740`). Parent links are hypernyms and instance hypernyms (without the latter, WordNet's
7,700 instance nouns — cities, people — would float as roots).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from taxonomy.tree import Taxonomy

log = logging.getLogger(__name__)

CATEGORY_MODES = ("all", "given", "none")


def wordnet():
    """nltk's WordNet reader, loaded; a clear error when the data is missing."""
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
    except LookupError:
        raise RuntimeError(
            "WordNet data for nltk is missing: run `make setup`, or "
            "`python -m taxonomy.wordnet_data` to install it offline"
        ) from None
    return wn


def synset_node_id(synset) -> str:
    """V3Det-style node id of a noun synset: `n` + 8-digit offset."""
    return f"n{synset.offset():08d}"


def synset_parents(synset) -> list:
    return synset.hypernyms() + synset.instance_hypernyms()


@dataclass
class Resolution:
    """How each requested item was turned into a synset, and which items could not be."""

    synsets: list = field(default_factory=list)
    how: dict[str, str] = field(default_factory=dict)  # item -> "synset name (method)"
    unresolved: dict[str, str] = field(default_factory=dict)  # item -> reason


def resolve_synsets(items: Iterable[str]) -> Resolution:
    """Turn synset names (`cat.n.01`), node ids (`n02121620`) or words (`cat`) into noun synsets.

    A word takes its most frequent noun sense (WordNet's first), and the resolution says so.
    """
    wn = wordnet()
    result = Resolution()
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            if item.count(".") >= 2:
                synset, method = wn.synset(item), "synset name"
            elif len(item) == 9 and item[0] == "n" and item[1:].isdigit():
                synset, method = wn.synset_from_pos_and_offset("n", int(item[1:])), "offset"
            else:
                senses = wn.synsets(item.replace(" ", "_"), pos="n")
                if not senses:
                    result.unresolved[item] = "no noun synset has this word"
                    continue
                synset = senses[0]
                method = (
                    "first of 1 sense" if len(senses) == 1 else f"first of {len(senses)} senses"
                )
        except Exception as err:  # nltk raises WordNetError / ValueError for bad names
            result.unresolved[item] = f"not a WordNet noun synset ({err})"
            continue
        if synset.pos() != "n":
            result.unresolved[item] = f"{synset.name()} is not a noun"
            continue
        result.synsets.append(synset)
        result.how[item] = f"{synset.name()} ({method})"
    return result


def hypernym_closure(synsets: Iterable) -> list:
    """The synsets and all their (instance) hypernyms, sorted by offset."""
    seen: dict[str, object] = {}
    stack = list(synsets)
    while stack:
        s = stack.pop()
        if s.name() in seen:
            continue
        seen[s.name()] = s
        stack.extend(synset_parents(s))
    return sorted(seen.values(), key=lambda s: s.offset())


def hyponym_closure(items: Iterable[str]) -> list[str]:
    """Synset names of the given items and everything below them (hyponyms and instance
    hyponyms), the items first, then by offset: a whole WordNet subtree as a category list."""
    res = resolve_synsets(items)
    if res.unresolved:
        raise ValueError(f"not WordNet nouns: {sorted(res.unresolved)}")
    below: dict[str, object] = {}
    stack = [h for s in res.synsets for h in s.hyponyms() + s.instance_hyponyms()]
    while stack:
        s = stack.pop()
        if s.name() not in below:
            below[s.name()] = s
            stack.extend(s.hyponyms() + s.instance_hyponyms())
    roots = [s.name() for s in res.synsets]
    rest = sorted((s for n, s in below.items() if n not in roots), key=lambda s: s.offset())
    return roots + [s.name() for s in rest]


def taxonomy_from_synsets(
    synsets: Sequence,
    category_ids: dict[str, int] | None = None,
    names: dict[str, str] | None = None,
    attributes: dict[str, dict] | None = None,
    metadata: dict | None = None,
) -> Taxonomy:
    """A taxonomy over exactly `synsets` (which must be closed under hypernyms).

    `category_ids`, `names` and `attributes` map synset names to the category id, display name
    and extra attributes to give them; synsets without an entry are non-category nodes named by
    their first lemma. Every node's attributes hold its synset name.
    """
    category_ids = category_ids or {}
    names = names or {}
    attributes = attributes or {}
    ids, node_names, parents, cats, syns, descs, attrs = [], [], [], [], [], [], []
    for s in synsets:
        lemmas = [lemma.replace("_", " ") for lemma in s.lemma_names()]
        name = names.get(s.name(), lemmas[0])
        ids.append(synset_node_id(s))
        node_names.append(name)
        parents.append([synset_node_id(p) for p in synset_parents(s)])
        cats.append(category_ids.get(s.name()))
        syns.append(tuple(lemma for lemma in lemmas if lemma != name))
        descs.append(s.definition())
        attrs.append({**attributes.get(s.name(), {}), "synset": s.name()})
    meta = {"source": "wordnet-3.0", **(metadata or {})}
    return Taxonomy.from_columns(ids, node_names, parents, cats, syns, descs, attrs, metadata=meta)


def build_wordnet_taxonomy(
    items: Iterable[str] | None = None, categories: str = "given"
) -> Taxonomy:
    """The whole noun hierarchy (`items=None`), or the hypernym closure of the given items.

    `categories`: `all` numbers every node 1..N (by offset, or requested items first, in order),
    `given` numbers only the requested items 1..K in the order given (for the whole hierarchy
    this is the same as `all`), `none` leaves every node without a category id. Items that cannot
    be resolved raise a ValueError listing all of them.
    """
    if categories not in CATEGORY_MODES:
        raise ValueError(f"categories must be one of {CATEGORY_MODES}, not {categories!r}")
    wn = wordnet()
    if items is None:
        synsets = sorted(wn.all_synsets("n"), key=lambda s: s.offset())
        requested = synsets if categories != "none" else []
        meta = {"built_from": "all noun synsets"}
    else:
        res = resolve_synsets(items)
        if res.unresolved:
            shown = "; ".join(f"{k!r}: {v}" for k, v in list(res.unresolved.items())[:20])
            raise ValueError(f"{len(res.unresolved)} items are not WordNet nouns: {shown}")
        for item, how in res.how.items():
            log.debug("%s -> %s", item, how)
        requested = list({s.name(): s for s in res.synsets}.values())
        synsets = hypernym_closure(requested)
        meta = {"built_from": f"hypernym closure of {len(requested)} synsets"}
        if categories == "none":
            requested = []
        elif categories == "all":
            chosen = {s.name() for s in requested}
            requested = requested + [s for s in synsets if s.name() not in chosen]
    category_ids = {s.name(): i for i, s in enumerate(requested, start=1)}
    return taxonomy_from_synsets(synsets, category_ids, metadata=meta)
