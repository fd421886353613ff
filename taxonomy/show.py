"""A readable summary of a taxonomy: statistics, depth histogram and a bounded tree view."""

from __future__ import annotations

import numpy as np

from taxonomy.tree import Taxonomy


def stats(taxonomy: Taxonomy) -> dict[str, object]:
    """Counts describing the taxonomy's shape."""
    parents = taxonomy.num_parents()
    children = taxonomy.num_children()
    depth = taxonomy.depths()
    return {
        "nodes": len(taxonomy),
        "categories": taxonomy.num_categories,
        "edges": taxonomy.num_edges,
        "roots": int((parents == 0).sum()),
        "leaves": int((children == 0).sum()),
        "max depth": taxonomy.max_depth,
        "nodes with several parents": int((parents > 1).sum()),
        "max children": int(children.max()) if children.size else 0,
        "depth histogram": np.bincount(depth).tolist() if depth.size else [],
    }


def _label(taxonomy: Taxonomy, node_id: str) -> str:
    cat = taxonomy.category_id(node_id)
    suffix = f" #{cat}" if cat is not None else ""
    return f"{taxonomy.name(node_id)} [{node_id}]{suffix}"


def tree_lines(
    taxonomy: Taxonomy, roots: list[str] | None = None, max_depth: int = 3, max_children: int = 8
) -> list[str]:
    """An indented tree drawn from `roots` (default: all roots), cut at the given bounds.

    A node with several parents appears under each; `^` marks the repeated appearances.
    """
    lines: list[str] = []
    shown: set[str] = set()

    def draw(node_id: str, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└── " if last else "├── ")
        repeat = " ^" if node_id in shown else ""
        lines.append(prefix + branch + _label(taxonomy, node_id) + repeat)
        shown.add(node_id)
        kids = taxonomy.children(node_id)
        if not kids or repeat:
            return
        inner = prefix + ("" if depth == 0 else ("    " if last else "│   "))
        if depth >= max_depth:
            lines.append(inner + f"└── … {len(kids)} children")
            return
        for k, kid in enumerate(kids[:max_children]):
            draw(kid, inner, k == len(kids) - 1 and len(kids) <= max_children, depth + 1)
        if len(kids) > max_children:
            lines.append(inner + f"└── … and {len(kids) - max_children} more")

    roots = taxonomy.roots() if roots is None else roots
    for root in roots[:max_children]:
        draw(root, "", True, 0)
    if len(roots) > max_children:
        lines.append(f"… and {len(roots) - max_children} more roots")
    return lines


def format_stats(values: dict[str, object], width: int = 40) -> list[str]:
    lines = [f"{key:<28}{value:>12,}" for key, value in values.items() if key != "depth histogram"]
    hist = values["depth histogram"]
    if hist:
        lines.append("depth histogram:")
        top = max(hist)
        for depth, count in enumerate(hist):
            bar = "█" * max(1, round(width * count / top)) if count else ""
            lines.append(f"  {depth:>3} {count:>10,} {bar}")
    return lines
