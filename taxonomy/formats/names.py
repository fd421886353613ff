"""A plain name list: line i (1-based) is the name of category id i.

This is the form of V3Det's `category_name_13204_v3det_2023_v1.txt` (UTF-8, CRLF line ends).
It holds no hierarchy: read back, every category is a root.
"""

from __future__ import annotations

import os

from taxonomy.formats.common import atomic_write_text, category_node_id, open_text
from taxonomy.tree import Taxonomy, TaxonomyError


def read_names(path: str | os.PathLike) -> Taxonomy:
    """Read a name list; an empty line inside the list is an error naming its line number."""
    with open_text(path) as handle:
        lines = handle.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise TaxonomyError(
                f"{path}:{number}: empty category name (line i names category id i)"
            )
    ids = [category_node_id(i) for i in range(1, len(lines) + 1)]
    return Taxonomy.from_columns(
        ids,
        [line.strip() for line in lines],
        [()] * len(lines),
        list(range(1, len(lines) + 1)),
        metadata={"source": os.fspath(path)},
    )


def write_names(taxonomy: Taxonomy, path: str | os.PathLike, newline: str = "\n") -> None:
    """Write category names by id; the ids must be exactly 1..C (a list has no gaps)."""
    cats = taxonomy.category_ids()
    if cats.size and (cats[0] != 1 or cats[-1] != cats.size):
        raise TaxonomyError(
            f"cannot write {path} as a name list: category ids run {cats[0]}..{cats[-1]} over "
            f"{cats.size} categories, and a name list needs exactly 1..{cats.size}; "
            "use the vastdet, v3det or coco format instead"
        )
    names = taxonomy.category_names()
    atomic_write_text(path, lambda h: h.write("".join(names[int(c)] + newline for c in cats)))
