"""V3Det's category-tree JSON (`v3det_2023_v1_category_tree.json`).

Keys: `categoryid2treeid` (category id as a string -> tree id), `id2name`, `id2name_zh`,
`id2desc`, `id2desc_zh`, `id2synonym_list`, `id2center_synonym`, `father2child`,
`child2father` (lists: several parents possible), `ancestor2descendant`, `descendant2ancestor`.
Tree ids `n########` are WordNet 3.0 noun offsets; the root is `n00001740` (`entity.n.01`).

Read: nodes are every tree id named anywhere; parents come from `child2father` and
`father2child`, which must agree. The Chinese names and descriptions are kept as the node
attributes `name_zh` and `desc_zh`. Written: every key above, closures included.
"""

from __future__ import annotations

import json
import os

from taxonomy.formats.common import atomic_write_text
from taxonomy.tree import Taxonomy, TaxonomyError

TREE_KEYS = ("categoryid2treeid", "father2child", "child2father")
ZH_ATTRIBUTES = {"id2name_zh": "name_zh", "id2desc_zh": "desc_zh"}


def is_v3det(obj: object) -> bool:
    return isinstance(obj, dict) and any(k in obj for k in TREE_KEYS)


def from_v3det(obj: dict, source: str = "<v3det tree>") -> Taxonomy:
    """Build a Taxonomy from a parsed V3Det category-tree document."""
    names = obj.get("id2name", {})
    child2father = {k: list(v) for k, v in obj.get("child2father", {}).items()}
    father2child = obj.get("father2child", {})
    cat2tree = obj.get("categoryid2treeid", {})

    ids = list(dict.fromkeys([*names, *child2father, *father2child, *cat2tree.values()]))
    for father, children in father2child.items():
        for child in children:
            listed = child2father.setdefault(child, [])
            if father not in listed:
                if child in obj.get("child2father", {}):
                    raise TaxonomyError(
                        f"{source}: father2child lists {child!r} under {father!r}, "
                        f"but child2father gives {child!r} the parents {listed}"
                    )
                listed.append(father)
                if child not in ids:
                    ids.append(child)

    tree2cat: dict[str, int] = {}
    for cat, tree_id in cat2tree.items():
        try:
            cat_id = int(cat)
        except ValueError:
            raise TaxonomyError(
                f"{source}: categoryid2treeid key {cat!r} is not an integer"
            ) from None
        if tree_id in tree2cat:
            raise TaxonomyError(
                f"{source}: tree id {tree_id!r} carries two categories, {tree2cat[tree_id]} and {cat_id}"
            )
        tree2cat[tree_id] = cat_id

    desc = obj.get("id2desc", {})
    synonym_lists = obj.get("id2synonym_list", {})
    zh = {attr: obj.get(key, {}) for key, attr in ZH_ATTRIBUTES.items()}
    attrs = []
    for i in ids:
        a = {attr: table[i] for attr, table in zh.items() if table.get(i)}
        attrs.append(a or None)
    node_names = [names.get(i) or obj.get("id2center_synonym", {}).get(i) or i for i in ids]
    return Taxonomy.from_columns(
        ids=ids,
        names=node_names,
        parents=[child2father.get(i, ()) for i in ids],
        category_ids=[tree2cat.get(i) for i in ids],
        synonyms=[
            tuple(s for s in synonym_lists.get(i, ()) if s != n) for i, n in zip(ids, node_names)
        ],
        descriptions=[desc.get(i, "") for i in ids],
        attributes=attrs,
        metadata={"source": source},
    )


def to_v3det(taxonomy: Taxonomy) -> dict:
    """The V3Det category-tree document for `taxonomy` (closures computed here)."""
    cols = taxonomy.columns()
    ids = cols["ids"]
    cat2tree = {str(c): ids[i] for i, c in enumerate(cols["category_ids"]) if c is not None}
    father2child: dict[str, list[str]] = {}
    for i, parents in enumerate(cols["parents"]):
        for p in parents:
            father2child.setdefault(p, []).append(ids[i])
    anc_ptr, anc_idx = taxonomy.ancestor_closure()
    ancestors = {
        node_id: [ids[j] for j in anc_idx[anc_ptr[i] : anc_ptr[i + 1]]]
        for i, node_id in enumerate(ids)
        if anc_ptr[i + 1] > anc_ptr[i]
    }
    descendants: dict[str, list[str]] = {}
    for node_id, ancs in ancestors.items():
        for a in ancs:
            descendants.setdefault(a, []).append(node_id)
    attrs = cols["attributes"]
    doc = {
        "categoryid2treeid": dict(sorted(cat2tree.items(), key=lambda kv: int(kv[0]))),
        "id2name": dict(zip(ids, cols["names"])),
        "id2desc": {i: d for i, d in zip(ids, cols["descriptions"]) if d},
        "id2synonym_list": {i: [n, *s] for i, n, s in zip(ids, cols["names"], cols["synonyms"])},
        "id2center_synonym": dict(zip(ids, cols["names"])),
        "father2child": father2child,
        "child2father": {i: p for i, p in zip(ids, cols["parents"]) if p},
        "ancestor2descendant": descendants,
        "descendant2ancestor": ancestors,
    }
    for key, attr in ZH_ATTRIBUTES.items():
        doc[key] = {i: a[attr] for i, a in zip(ids, attrs) if a and a.get(attr)}
    return doc


def write_v3det(taxonomy: Taxonomy, path: str | os.PathLike) -> None:
    doc = to_v3det(taxonomy)
    atomic_write_text(path, lambda h: json.dump(doc, h, ensure_ascii=False))
