"""The category DAG: nodes with string ids, optional integer category ids, several parents allowed.

Storage is columnar (lists of names, numpy arrays of edges in CSR form) so that a taxonomy of a
million nodes loads, validates and answers graph queries in seconds: per-node Python objects are
only made when a caller asks for a `Node`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NO_CATEGORY = -1


class TaxonomyError(ValueError):
    """A taxonomy that cannot be built: the message names the offending nodes."""


class CycleError(TaxonomyError):
    """The parent links form a cycle; `cycle` lists its node ids in order."""

    def __init__(self, cycle: Sequence[str]):
        self.cycle = list(cycle)
        path = " -> ".join([*self.cycle, self.cycle[0]])
        super().__init__(
            f"taxonomy has a cycle: {path} (each node is listed as a parent of the next)"
        )


@dataclass(frozen=True)
class Node:
    """One taxonomy node; `parents` are node ids, `category_id` is None for non-category nodes."""

    id: str
    name: str
    parents: tuple[str, ...] = ()
    category_id: int | None = None
    synonyms: tuple[str, ...] = ()
    description: str = ""
    attributes: Mapping[str, object] = field(default_factory=dict)


def gather_csr(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Concatenate the CSR rows `rows` of (indptr, indices) without a Python loop."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return indices[:0]
    # position of each output element = its row's start + its offset inside the row
    row_offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return indices[row_offsets + np.arange(total)]


def build_csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr [n+1], indices) grouping `values` by `keys`, stable within a key."""
    order = np.argsort(keys, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=indptr[1:])
    return indptr, values[order]


def ancestor_closure_csr(
    child: np.ndarray, parent: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the transitive parent closure over n rows, one vectorised hop per iteration."""
    parent_ptr, parent_idx = build_csr(child, parent, n)
    all_src, all_anc = [child], [parent]
    src, cur = child, parent
    while src.size:
        counts = np.diff(parent_ptr)[cur]
        src = np.repeat(src, counts)
        cur = gather_csr(parent_ptr, parent_idx, cur)
        if src.size:  # paths that meet again (diamonds) continue once
            key = np.unique(src * n + cur)
            src, cur = key // n, key % n
        all_src.append(src)
        all_anc.append(cur)
    key = (
        np.unique(np.concatenate(all_src) * n + np.concatenate(all_anc))
        if n
        else np.zeros(0, np.int64)
    )
    return build_csr(key // max(n, 1), key % max(n, 1), n)


class Taxonomy:
    """A validated category DAG.

    Build it from `Node`s (`Taxonomy(nodes)`) or from columns (`Taxonomy.from_columns`). Every
    constructor validates: duplicate node or category ids, unknown parents and cycles raise a
    `TaxonomyError` that names the nodes involved.
    """

    def __init__(self, nodes: Iterable[Node], metadata: Mapping[str, object] | None = None):
        ids, names, parents, cats, syns, descs, attrs = [], [], [], [], [], [], []
        for node in nodes:
            ids.append(node.id)
            names.append(node.name)
            parents.append(node.parents)
            cats.append(node.category_id)
            syns.append(tuple(node.synonyms))
            descs.append(node.description)
            attrs.append(dict(node.attributes) if node.attributes else None)
        self._init_columns(ids, names, parents, cats, syns, descs, attrs, metadata)

    @classmethod
    def from_columns(
        cls,
        ids: list[str],
        names: list[str],
        parents: Sequence[Sequence[str]],
        category_ids: Sequence[int | None] | None = None,
        synonyms: list[tuple[str, ...]] | None = None,
        descriptions: list[str] | None = None,
        attributes: list[dict | None] | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> Taxonomy:
        """Build from parallel per-node columns (the fast path for large files)."""
        n = len(ids)
        self = cls.__new__(cls)
        self._init_columns(
            ids,
            names,
            parents,
            category_ids if category_ids is not None else [None] * n,
            synonyms if synonyms is not None else [()] * n,
            descriptions if descriptions is not None else [""] * n,
            attributes if attributes is not None else [None] * n,
            metadata,
        )
        return self

    # ------------------------------------------------------------------ construction
    def _init_columns(self, ids, names, parents, cats, syns, descs, attrs, metadata) -> None:
        n = len(ids)
        for column, label in (
            (names, "names"),
            (parents, "parents"),
            (cats, "category_ids"),
            (syns, "synonyms"),
            (descs, "descriptions"),
            (attrs, "attributes"),
        ):
            if len(column) != n:
                raise TaxonomyError(f"column {label} has {len(column)} entries for {n} node ids")
        self.metadata: dict[str, object] = dict(metadata or {})
        self._ids: list[str] = list(ids)
        self._names: list[str] = list(names)
        self._synonyms: list[tuple[str, ...]] = list(syns)
        self._descriptions: list[str] = list(descs)
        self._attributes: list[dict | None] = list(attrs)
        self._index: dict[str, int] = dict(zip(self._ids, range(n)))
        if len(self._index) != n or not all(type(i) is str and i for i in self._ids):
            self._raise_bad_ids()
        self._category = self._category_column(cats)
        self._link_parents(parents)
        self._order_levels()

    def _raise_bad_ids(self) -> None:
        first: dict[str, int] = {}
        for i, node_id in enumerate(self._ids):
            if not isinstance(node_id, str) or not node_id:
                raise TaxonomyError(
                    f"node #{i} has an invalid id {node_id!r}: ids are non-empty strings"
                )
            j = first.setdefault(node_id, i)
            if j != i:
                raise TaxonomyError(
                    f"duplicate node id {node_id!r}: nodes #{j} ({self._names[j]!r}) "
                    f"and #{i} ({self._names[i]!r})"
                )

    def _category_column(self, cats: Sequence[int | None]) -> np.ndarray:
        n = len(cats)
        given = [c for c in cats if c is not None]
        valid_types = all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in given
        )
        column = np.fromiter(
            (NO_CATEGORY if c is None else c for c in cats) if valid_types else (),
            np.int64,
            count=n if valid_types else 0,
        )
        if not valid_types or int((column >= 0).sum()) != len(given):
            bad = next(
                i
                for i, c in enumerate(cats)
                if c is not None
                and (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0)
            )
            raise TaxonomyError(
                f"node {self._ids[bad]!r} has category id {cats[bad]!r}: category ids are integers >= 0"
            )
        rows = np.flatnonzero(column >= 0)
        values = column[rows]
        self._category_index = dict(zip(values.tolist(), rows.tolist()))
        if len(self._category_index) != len(values):
            uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
            dup = int(uniq[np.argmax(counts > 1)])
            a, b = rows[values == dup][:2]
            raise TaxonomyError(
                f"duplicate category id {dup}: nodes {self._ids[a]!r} and {self._ids[b]!r}"
            )
        return column

    def _link_parents(self, parents: Sequence[Sequence[str]]) -> None:
        n = len(self._ids)
        if any(isinstance(plist, str) for plist in parents):
            k = next(k for k, plist in enumerate(parents) if isinstance(plist, str))
            raise TaxonomyError(
                f"node {self._ids[k]!r}: parents must be a list of node ids, not {parents[k]!r}"
            )
        counts = np.fromiter(map(len, parents), np.int64, count=n)
        lookup = self._index.get
        parent = np.fromiter(
            (lookup(p, -1) for plist in parents for p in plist), np.int64, count=int(counts.sum())
        )
        child = np.repeat(np.arange(n, dtype=np.int64), counts)
        if (parent < 0).any():
            k = int(np.argmax(parent < 0))
            i = int(child[k])
            missing = [p for p in parents[i] if p not in self._index][0]
            raise TaxonomyError(
                f"node {self._ids[i]!r} ({self._names[i]!r}) names an unknown parent {missing!r}"
            )
        if child.size:  # the same parent listed twice is one edge
            key = np.unique(child * n + parent)
            child, parent = key // n, key % n
        self._parent_ptr, self._parent_idx = build_csr(child, parent, n)
        self._child_ptr, self._child_idx = build_csr(parent, child, n)

    def _order_levels(self) -> None:
        """Depth = longest path from a root (Kahn's algorithm, one vectorised step per level)."""
        n = len(self._ids)
        indegree = np.diff(self._parent_ptr)
        remaining = indegree.copy()
        depth = np.zeros(n, dtype=np.int64)
        frontier = np.flatnonzero(remaining == 0)
        level = 0
        done = 0
        while frontier.size:
            depth[frontier] = level
            done += frontier.size
            reached = gather_csr(self._child_ptr, self._child_idx, frontier)
            if reached.size == 0:
                break
            uniq, counts = np.unique(reached, return_counts=True)
            remaining[uniq] -= counts
            frontier = uniq[remaining[uniq] == 0]
            level += 1
        if done < n:
            raise CycleError(self._find_cycle(remaining > 0))
        self._depth = depth

    def _find_cycle(self, stuck: np.ndarray) -> list[str]:
        """Walk parent links inside the nodes Kahn's algorithm could not order until one repeats."""
        start = int(np.flatnonzero(stuck)[0])
        seen: dict[int, int] = {}
        path: list[int] = []
        node = start
        while node not in seen:
            seen[node] = len(path)
            path.append(node)
            row = self._parent_idx[self._parent_ptr[node] : self._parent_ptr[node + 1]]
            node = int(next(p for p in row if stuck[p]))
        cycle = path[seen[node] :]
        cycle.reverse()  # parent first: each node is a parent of the next
        return [self._ids[i] for i in cycle]

    # ------------------------------------------------------------------ basic access
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def __iter__(self) -> Iterator[Node]:
        return (self.node(i) for i in self._ids)

    def __repr__(self) -> str:
        return (
            f"Taxonomy({len(self)} nodes, {self.num_categories} categories, "
            f"{len(self.roots())} roots, depth {self.max_depth})"
        )

    @property
    def ids(self) -> list[str]:
        """Node ids in storage order (the order of the source file)."""
        return self._ids

    @property
    def num_edges(self) -> int:
        return int(self._parent_idx.size)

    @property
    def num_categories(self) -> int:
        return len(self._category_index)

    @property
    def max_depth(self) -> int:
        return int(self._depth.max()) if len(self) else 0

    def index_of(self, node_id: str) -> int:
        """Storage position of `node_id`; KeyError naming the id if absent."""
        try:
            return self._index[node_id]
        except KeyError:
            raise KeyError(f"unknown node id {node_id!r}") from None

    def node(self, node_id: str) -> Node:
        i = self.index_of(node_id)
        cat = int(self._category[i])
        return Node(
            id=node_id,
            name=self._names[i],
            parents=tuple(self._ids[j] for j in self._parents_of(i)),
            category_id=None if cat == NO_CATEGORY else cat,
            synonyms=self._synonyms[i],
            description=self._descriptions[i],
            attributes=dict(self._attributes[i] or {}),
        )

    def name(self, node_id: str) -> str:
        return self._names[self.index_of(node_id)]

    def category_id(self, node_id: str) -> int | None:
        cat = int(self._category[self.index_of(node_id)])
        return None if cat == NO_CATEGORY else cat

    def node_of_category(self, category_id: int) -> str:
        """The node id carrying `category_id`; KeyError naming the id if none does."""
        try:
            return self._ids[self._category_index[int(category_id)]]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}") from None

    def category_column(self) -> np.ndarray:
        """Category id of every node in storage order [N]; -1 (`NO_CATEGORY`) where none."""
        return self._category

    def category_ids(self) -> np.ndarray:
        """All category ids, ascending [C]."""
        return np.sort(self._category[self._category >= 0])

    def category_names(self) -> dict[int, str]:
        """category id -> name."""
        return {int(self._category[i]): self._names[i] for i in self._category_index.values()}

    # ------------------------------------------------------------------ graph queries
    def _parents_of(self, i: int) -> np.ndarray:
        return self._parent_idx[self._parent_ptr[i] : self._parent_ptr[i + 1]]

    def _children_of(self, i: int) -> np.ndarray:
        return self._child_idx[self._child_ptr[i] : self._child_ptr[i + 1]]

    def parents(self, node_id: str) -> list[str]:
        return [self._ids[j] for j in self._parents_of(self.index_of(node_id))]

    def children(self, node_id: str) -> list[str]:
        return [self._ids[j] for j in self._children_of(self.index_of(node_id))]

    def _closure(self, start: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        seen = np.zeros(len(self), dtype=bool)
        frontier = np.unique(gather_csr(indptr, indices, start))
        while frontier.size:
            seen[frontier] = True
            step = np.unique(gather_csr(indptr, indices, frontier))
            frontier = step[~seen[step]]
        return np.flatnonzero(seen)

    def ancestor_indices(self, indices: np.ndarray) -> np.ndarray:
        """Storage indices of every strict ancestor of any of `indices` (sorted)."""
        return self._closure(
            np.asarray(indices, dtype=np.int64), self._parent_ptr, self._parent_idx
        )

    def ancestor_closure(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR (indptr [N+1], indices) of every node's strict ancestors, in storage indices."""
        child, parent = self.edges()
        return ancestor_closure_csr(child, parent, len(self))

    def ancestors(self, node_id: str) -> set[str]:
        """Every node reachable by parent links (the node itself excluded)."""
        found = self.ancestor_indices(np.array([self.index_of(node_id)]))
        return {self._ids[j] for j in found}

    def descendants(self, node_id: str) -> set[str]:
        """Every node reachable by child links (the node itself excluded)."""
        start = np.array([self.index_of(node_id)], dtype=np.int64)
        found = self._closure(start, self._child_ptr, self._child_idx)
        return {self._ids[j] for j in found}

    def depth(self, node_id: str) -> int:
        """Length of the longest parent path to a root (roots have depth 0)."""
        return int(self._depth[self.index_of(node_id)])

    def depths(self) -> np.ndarray:
        """Depth of every node in storage order [N]."""
        return self._depth

    def num_children(self) -> np.ndarray:
        """Direct child count of every node in storage order [N]."""
        return np.diff(self._child_ptr)

    def num_parents(self) -> np.ndarray:
        """Direct parent count of every node in storage order [N]."""
        return np.diff(self._parent_ptr)

    def roots(self) -> list[str]:
        return [self._ids[i] for i in np.flatnonzero(self.num_parents() == 0)]

    def leaves(self) -> list[str]:
        return [self._ids[i] for i in np.flatnonzero(self.num_children() == 0)]

    def level_order(self) -> list[np.ndarray]:
        """Storage indices grouped by depth, deepest level first.

        Processing the groups in this order visits every node after all of its descendants (depth
        is the longest root path, so a child is always strictly deeper than each of its parents):
        the order bottom-up passes such as CQ-DINO's tree construction (eq. 6) need.
        """
        order = np.argsort(-self._depth, kind="stable")
        sorted_depth = self._depth[order]
        cuts = np.flatnonzero(np.diff(sorted_depth)) + 1
        return np.split(order, cuts) if order.size else []

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(child, parent) storage indices of every parent link [E], [E]."""
        child = np.repeat(np.arange(len(self), dtype=np.int64), self.num_parents())
        return child, self._parent_idx

    # ------------------------------------------------------------------ derived taxonomies
    def restrict(self, category_ids: Iterable[int]) -> Taxonomy:
        """The sub-hierarchy holding only the given categories.

        Each kept category is linked to its nearest kept category ancestors: a parent path is
        followed through dropped nodes until it reaches a kept category, and a candidate that is
        itself an ancestor of another candidate is dropped (it is not nearest). Node order,
        names and attributes are preserved.
        """
        wanted = sorted({int(c) for c in category_ids})
        unknown = [c for c in wanted if c not in self._category_index]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise KeyError(
                f"restrict: {len(unknown)} category ids are not in the taxonomy: {shown}"
            )
        keep = np.zeros(len(self), dtype=bool)
        keep[[self._category_index[c] for c in wanted]] = True
        parents_of = self._nearest_kept_ancestors(keep)
        kept = np.flatnonzero(keep)
        return Taxonomy.from_columns(
            ids=[self._ids[i] for i in kept],
            names=[self._names[i] for i in kept],
            parents=[[self._ids[p] for p in parents_of.get(int(i), ())] for i in kept],
            category_ids=[int(self._category[i]) for i in kept],
            synonyms=[self._synonyms[i] for i in kept],
            descriptions=[self._descriptions[i] for i in kept],
            attributes=[self._attributes[i] for i in kept],
            metadata={**self.metadata, "restricted_from": len(self)},
        )

    def _nearest_kept_ancestors(self, keep: np.ndarray) -> dict[int, list[int]]:
        n = len(self)
        src = np.flatnonzero(keep)
        # (source, current) pairs walking up through dropped nodes only
        counts = np.diff(self._parent_ptr)[src]
        pair_src = np.repeat(src, counts)
        pair_cur = gather_csr(self._parent_ptr, self._parent_idx, src)
        found_src, found_anc = [], []
        while pair_src.size:
            hit = keep[pair_cur]
            found_src.append(pair_src[hit])
            found_anc.append(pair_cur[hit])
            walk_src, walk_cur = pair_src[~hit], pair_cur[~hit]
            counts = np.diff(self._parent_ptr)[walk_cur]
            pair_src = np.repeat(walk_src, counts)
            pair_cur = gather_csr(self._parent_ptr, self._parent_idx, walk_cur)
            if pair_src.size:
                key = np.unique(pair_src * n + pair_cur)
                pair_src, pair_cur = key // n, key % n
        if not found_src:
            return {}
        key = np.unique(np.concatenate(found_src) * n + np.concatenate(found_anc))
        result: dict[int, list[int]] = {}
        for s, a in zip((key // n).tolist(), (key % n).tolist(), strict=True):
            result.setdefault(s, []).append(a)
        return self._drop_candidates_above_others(result)

    def _drop_candidates_above_others(
        self, candidates: dict[int, list[int]]
    ) -> dict[int, list[int]]:
        """Where a source has several candidates, drop those that are ancestors of another.

        One vectorised upward walk over (source, node) pairs finds every ancestor of every
        candidate of the sources that need it.
        """
        multi = [s for s, c in candidates.items() if len(c) > 1]
        if not multi:
            return candidates
        n = len(self)
        src = np.repeat(np.array(multi, dtype=np.int64), [len(candidates[s]) for s in multi])
        cand = np.array([a for s in multi for a in candidates[s]], dtype=np.int64)
        above_keys = []
        cur_src, cur = src, cand
        while cur.size:
            counts = np.diff(self._parent_ptr)[cur]
            cur_src = np.repeat(cur_src, counts)
            cur = gather_csr(self._parent_ptr, self._parent_idx, cur)
            key = np.unique(cur_src * n + cur)
            above_keys.append(key)
            cur_src, cur = key // n, key % n
        redundant = np.isin(src * n + cand, np.concatenate(above_keys))
        for s, a in zip(src[redundant].tolist(), cand[redundant].tolist()):
            candidates[s].remove(a)
        return candidates

    def with_metadata(self, **metadata: object) -> Taxonomy:
        """The same taxonomy with metadata entries added or replaced (shares the columns)."""
        copy = Taxonomy.__new__(Taxonomy)
        copy.__dict__.update(self.__dict__)
        copy.metadata = {**self.metadata, **metadata}
        return copy

    # ------------------------------------------------------------------ columns for writers
    def columns(self) -> dict[str, list]:
        """Per-node columns in storage order: what writers and `from_columns` exchange."""
        return {
            "ids": self._ids,
            "names": self._names,
            "parents": [[self._ids[j] for j in self._parents_of(i)] for i in range(len(self))],
            "category_ids": [None if c == NO_CATEGORY else c for c in self._category.tolist()],
            "synonyms": self._synonyms,
            "descriptions": self._descriptions,
            "attributes": self._attributes,
        }
