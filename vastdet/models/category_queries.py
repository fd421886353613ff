"""CQ-DINO's learnable category queries `Q_cat` and the encoding of category correlations (§3.4).

`Q_cat [C, D_text]` holds one row per category id (ascending), initialised from the taxonomy's
OpenCLIP text embeddings (random normal when no file is given) and mapped to the category
width W (768 in the full presets) by a linear layer and a ReLU, as the released code does
(`relu(wordvec_proj(label_embed))`). Correlations are then encoded at that width by

- `tree`: hierarchical tree construction (eq. 6-7), bottom-up: each parent v becomes
  (1 - alpha_v) Q_v + alpha_v * mean of its direct children's (already updated) queries, the
  deepest parents first, so that information climbs the whole tree; a node may have several
  parents. No parameters; the edge arrays are buffers, so an exported model carries its tree.
  A LayerNorm follows the tree, in the released code's order: the tree blends raw features and
  the norm sees the blend (a norm does not commute with the blend, so the order matters).
- `self_attention`: an 8-head self-attention layer over all categories with a residual and a
  LayerNorm (for flat vocabularies such as COCO; its cost is quadratic in C).
- `none`: the mapped queries, normalised.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CORRELATIONS = ("tree", "self_attention", "none")
_TREE_BUFFERS = ("tree_parent", "tree_child", "tree_level_sizes", "tree_alpha")


def tree_construction(
    queries: torch.Tensor,
    parent: torch.Tensor,
    child: torch.Tensor,
    level_sizes: list[int],
    alpha: torch.Tensor,
) -> torch.Tensor:
    """Eq. 6 over the levels: Q'_v = (1 - alpha_v) Q_v + alpha_v mean_{c in C(v)} Q'_c.

    queries [C, D]; parent/child [E] category rows of the edges, grouped by level (deepest parents
    first, `level_sizes` edges per level, all of a parent's edges in one level); alpha [C].
    Out of place, differentiable; leaves keep their rows."""
    out = queries
    start = 0
    for size in level_sizes:
        p, c = parent[start : start + size], child[start : start + size]
        start += size
        rows, slot = torch.unique(p, return_inverse=True)
        sums = out.new_zeros(len(rows), out.shape[1]).index_add(0, slot, out[c])
        counts = torch.bincount(slot, minlength=len(rows)).to(out.dtype)[:, None]
        a = alpha[rows].to(out.dtype)[:, None]
        blended = (1 - a) * out[rows] + a * sums / counts
        out = out.index_copy(0, rows, blended)
    return out


def ancestor_mask(
    present: torch.Tensor, parent: torch.Tensor, child: torch.Tensor, level_sizes: list[int]
) -> torch.Tensor:
    """[B, C] bool: the strict ancestors of each image's present categories that are not
    present themselves (§3.4: "vehicle" is not a negative when "car" is annotated). Marks climb
    the levels, deepest parents first; `present` [B, C] bool."""
    marks = present.to(torch.float32)
    start = 0
    for size in level_sizes:
        p, c = parent[start : start + size], child[start : start + size]
        start += size
        marks = marks.index_add(1, p, marks[:, c])
    return (marks > 0) & ~present


def hierarchy_edges(levels) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(parent [E], child [E], edges per level) of level edges deepest parents first (a
    `taxonomy.CategoryHierarchy`'s or `SelectionTree`'s): what `tree_construction` and
    `ancestor_mask` walk."""

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=torch.int64)

    return (
        cat([lv.parent for lv in levels]),
        cat([lv.child for lv in levels]),
        [len(lv.parent) for lv in levels],
    )


def take_loaded_sizes(module: nn.Module, names, state_dict: dict, prefix: str) -> None:
    """Give `module`'s buffers `names` the shapes they have in `state_dict` (before loading it),
    so that buffers whose size comes from a taxonomy load without one."""
    for name in names:
        if prefix + name in state_dict:
            setattr(module, name, torch.empty_like(state_dict[prefix + name]))


class QueryTable(nn.Module):
    """The learnable rows Q_cat [C, D_text] (normal init, as an embedding table). Its forward
    returns the parameter itself: a module call, so ZeRO-3 gathers it, without the copy an
    embedding lookup of every row would make (3 GB at 10^6 categories x 768)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim).normal_())

    def forward(self) -> torch.Tensor:
        return self.weight


class CategoryQueries(nn.Module):
    """Q_cat and its correlation encoding; `forward()` gives the encoded queries [C, W]."""

    def __init__(
        self,
        num_categories: int,
        width: int,
        text_dim: int = 768,
        correlation: str = "tree",
        heads: int = 8,
        init: torch.Tensor | None = None,
        hierarchy=None,
        require_hierarchy: bool = True,
    ):
        super().__init__()
        if correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, not {correlation!r}")
        self.correlation = correlation
        self.embedding = QueryTable(num_categories, text_dim)
        if init is not None:
            if tuple(init.shape) != (num_categories, text_dim):
                raise ValueError(
                    f"category embeddings are {tuple(init.shape)}, the model needs "
                    f"({num_categories}, {text_dim})"
                )
            with torch.no_grad():
                self.embedding.weight.copy_(init)
        self.proj = nn.Linear(text_dim, width)
        if correlation == "self_attention":
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.attn_norm = nn.LayerNorm(width)
        else:
            self.norm = nn.LayerNorm(width)
        empty = torch.zeros(0, dtype=torch.int64)
        for name in _TREE_BUFFERS:
            self.register_buffer(name, empty.clone() if name != "tree_alpha" else torch.zeros(0))
        if correlation == "tree" and hierarchy is None and require_hierarchy:
            raise ValueError("tree construction needs the category hierarchy (a taxonomy)")
        if hierarchy is not None:  # also kept for the selection loss's ancestor mask
            if hierarchy.num_categories != num_categories:
                raise ValueError(
                    f"the hierarchy has {hierarchy.num_categories} categories, the model "
                    f"{num_categories}"
                )
            self.set_hierarchy(hierarchy)

    def set_hierarchy(self, hierarchy) -> None:
        """Edge and alpha buffers from a `taxonomy.CategoryHierarchy` in the same row order."""
        self.tree_parent, self.tree_child, sizes = hierarchy_edges(hierarchy.levels)
        self.tree_level_sizes = torch.tensor(sizes, dtype=torch.int64)
        self.tree_alpha = torch.as_tensor(hierarchy.alpha, dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the tree's buffers take the loaded sizes: a model restored from a file needs no taxonomy
        take_loaded_sizes(self, _TREE_BUFFERS, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def freeze_for_inference(self) -> None:
        """Keep only the encoded queries [C, W]: they do not depend on the image, so inference
        needs neither the [C, D_text] table nor its mapping and tree pass (no per-image
        recomputation). The module can no longer be trained or saved for training afterwards."""
        encoded = self.forward().detach()
        for name in ("embedding", "proj", "norm", "attn", "attn_norm"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("encoded", encoded, persistent=False)

    def forward(self) -> torch.Tensor:
        """The encoded category queries [C, W] (the table module is called, not read: ZeRO-3
        gathers parameters on module calls)."""
        if getattr(self, "encoded", None) is not None:
            return self.encoded
        q = torch.relu(self.proj(self.embedding()))
        if self.correlation == "self_attention":
            x = q[None]
            return self.attn_norm(x + self.attn(x, x, x, need_weights=False)[0])[0]
        if self.correlation == "tree" and self.tree_parent.numel():
            q = tree_construction(
                q,
                self.tree_parent,
                self.tree_child,
                self.tree_level_sizes.tolist(),
                self.tree_alpha,
            )
        return self.norm(q)


def initial_embeddings(path: str | None, category_ids: torch.Tensor) -> torch.Tensor | None:
    """Rows of an embedding file (`vastdet taxonomy embed`) for `category_ids`, or None (no file:
    random initialisation). Names the ids the file lacks."""
    if not path:
        return None
    from taxonomy.embeddings import CategoryEmbeddings

    emb = CategoryEmbeddings.load(path)
    rows = torch.searchsorted(emb.category_ids, category_ids).clamp(max=len(emb.category_ids) - 1)
    missing = emb.category_ids[rows] != category_ids
    if missing.any():
        raise ValueError(
            f"{path} has no embedding for category ids {category_ids[missing][:10].tolist()}: "
            "embed the taxonomy the model is trained on (`vastdet taxonomy embed`)"
        )
    return emb.embeddings[rows].float()
