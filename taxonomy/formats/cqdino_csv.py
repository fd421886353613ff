"""The CQ-DINO category-tree CSV, one row per category:

    level,id,category_id,english_name,chinese_name,english_description,chinese_description,
    parent_id,direct_children,ancestor_category_ids

`id` is the node (tree) id, `parent_id` the parent node ids, `direct_children` and
`ancestor_category_ids` comma-separated category ids. The tree holds dataset categories only:
writing a taxonomy with non-category nodes writes its `restrict`ed form. Read: the edges come
from `direct_children`; `parent_id` must agree with them; `level` and the ancestors are derived
data and are recomputed.
"""

from __future__ import annotations

import csv
import os

from taxonomy.formats.common import atomic_write_text, open_text
from taxonomy.tree import Taxonomy, TaxonomyError

COLUMNS = (
    "level",
    "id",
    "category_id",
    "english_name",
    "chinese_name",
    "english_description",
    "chinese_description",
    "parent_id",
    "direct_children",
    "ancestor_category_ids",
)


def _split_ints(text: str, path, line: int, column: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TaxonomyError(
            f"{path}:{line}: column {column} is not a list of integers: {text!r}"
        ) from None


def read_cqdino_csv(path: str | os.PathLike) -> Taxonomy:
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        found = tuple(h.strip().lower().replace(" ", "_") for h in header or ())
        if found != COLUMNS:
            raise TaxonomyError(f"{path}: expected the header {','.join(COLUMNS)}, found {header}")
        rows = [(number, row) for number, row in enumerate(reader, start=2) if row]
    cat_to_node: dict[int, str] = {}
    for number, row in rows:
        if len(row) != len(COLUMNS):
            raise TaxonomyError(f"{path}:{number}: {len(row)} columns, expected {len(COLUMNS)}")
        cat = _split_ints(row[2], path, number, "category_id")
        if len(cat) != 1:
            raise TaxonomyError(f"{path}:{number}: category_id must hold one integer: {row[2]!r}")
        if cat[0] in cat_to_node:
            raise TaxonomyError(
                f"{path}:{number}: category id {cat[0]} also on node {cat_to_node[cat[0]]!r}"
            )
        cat_to_node[cat[0]] = row[1]
    parents: dict[str, list[str]] = {row[1]: [] for _, row in rows}
    for number, row in rows:
        for child in _split_ints(row[8], path, number, "direct_children"):
            if child not in cat_to_node:
                raise TaxonomyError(
                    f"{path}:{number}: direct child {child} is not a category in the file"
                )
            parents[cat_to_node[child]].append(row[1])
    node_to_cat = {node: cat for cat, node in cat_to_node.items()}
    for number, row in rows:
        named = {p.strip() for p in row[7].split(",") if p.strip()}
        derived = set(parents[row[1]])
        derived_cats = {str(node_to_cat[p]) for p in derived}
        if named and not named <= derived | derived_cats:
            raise TaxonomyError(
                f"{path}:{number}: parent_id {row[7]!r} of {row[1]!r} disagrees with the "
                f"direct_children columns, which give {sorted(derived)}"
            )
    attrs = []
    for _, row in rows:
        a = {k: v for k, v in (("name_zh", row[4]), ("desc_zh", row[6])) if v}
        attrs.append(a or None)
    return Taxonomy.from_columns(
        ids=[row[1] for _, row in rows],
        names=[row[3] for _, row in rows],
        parents=[parents[row[1]] for _, row in rows],
        category_ids=[int(row[2]) for _, row in rows],
        descriptions=[row[5] for _, row in rows],
        attributes=attrs,
        metadata={"source": os.fspath(path)},
    )


def write_cqdino_csv(taxonomy: Taxonomy, path: str | os.PathLike) -> None:
    tree = taxonomy.restrict(taxonomy.category_ids())
    anc_ptr, anc_idx = tree.ancestor_closure()
    cols = tree.columns()
    cats = cols["category_ids"]
    depth = tree.depths()
    order = sorted(range(len(tree)), key=lambda i: (depth[i], cats[i]))

    def write(handle) -> None:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(COLUMNS)
        for i in order:
            attrs = cols["attributes"][i] or {}
            children = sorted(cats[tree.index_of(c)] for c in tree.children(cols["ids"][i]))
            ancestors = sorted(cats[j] for j in anc_idx[anc_ptr[i] : anc_ptr[i + 1]])
            out.writerow(
                [
                    int(depth[i]),
                    cols["ids"][i],
                    cats[i],
                    cols["names"][i],
                    attrs.get("name_zh", ""),
                    cols["descriptions"][i],
                    attrs.get("desc_zh", ""),
                    ",".join(cols["parents"][i]),
                    ",".join(map(str, children)),
                    ",".join(map(str, ancestors)),
                ]
            )

    atomic_write_text(path, write)
