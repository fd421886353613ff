"""vastdet's own taxonomy file: a JSON document with one node object per line.

    {"format": "vastdet.taxonomy", "version": 1, "metadata": {...},
     "nodes": [
      {"id": "n00001740", "name": "entity", "category_id": 1, "parents": [], ...},
      ...
     ]}

Per node: `id` and `name` are required; `parents` (node ids), `category_id`, `synonyms`,
`description` and `attributes` (a JSON object) are optional and left out when empty. A `.gz`
suffix compresses the file.
"""

from __future__ import annotations

import json
import os

from taxonomy.formats.common import atomic_write_text
from taxonomy.tree import Taxonomy, TaxonomyError

FORMAT_TAG = "vastdet.taxonomy"
VERSION = 1
NODE_KEYS = frozenset(
    {"id", "name", "parents", "category_id", "synonyms", "description", "attributes"}
)


def is_native(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT_TAG


def from_native(obj: dict, source: str = "<taxonomy>") -> Taxonomy:
    """Build a Taxonomy from the parsed JSON document; errors name `source` and the node."""
    if obj.get("version") != VERSION:
        raise TaxonomyError(f"{source}: unsupported taxonomy file version {obj.get('version')!r}")
    unknown_top = set(obj) - {"format", "version", "metadata", "nodes"}
    if unknown_top:
        raise TaxonomyError(f"{source}: unknown top-level keys {sorted(unknown_top)}")
    rows = obj.get("nodes")
    if not isinstance(rows, list):
        raise TaxonomyError(f"{source}: 'nodes' must be a list")
    # column by column: a Python loop per node is the cost that matters at a million nodes
    bad = next(
        (k for k, r in enumerate(rows) if not (isinstance(r, dict) and "id" in r and "name" in r)),
        None,
    )
    if bad is not None:
        raise TaxonomyError(
            f"{source}: node #{bad} needs at least 'id' and 'name': {rows[bad]!r:.200}"
        )
    odd = next((row for row in rows if len(row) > 2 and not NODE_KEYS.issuperset(row)), None)
    if odd is not None:
        raise TaxonomyError(
            f"{source}: node {odd['id']!r} has unknown keys {sorted(set(odd) - NODE_KEYS)}"
        )
    ids = [row["id"] for row in rows]
    names = [row["name"] for row in rows]
    parents = [row.get("parents", ()) for row in rows]
    cats = [row.get("category_id") for row in rows]
    syns = [tuple(row.get("synonyms", ())) for row in rows]
    descs = [row.get("description", "") for row in rows]
    attrs = [row.get("attributes") for row in rows]
    return Taxonomy.from_columns(
        ids, names, parents, cats, syns, descs, attrs, metadata=obj.get("metadata") or {}
    )


def _node_rows(taxonomy: Taxonomy):
    cols = taxonomy.columns()
    for i, node_id in enumerate(cols["ids"]):
        row: dict[str, object] = {"id": node_id, "name": cols["names"][i]}
        if cols["category_ids"][i] is not None:
            row["category_id"] = cols["category_ids"][i]
        if cols["parents"][i]:
            row["parents"] = cols["parents"][i]
        if cols["synonyms"][i]:
            row["synonyms"] = list(cols["synonyms"][i])
        if cols["descriptions"][i]:
            row["description"] = cols["descriptions"][i]
        if cols["attributes"][i]:
            row["attributes"] = cols["attributes"][i]
        yield row


def write_native(taxonomy: Taxonomy, path: str | os.PathLike) -> None:
    """Write `taxonomy` as a vastdet taxonomy file (atomically)."""

    def write(handle) -> None:
        head = {"format": FORMAT_TAG, "version": VERSION, "metadata": taxonomy.metadata}
        handle.write(json.dumps(head, ensure_ascii=False)[:-1] + ',\n "nodes": [\n')
        first = True
        for row in _node_rows(taxonomy):
            handle.write(("  " if first else ",\n  ") + json.dumps(row, ensure_ascii=False))
            first = False
        handle.write("\n ]}\n")

    atomic_write_text(path, write)
