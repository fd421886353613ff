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
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CORRELATIONS = ("tree", "self_attention", "none")
LEAN_CHUNK = 16384  # rows of the [C, W] encoding a lean pass computes at a time
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
    for rows, slot, c, a, counts in _tree_levels(parent, child, level_sizes, alpha):
        sums = out.new_zeros(len(rows), out.shape[1]).index_add(0, slot, out[c])
        a = a.to(out.dtype)
        out = out.index_copy(0, rows, (1 - a) * out[rows] + a * sums / counts.to(out.dtype))
    return out


def _tree_levels(parent, child, level_sizes, alpha):
    """Per level, deepest parents first: (parent rows [R], each edge's parent slot [E], child
    rows [E], alpha [R, 1], edges per parent [R, 1])."""
    start = 0
    for size in level_sizes:
        p, c = parent[start : start + size], child[start : start + size]
        start += size
        rows, slot = torch.unique(p, return_inverse=True)
        counts = torch.bincount(slot, minlength=len(rows))[:, None]
        yield rows, slot, c, alpha[rows][:, None], counts


def tree_construction_(out, parent, child, level_sizes, alpha, chunk: int = 65536) -> None:
    """`tree_construction` in place on `out` [C, D], children gathered and parents updated
    `chunk` edges or rows at a time: a level holds one [parents, D] tensor (its children's sums,
    all taken before any parent changes, as out of place) beside chunk-sized temporaries."""
    for rows, slot, c, a, counts in _tree_levels(parent, child, level_sizes, alpha):
        sums = out.new_zeros(len(rows), out.shape[1])
        for i in range(0, len(c), chunk):
            sums.index_add_(0, slot[i : i + chunk], out[c[i : i + chunk]])
        a, counts = a.to(out.dtype), counts.to(out.dtype)
        for i in range(0, len(rows), chunk):
            r, a_r = rows[i : i + chunk], a[i : i + chunk]
            out.index_copy_(
                0, r, (1 - a_r) * out[r] + a_r * sums[i : i + chunk] / counts[i : i + chunk]
            )


def tree_transpose_(grad, parent, child, level_sizes, alpha, chunk: int = 65536) -> None:
    """The gradient through `tree_construction`, in place on `grad` [C, D]: the tree is linear
    in the queries, so each level's transpose runs in reverse order, shallowest first: a parent
    keeps (1 - alpha) of its gradient and passes alpha / (its number of children) to each
    child."""
    levels = list(_tree_levels(parent, child, level_sizes, alpha))
    for rows, slot, c, a, counts in reversed(levels):
        a = a.to(grad.dtype)
        share = grad[rows]  # the parents' gradient, made their children's share in place
        for i in range(0, len(rows), chunk):
            g, a_r = share[i : i + chunk], a[i : i + chunk]
            grad.index_copy_(0, rows[i : i + chunk], (1 - a_r) * g)
            g.mul_(a_r / counts[i : i + chunk].to(grad.dtype))
        for i in range(0, len(c), chunk):
            grad.index_add_(0, c[i : i + chunk], share[slot[i : i + chunk]])


class LeanQueries:
    """What a lean encoding shares with the consumers of its queries that know it
    (`ChunkedScores`, `select_rows`): the norm's per-row 1/sigma and affine weights, so that a
    consumer turns its rows' incoming gradient into the gradient before the norm itself, and
    where the gradient of every row goes. LayerNorm's gradient is linear in the incoming one,
    so the consumers' parts add up before the norm as they would after it.

    x-hat, which the norm's backward needs, is read back from the queries, (y - beta) / gamma:
    a consumer that holds the queries (the scoring saves them anyway) overwrites them, row chunk
    by row chunk, with their gradient before the norm (`buffer`), so the step holds no [C, W]
    gradient beside them. The queries of a lean forward are therefore used up by its backward
    pass. With a gain near zero the read-back loses precision and the encoding makes no
    handle; its consumers then pass ordinary gradients."""

    MIN_GAIN = 1e-3

    def __init__(self, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        self.rstd, self.gamma, self.beta = rstd, gamma, beta
        self.g_gamma, self.g_beta = torch.zeros_like(gamma), torch.zeros_like(beta)
        self.buffer: torch.Tensor | None = None  # [C, W]: every row's gradient before the norm
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows [n], their part)

    @staticmethod
    def usable(gamma: torch.Tensor) -> bool:
        return bool(gamma.detach().abs().min() >= LeanQueries.MIN_GAIN)

    def norm_backward(self, grad: torch.Tensor, out: torch.Tensor, rows) -> torch.Tensor:
        """The gradient before the norm [n, W] of rows `rows` (a slice or an index [n]) whose
        queries are `out` [n, W] and incoming gradient `grad` [n, W]; the gain's and shift's
        gradients are summed in."""
        dtype, grad = grad.dtype, grad.float()
        xhat = (out.float() - self.beta) / self.gamma
        self.g_gamma += (grad * xhat).sum(0)
        self.g_beta += grad.sum(0)
        g = grad * self.gamma
        mean_g = g.mean(-1, keepdim=True)
        mean_gx = (g * xhat).mean(-1, keepdim=True)
        return (self.rstd[rows][:, None] * (g - mean_g - xhat * mean_gx)).to(dtype)


class LeanEncoding(torch.autograd.Function):
    """relu(table proj^T + b) -> tree construction -> LayerNorm, the queries' encoding, for
    training at vast C: computed `chunk` rows at a time into one [C, W] tensor, keeping nothing
    of it for the backward pass. Exact: the same operations as the autograd path.

    The backward pass starts from the gradient before the norm: written over the queries by
    the consumers that know the `LeanQueries` handle, plus their selected rows' parts; a
    consumer that does not passes a dense gradient, for which the norm's input is recomputed.
    It then runs the tree's transpose in place and, when the table is as wide as the queries
    (768 and 768 in the full presets), writes the table's gradient into the same buffer. So a
    CQ-DINO step's [C, W] tensors are the table, its gradient (which the queries become) and
    Adam's moments."""

    @staticmethod
    def forward(ctx, table, weight, bias, gamma, beta, parent, child, alpha, sizes, eps, chunk,
                lean):  # fmt: skip
        ctx.save_for_backward(table, weight, bias, gamma, beta, parent, child, alpha)
        ctx.sizes, ctx.eps, ctx.chunk, ctx.lean = sizes, eps, chunk, lean
        ctx.set_materialize_grads(False)  # consumers that know `lean` pass no gradient
        out = LeanEncoding._pre_norm(table, weight, bias, parent, child, alpha, sizes, chunk)
        for i in range(0, len(out), chunk):
            y, _, rstd = torch.native_layer_norm(out[i : i + chunk], gamma.shape, gamma, beta, eps)
            out[i : i + chunk] = y
            if lean is not None:
                lean.rstd[i : i + chunk] = rstd.view(-1).float()
        return out

    @staticmethod
    def _pre_norm(table, weight, bias, parent, child, alpha, sizes, chunk):
        out = table.new_empty(len(table), weight.shape[0])
        for i in range(0, len(table), chunk):
            out[i : i + chunk] = torch.relu(F.linear(table[i : i + chunk], weight, bias))
        if parent.numel():
            tree_construction_(out, parent, child, sizes, alpha)
        return out

    @staticmethod
    def backward(ctx, grad):
        table, weight, bias, gamma, beta, parent, child, alpha = ctx.saved_tensors
        chunk, lean = ctx.chunk, ctx.lean
        g_gamma, g_beta = torch.zeros_like(gamma), torch.zeros_like(beta)
        kept = lean.buffer if lean is not None else None
        if grad is not None:  # a dense gradient after the norm: recompute the norm's input
            buf = LeanEncoding._pre_norm(table, weight, bias, parent, child, alpha, ctx.sizes,
                                         chunk)  # fmt: skip
            for i in range(0, len(buf), chunk):  # the norm's backward, row chunk by row chunk
                with torch.enable_grad():
                    x = buf[i : i + chunk].detach().requires_grad_()
                    w, b = gamma.detach().requires_grad_(), beta.detach().requires_grad_()
                    y = F.layer_norm(x, gamma.shape, w, b, ctx.eps)
                    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad[i : i + chunk])
                buf[i : i + chunk] = gx
                g_gamma += gw
                g_beta += gb
            if kept is not None:
                buf += kept
        elif kept is not None:
            buf = kept
        elif lean is not None and lean.pending:
            buf = table.new_zeros(len(table), weight.shape[0])
        else:
            return (None,) * 12
        if lean is not None:
            for rows, part in lean.pending:
                buf.index_add_(0, rows, part.to(buf.dtype))
            g_gamma += lean.g_gamma.to(g_gamma.dtype)
            g_beta += lean.g_beta.to(g_beta.dtype)
            lean.buffer, lean.pending = None, []
        del kept
        if parent.numel():
            tree_transpose_(buf, parent, child, ctx.sizes, alpha)
        g_weight, g_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        same = buf.shape == table.shape and buf.dtype == table.dtype
        g_table = buf if same else torch.empty_like(table)
        for i in range(0, len(table), chunk):  # relu and the projection
            rows = table[i : i + chunk]
            g = buf[i : i + chunk] * (F.linear(rows, weight, bias) > 0)
            g_weight += g.T @ rows
            g_bias += g.sum(0)
            g_table[i : i + chunk] = g @ weight
        return g_table, g_weight, g_bias, g_gamma, g_beta, *([None] * 7)


class LeanRows(torch.autograd.Function):
    """queries[rows] whose backward passes the rows' gradient before the norm to the encoding
    through its `LeanQueries` handle, not as a dense [C, W] tensor of zeros around a few rows."""

    @staticmethod
    def forward(ctx, queries, rows, lean):
        out = queries[rows]
        ctx.save_for_backward(rows, out)
        ctx.lean = lean
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            rows, out = ctx.saved_tensors
            width = out.shape[-1]
            flat = rows.reshape(-1)
            part = ctx.lean.norm_backward(grad.reshape(-1, width), out.reshape(-1, width), flat)
            ctx.lean.pending.append((flat, part))
        return None, None, None


def select_rows(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """queries[rows]; for the queries of a lean encoding, through its handle (`LeanRows`)."""
    lean = getattr(queries, "lean_queries", None)
    if lean is None or not torch.is_grad_enabled():
        return queries[rows]
    return LeanRows.apply(queries, rows, lean)


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
        # training encodes the queries with `LeanEncoding` (same result and gradients, less
        # memory); False: plain autograd (for side-by-side measurements)
        self.lean = True
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
        if self.lean and self.correlation != "self_attention" and torch.is_grad_enabled():
            gamma = self.norm.weight
            lean = None
            if LeanQueries.usable(gamma):
                rstd = torch.empty(len(self.embedding.weight), device=gamma.device)
                lean = LeanQueries(rstd, gamma.detach().float(), self.norm.bias.detach().float())
            out = LeanEncoding.apply(
                self.embedding(),
                self.proj.weight,
                self.proj.bias,
                self.norm.weight,
                self.norm.bias,
                self.tree_parent if self.correlation == "tree" else self.tree_parent[:0],
                self.tree_child,
                self.tree_alpha,
                self.tree_level_sizes.tolist(),
                self.norm.eps,
                LEAN_CHUNK,
                lean,
            )
            if lean is not None:
                out.lean_queries = lean  # read by `select_rows` and `ChunkedScores`
            return out
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
