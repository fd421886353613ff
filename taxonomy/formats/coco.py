"""COCO-style `categories`: `[{id, name, supercategory, ...}]`, alone or inside an annotation file.

Read: each category becomes a node `category:<id>` (or the `node_id` the entry names), and each
distinct `supercategory` a non-category parent node `supercategory:<name>`. Fields beyond
`id, name, supercategory, synonyms, node_id` become node attributes, except the description
fields `def` (LVIS) and `cat_info` (V3Det's category info file), which become the description.

Written: one entry per category, its supercategory the name of its first parent. COCO has one
level of grouping, so a deeper tree loses its inner levels here; use the vastdet or v3det format
to keep them.
"""

from __future__ import annotations

import json
import os

from taxonomy.formats.common import (
    SUPERCATEGORY_NODE_PREFIX,
    atomic_write_text,
    category_node_id,
)
from taxonomy.tree import Taxonomy, TaxonomyError

DESCRIPTION_KEYS = ("description", "def", "cat_info")
STRUCTURAL_KEYS = frozenset(
    {"id", "name", "supercategory", "synonyms", "node_id", *DESCRIPTION_KEYS}
)


def is_coco(obj: object) -> bool:
    if isinstance(obj, dict):
        return isinstance(obj.get("categories"), list)
    return isinstance(obj, list) and all(isinstance(c, dict) and "id" in c for c in obj[:5])


def from_coco(obj: dict | list, source: str = "<coco categories>") -> Taxonomy:
    """Build a Taxonomy from a COCO annotation document or a bare categories list."""
    categories = obj["categories"] if isinstance(obj, dict) else obj
    ids, names, parents, cats, syns, descs, attrs = [], [], [], [], [], [], []
    groups: dict[str, str] = {}
    for k, entry in enumerate(categories):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            raise TaxonomyError(f"{source}: category #{k} needs 'id' and 'name': {entry!r:.200}")
        cat_id = entry["id"]
        if isinstance(cat_id, bool) or not isinstance(cat_id, int):
            raise TaxonomyError(
                f"{source}: category #{k} ({entry['name']!r}) has a non-integer id {cat_id!r}"
            )
        group = entry.get("supercategory") or ""
        if group:
            groups.setdefault(group, SUPERCATEGORY_NODE_PREFIX + group)
        ids.append(entry.get("node_id") or category_node_id(cat_id))
        names.append(entry["name"])
        parents.append((groups[group],) if group else ())
        cats.append(cat_id)
        syns.append(tuple(s for s in entry.get("synonyms", ()) if s != entry["name"]))
        descs.append(next((entry[key] for key in DESCRIPTION_KEYS if entry.get(key)), ""))
        extra = {key: value for key, value in entry.items() if key not in STRUCTURAL_KEYS}
        attrs.append(extra or None)
    for group, node_id in groups.items():
        if node_id in ids:
            continue  # a category already carries this node id: it is its own group
        ids.append(node_id)
        names.append(group)
        parents.append(())
        cats.append(None)
        syns.append(())
        descs.append("")
        attrs.append(None)
    return Taxonomy.from_columns(
        ids, names, parents, cats, syns, descs, attrs, metadata={"source": source}
    )


def to_coco_categories(taxonomy: Taxonomy) -> list[dict]:
    """COCO `categories` entries in category-id order."""
    out = []
    for cat in taxonomy.category_ids().tolist():
        node = taxonomy.node(taxonomy.node_of_category(cat))
        entry: dict[str, object] = {"id": cat, "name": node.name}
        entry["supercategory"] = taxonomy.name(node.parents[0]) if node.parents else ""
        if node.id != category_node_id(cat):
            entry["node_id"] = node.id
        if node.synonyms:
            entry["synonyms"] = [node.name, *node.synonyms]
        if node.description:
            entry["description"] = node.description
        for key, value in node.attributes.items():
            entry.setdefault(key, value)
        out.append(entry)
    return out


def write_coco(taxonomy: Taxonomy, path: str | os.PathLike) -> None:
    doc = {"categories": to_coco_categories(taxonomy)}
    atomic_write_text(path, lambda h: json.dump(doc, h, ensure_ascii=False, indent=1))
