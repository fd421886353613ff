"""The category hierarchy in array form, for model code: CQ-DINO §3.4.

`CategoryHierarchy` lives in *category-row space*: row r stands for `category_ids[r]`, the same
order as the rows of the category-query matrix `Q_cat [C, D]`. It carries what the model needs
and nothing it must recompute per step:

- `levels`: the parent→child edges of the category-only tree, grouped by the parent's depth,
  deepest first, so a bottom-up pass (eq. 6) sees every child finished before its parents;
- `alpha`: the adaptive weight of eq. 7 per row, by one of two rules (`ALPHA_RULES`):
  `paper`, eq. 7 as printed (w = 0.3, n_v the direct children, N_max the largest n_v), or
  `official`, what the released CQ-DINO code computes (w = 0.4, n_v every descendant, N_max the
  vocabulary size, logs of n + 2: 0.4 * (1 + log(n_v + 2) / log(C + 2))).

The same level arrays give the parent mask of the classification losses: marking the present
categories and propagating the marks up the levels, deepest first, reaches every ancestor in
one pass over the edges (no ancestor closure is stored: in a DAG it can grow quadratically).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from taxonomy.tree import Taxonomy

DEFAULT_TREE_WEIGHT = 0.3  # w in eq. 7, the paper's default
ALPHA_RULES = {"paper": 0.3, "official": 0.4}  # rule -> its w


def official_weights(num_descendants: np.ndarray, vocabulary: int, w: float = 0.4) -> np.ndarray:
    """alpha_v as the released CQ-DINO code computes it for every node [N]:
    w * (1 + log(n_v + 2) / log(N + 2)), n_v = descendants of v, N = the vocabulary size
    (13,204 hard-coded there for V3Det)."""
    if not 0.0 <= w <= 0.5:
        raise ValueError(f"tree weight w={w} is outside [0, 0.5]")
    n = np.asarray(num_descendants, dtype=np.float64)
    return w * (1.0 + np.log(n + 2.0) / np.log(vocabulary + 2.0))


def adaptive_weights(num_children: np.ndarray, w: float = DEFAULT_TREE_WEIGHT) -> np.ndarray:
    """alpha_v = w * (1 + log(n_v + 1) / log(N_max + 1))  (CQ-DINO eq. 7) for every node [N].

    `num_children` holds n_v, the direct child count; N_max is its maximum over the tree. In a
    tree without any parent (N_max = 0) every alpha_v is `w`; it is unused there anyway.
    """
    if not 0.0 <= w <= 0.5:
        raise ValueError(
            f"tree weight w={w} is outside [0, 0.5] (CQ-DINO eq. 7 keeps alpha in [0, 1])"
        )
    n = np.asarray(num_children, dtype=np.float64)
    n_max = float(n.max()) if n.size else 0.0
    if n_max == 0.0:
        return np.full(n.shape, w, dtype=np.float64)
    return w * (1.0 + np.log(n + 1.0) / np.log(n_max + 1.0))


@dataclass(frozen=True)
class LevelEdges:
    """The parent→child edges whose parent sits at `depth`, as category rows [E]."""

    depth: int
    parent: np.ndarray
    child: np.ndarray


def _levels(parent: np.ndarray, child: np.ndarray, depth: np.ndarray) -> tuple[LevelEdges, ...]:
    """Edges grouped by their parent's depth, deepest parents first (a bottom-up order: depth
    is the longest root path, so every child is deeper than each of its parents)."""
    return tuple(
        LevelEdges(depth=int(d), parent=parent[depth[parent] == d], child=child[depth[parent] == d])
        for d in sorted(set(depth[parent].tolist()), reverse=True)
    )


@dataclass(frozen=True)
class CategoryHierarchy:
    """A category-only DAG in category-row space (see the module docstring)."""

    category_ids: np.ndarray  # [C] ascending; row r <-> category_ids[r]
    num_children: np.ndarray  # [C] n_v in the category-only tree
    alpha: np.ndarray  # [C] eq. 7
    levels: tuple[LevelEdges, ...]  # deepest parents first

    @classmethod
    def from_taxonomy(
        cls, taxonomy: Taxonomy, w: float | None = None, alpha_rule: str = "paper"
    ) -> CategoryHierarchy:
        """Restrict `taxonomy` to its categories (nearest category ancestors) and lay it out as
        rows; alpha by `alpha_rule` (`paper` or `official`), `w` None for the rule's own."""
        if alpha_rule not in ALPHA_RULES:
            raise ValueError(f"alpha rule must be one of {sorted(ALPHA_RULES)}, not {alpha_rule!r}")
        w = ALPHA_RULES[alpha_rule] if w is None else w
        tree = taxonomy.restrict(taxonomy.category_ids())
        node_cats = tree.category_column()
        order = np.argsort(node_cats)  # storage index -> row mapping
        row_of_storage = np.empty_like(order)
        row_of_storage[order] = np.arange(order.size)

        child_s, parent_s = tree.edges()
        child, parent = row_of_storage[child_s], row_of_storage[parent_s]
        depth = tree.depths()[order]
        num_children = np.bincount(parent, minlength=order.size)

        if alpha_rule == "paper":
            alpha = adaptive_weights(num_children, w)
        else:  # descendants: how many rows have each row among their strict ancestors
            _, ancestors = tree.ancestor_closure()
            below = np.bincount(row_of_storage[ancestors], minlength=order.size)
            alpha = official_weights(below, order.size, w)
        return cls(
            category_ids=node_cats[order],
            num_children=num_children,
            alpha=alpha,
            levels=_levels(parent, child, depth),
        )

    @property
    def num_categories(self) -> int:
        return int(self.category_ids.size)

    def rows(self, category_ids: Iterable[int]) -> np.ndarray:
        """Rows of the given category ids; KeyError naming the ids that are not in the tree."""
        ids = np.asarray(list(category_ids), dtype=np.int64)
        rows = np.searchsorted(self.category_ids, ids)
        rows = np.minimum(rows, max(self.num_categories - 1, 0))
        bad = self.category_ids[rows] != ids if self.num_categories else np.ones(ids.shape, bool)
        if bad.any():
            raise KeyError(f"category ids not in the hierarchy: {ids[bad][:10].tolist()}")
        return rows

    def propagate_up(self, marked: np.ndarray) -> np.ndarray:
        """Rows with a marked descendant-or-self [..., C] bool, from marks [..., C] bool.

        One pass over the level edges, deepest first: each parent takes the marks of its
        children, whose own marks are already final.
        """
        out = np.array(marked, dtype=bool, copy=True)
        for level in self.levels:
            np.logical_or.at(out, (..., level.parent), out[..., level.child])
        return out

    def parent_mask(self, present_category_ids: Iterable[int]) -> np.ndarray:
        """Rows to leave out of the negatives for an image with these categories [C] bool.

        CQ-DINO §3.4: when a category is annotated, its ancestors are not treated as negatives
        ("vehicle" is not suppressed when "car" is annotated). A category that is itself
        annotated stays a positive, never masked.
        """
        present = np.zeros(self.num_categories, dtype=bool)
        present[self.rows(present_category_ids)] = True
        return self.propagate_up(present) & ~present


@dataclass(frozen=True)
class SelectionTree:
    """The taxonomy as taxonomy-guided (beam) selection walks it, top-down.

    Rows 0..C-1 are the categories in ascending id order (the rows of `Q_cat`); rows C..N-1 are
    the nodes above some category that are not categories themselves (WordNet's synsets between
    V3Det-style categories), each standing for what lies below it. Nodes with no category below
    them are left out. A node may have several parents (a DAG).

    - `child_ptr`, `child_idx`: each row's children (CSR), what a beam step expands;
    - `roots`: rows without a parent, what the first step scores;
    - `up`: every edge, deepest parents first: marks climb it in one pass (an image's categories
      make all their ancestors positive);
    - `mean`: the edges into non-category rows, deepest parents first: such a row's query is the
      mean of its children's, computed bottom-up.
    """

    num_categories: int
    num_rows: int
    child_ptr: np.ndarray
    child_idx: np.ndarray
    roots: np.ndarray
    up: tuple[LevelEdges, ...]
    mean: tuple[LevelEdges, ...]
    depth: int  # levels below the roots: a walk takes at most depth + 1 steps

    @classmethod
    def from_taxonomy(cls, taxonomy: Taxonomy) -> SelectionTree:
        cats = taxonomy.category_column()
        is_cat = cats >= 0
        cat_nodes = np.flatnonzero(is_cat)
        cat_nodes = cat_nodes[np.argsort(cats[cat_nodes], kind="stable")]
        keep = is_cat.copy()
        keep[taxonomy.ancestor_indices(cat_nodes)] = True
        order = np.concatenate([cat_nodes, np.flatnonzero(keep & ~is_cat)])
        row_of = np.full(len(taxonomy), -1, dtype=np.int64)
        row_of[order] = np.arange(order.size)
        child_s, parent_s = taxonomy.edges()
        kept = keep[child_s] & keep[parent_s]
        child, parent = row_of[child_s[kept]], row_of[parent_s[kept]]
        by_parent = np.lexsort((child, parent))
        child, parent = child[by_parent], parent[by_parent]
        child_ptr = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent, minlength=order.size), out=child_ptr[1:])
        depth = taxonomy.depths()[order]
        has_parent = np.zeros(order.size, dtype=bool)
        has_parent[child] = True
        inner = parent >= cat_nodes.size
        return cls(
            num_categories=int(cat_nodes.size),
            num_rows=int(order.size),
            child_ptr=child_ptr,
            child_idx=child,
            roots=np.flatnonzero(~has_parent),
            up=_levels(parent, child, depth),
            mean=_levels(parent[inner], child[inner], depth),
            depth=int(depth.max()) if depth.size else 0,
        )
