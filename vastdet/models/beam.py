"""Taxonomy-guided selection (not in the paper): the selector walks the category tree top-down
with a beam instead of scoring every category.

Flat selection (§3.3) scores all C categories per image, so its cost grows with C. Here the
first step scores the tree's roots; each further step scores the children of the B best nodes
of the step before (`beam_width`); the walk ends when no kept node has children, and the C'
best categories among those scored are selected. An image then scores on the order of
B x branching x depth nodes. Nodes that are not categories (WordNet's synsets between
categories) are scored like categories, with the mean of their children's queries as their
query (bottom-up, so a node stands for everything below it). The selector head is the flat
one: categories never attend to each other, so a node's score does not depend on what else is
scored, and a beam that covers the whole tree selects exactly what flat selection selects.

Training supervises every step: an image's categories and all their ancestors are its
positives, wherever the walk meets them, under the selection loss (ASL); the walk also
expands the positive nodes it meets (teacher forcing), so every level of an image's paths is
scored and trained even while the beam would miss them.
"""

from __future__ import annotations

import torch
from torch import nn

from vastdet.models.category_queries import ancestor_mask, hierarchy_edges, take_loaded_sizes

_BUFFERS = (
    "child_ptr",
    "child_idx",
    "roots",
    "up_parent",
    "up_child",
    "up_sizes",
    "mean_parent",
    "mean_child",
    "mean_sizes",
)


class BeamTree(nn.Module):
    """A `taxonomy.hierarchy.SelectionTree` as buffers (so an exported model carries it) and
    the walk over it. Built without a tree (`tree=None`) its buffers take their sizes from the
    weights loaded next."""

    def __init__(self, tree=None, beam_width: int = 16):
        super().__init__()
        if beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, not {beam_width}")
        self.beam_width = beam_width
        empty = torch.zeros(0, dtype=torch.int64)
        for name in _BUFFERS:
            self.register_buffer(name, empty.clone())
        self.register_buffer("num_categories", torch.zeros((), dtype=torch.int64))
        self.register_buffer("depth", torch.zeros((), dtype=torch.int64))
        if tree is not None:
            self.child_ptr = torch.as_tensor(tree.child_ptr, dtype=torch.int64)
            self.child_idx = torch.as_tensor(tree.child_idx, dtype=torch.int64)
            self.roots = torch.as_tensor(tree.roots, dtype=torch.int64)
            for name, levels in (("up", tree.up), ("mean", tree.mean)):
                parent, child, sizes = hierarchy_edges(levels)
                setattr(self, f"{name}_parent", parent)
                setattr(self, f"{name}_child", child)
                setattr(self, f"{name}_sizes", torch.tensor(sizes, dtype=torch.int64))
            self.num_categories = torch.tensor(tree.num_categories, dtype=torch.int64)
            self.depth = torch.tensor(tree.depth, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_loaded_sizes(self, _BUFFERS, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_rows(self) -> int:
        return len(self.child_ptr) - 1

    def node_queries(self, cats: torch.Tensor) -> torch.Tensor:
        """[N - C, W]: the query of each non-category node, the mean of its children's, bottom-up
        (a child may be a category, a row of `cats` [C, W], or another such node)."""
        c = cats.shape[0]
        extra = cats.new_zeros(self.num_rows - c, cats.shape[1])
        start = 0
        for size in self.mean_sizes.tolist():
            p, ch = self.mean_parent[start : start + size], self.mean_child[start : start + size]
            start += size
            rows, slot = torch.unique(p, return_inverse=True)
            values = self.gather(cats, extra, ch)
            sums = extra.new_zeros(len(rows), extra.shape[1]).index_add(0, slot, values)
            counts = torch.bincount(slot, minlength=len(rows)).to(extra.dtype)[:, None]
            extra = extra.index_copy(0, rows - c, sums / counts)
        return extra

    @staticmethod
    def gather(cats: torch.Tensor, extra: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Queries of node `rows` (any shape; -1 padding reads row 0) from the category queries
        and the non-category nodes' (`node_queries`), without joining the two tables: at 10^6
        categories a joined copy would be 3 GB per forward."""
        rows = rows.clamp(min=0)
        c = cats.shape[0]
        if not len(extra):
            return cats[rows]
        out = cats[rows.clamp(max=c - 1)]
        inner = rows >= c
        return torch.where(inner[..., None], extra[(rows - c).clamp(min=0)], out)

    def positives(self, present: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: each image's categories (`present` [B, C] bool) and all their ancestors."""
        rows = present.new_zeros(present.shape[0], self.num_rows)
        rows[:, : present.shape[1]] = present
        sizes = self.up_sizes.tolist()
        return rows | ancestor_mask(rows, self.up_parent, self.up_child, sizes)

    def _children(self, rows: torch.Tensor) -> torch.Tensor:
        starts, stops = self.child_ptr[rows], self.child_ptr[rows + 1]
        counts = stops - starts
        if counts.sum() == 0:
            return rows.new_zeros(0)
        offsets = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
        return self.child_idx[offsets + torch.arange(int(counts.sum()), device=rows.device)]

    def walk(self, score, batch: int, positive: torch.Tensor | None = None):
        """(rows [B, K], logits [B, K]) of every node the walk scored for each image, -1 rows
        (and -inf logits) where an image scored fewer. `score(rows [B, k]) -> [B, k]` scores
        node rows per image (-1: padding); `positive` [B, N] bool (training) also expands the
        positive nodes met. The walk always takes depth + 1 steps, scoring padding once the
        beam has nowhere to go, so every rank calls the selector as often as every other (ZeRO-3
        gathers its parameters on each call)."""
        device = self.child_ptr.device
        frontier = [self.roots for _ in range(batch)]
        seen = torch.zeros(batch, self.num_rows, dtype=torch.bool, device=device)
        all_rows, all_logits = [], []
        for _ in range(int(self.depth) + 1):
            width = max(1, max(len(f) for f in frontier))
            rows = torch.full((batch, width), -1, dtype=torch.int64, device=device)
            for b, f in enumerate(frontier):
                rows[b, : len(f)] = f
                seen[b, f] = True
            logits = score(rows)
            logits = logits.masked_fill(rows < 0, float("-inf"))
            all_rows.append(rows)
            all_logits.append(logits)
            kids = (self.child_ptr[rows.clamp(min=0) + 1] - self.child_ptr[rows.clamp(min=0)]) > 0
            ranked = logits.detach().masked_fill(~kids | (rows < 0), float("-inf"))
            top = ranked.topk(min(self.beam_width, width), dim=1)
            frontier = []
            for b in range(batch):
                keep = top.indices[b][torch.isfinite(top.values[b])]
                expand = rows[b, keep]
                if positive is not None:
                    forced = rows[b][(rows[b] >= 0) & kids[b]]
                    expand = torch.cat([expand, forced[positive[b, forced]]])
                children = torch.unique(self._children(torch.unique(expand)))
                frontier.append(children[~seen[b, children]])
        return torch.cat(all_rows, 1), torch.cat(all_logits, 1)
