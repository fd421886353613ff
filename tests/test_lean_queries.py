"""The lean encoding of the category queries (`LeanEncoding`): row chunks, the tree in place and
its transpose in place must give the autograd path's queries and gradients exactly (up to
float rounding), on a DAG with several parents per node; and it must keep less memory."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import NewTensorsShaped
from test_cq_dino import batch, flat_taxonomy, tiny

import vastdet.models.category_queries as cq
from taxonomy import CategoryHierarchy, Node, Taxonomy
from vastdet.models.build import build_model


def random_dag(n: int = 60, seed: int = 0) -> Taxonomy:
    """Four levels; about one node in five below the roots has a second parent."""
    rng = random.Random(seed)
    nodes, by_level = [], [[] for _ in range(4)]
    for i in range(n):
        level = 0 if i < 4 else rng.randint(1, 3)
        parents = ()
        if level:
            above = [p for lv in by_level[:level] for p in lv] or by_level[0]
            parents = tuple(sorted(set(rng.sample(above, 2 if rng.random() < 0.2 else 1))))
        nodes.append(Node(f"n{i}", f"node {i}", parents, category_id=100 + 3 * i))
        by_level[level].append(f"n{i}")
    return Taxonomy(nodes)


def queries(correlation: str = "tree", width: int = 16, text_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    hierarchy = CategoryHierarchy.from_taxonomy(random_dag(), w=0.3)
    return cq.CategoryQueries(60, width, text_dim, correlation, hierarchy=hierarchy)


def grads(module, weights: torch.Tensor):
    module.zero_grad()
    out = module()
    (out * weights).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in module.named_parameters()}


@pytest.mark.parametrize("correlation, text_dim", [("tree", 16), ("tree", 12), ("none", 16)])
def test_the_lean_encoding_gives_the_autograd_queries_and_gradients(
    monkeypatch, correlation, text_dim
):
    module = queries(correlation, text_dim=text_dim)
    weights = torch.randn(60, 16)
    module.lean = False
    want, want_grads = grads(module, weights)
    module.lean = True
    monkeypatch.setattr(cq, "LEAN_CHUNK", 7)  # several row chunks, the last one short
    got, got_grads = grads(module, weights)
    torch.testing.assert_close(got, want)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)
    assert module.embedding.weight.grad.abs().sum() > 0


def test_the_in_place_tree_and_its_transpose_match_autograd():
    h = CategoryHierarchy.from_taxonomy(random_dag(seed=3), w=0.4)
    parent, child, sizes = cq.hierarchy_edges(h.levels)
    alpha = torch.as_tensor(h.alpha, dtype=torch.float32)
    x = torch.randn(60, 5, requires_grad=True)
    y = cq.tree_construction(x, parent, child, sizes, alpha)
    g = torch.randn(60, 5)
    (want,) = torch.autograd.grad(y, x, g)
    inplace = x.detach().clone()
    cq.tree_construction_(inplace, parent, child, sizes, alpha, chunk=3)
    torch.testing.assert_close(inplace, y.detach())
    back = g.clone()
    cq.tree_transpose_(back, parent, child, sizes, alpha, chunk=3)
    torch.testing.assert_close(back, want)
    # the walk is not the identity: the DAG's parents did change
    assert not torch.allclose(inplace, x.detach())


def test_the_lean_step_keeps_less_than_the_autograd_step():
    """Saved activations: the autograd path keeps relu's and the norm's [C, W] tensors for the
    backward pass; the lean one keeps only what it was given."""
    module = queries(width=32, text_dim=32)

    def saved_bytes(lean: bool) -> int:
        module.lean = lean
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module()
        return total

    lean, plain = saved_bytes(True), saved_bytes(False)
    assert lean < 60 * 32 * 4 <= plain - 60 * 32 * 4  # at least two [C, W] fewer


def test_chunked_scores_give_the_checkpointed_logits_and_gradients_dropout_included():
    """`ChunkedScores` (one gradient buffer for the queries) against one checkpoint per chunk:
    the same logits and gradients, with the selector's dropout on (the recomputation must draw
    the same masks)."""
    from vastdet.models.cq_dino import ImageGuidedSelection

    torch.manual_seed(0)
    selector = ImageGuidedSelection(12, width=16, image_width=8, layers=2, heads=4, ffn=24,
                                    dropout=0.1, chunk=5).train()  # fmt: skip
    feature = torch.randn(2, 12, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    cats = torch.randn(23, 16)
    weights = torch.randn(2, 23)

    def run(lean: bool):
        selector.lean = lean
        selector.zero_grad()
        c = cats.clone().requires_grad_()
        torch.manual_seed(7)
        logits = selector(c, feature, mask)
        (logits * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in selector.named_parameters()}
        return logits.detach(), c.grad, grads, torch.rand(1)

    want, want_cats, want_params, want_next = run(False)
    got, got_cats, got_params, got_next = run(True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_cats, want_cats)
    for name in want_params:
        torch.testing.assert_close(got_params[name], want_params[name], msg=name)
    assert torch.equal(got_next, want_next)  # the random stream after the step is the same


def tiny_cq_dino(lean: bool):
    """The tiny CQ-DINO over a three-level tree of 45 categories, its selector scoring 7 queries
    a chunk (so the lean step goes through `ChunkedScores`), with the lean passes on or off;
    table and queries of one width and the selector's dropout on, as in the full presets."""
    tax = flat_taxonomy()
    cfg = tiny(correlation="tree", num_selected=6, selector_dropout=0.1)
    cfg.text_dim = cfg.category_width
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, tax.category_ids(), tax)
    model.selector.chunk = 7
    model.category_queries.lean = model.selector.lean = lean
    with torch.no_grad():  # a trained norm: gain and shift away from their start
        model.category_queries.norm.weight.uniform_(0.5, 1.5)
        model.category_queries.norm.bias.normal_(0, 0.3)
    return model.train(), criterion


def test_a_lean_cq_dino_step_is_the_autograd_step_and_makes_no_category_sized_tensor(
    monkeypatch,
):
    """The whole tiny CQ-DINO step, lean (the encoding's handle: the scoring writes each row's
    gradient before the norm over the queries, the selected rows add theirs, the table's
    gradient is made in that same buffer) against autograd: the same losses and every
    parameter's gradient. The lean backward pass creates no [C, W] tensor at all (autograd's
    makes several), so the step's [C, W] tensors are the table, the queries that become its
    gradient, and Adam's moments."""
    monkeypatch.setattr(cq, "LEAN_CHUNK", 11)  # several row chunks, the last one short
    calls = []
    original = cq.LeanQueries.norm_backward

    def counted(self, grad, out, rows):
        calls.append(len(grad))
        return original(self, grad, out, rows)

    monkeypatch.setattr(cq.LeanQueries, "norm_backward", counted)
    images, masks, targets = batch()
    results = {}
    for lean in (False, True):
        model, criterion = tiny_cq_dino(lean)
        torch.manual_seed(3)
        losses = criterion(model(images, masks, targets), targets)
        total = criterion.weighted_sum(losses)
        table = model.category_queries.embedding.weight
        with NewTensorsShaped(table.shape) as made:
            total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[lean] = ({k: v.detach() for k, v in losses.items()}, grads, made.made)
    (want_losses, want, want_made), (got_losses, got, got_made) = results[False], results[True]
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name], equal_nan=True, msg=name)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert got["category_queries.embedding.weight"].abs().sum(1).gt(0).all()
    # the handle was used: 45 rows in chunks of 7 by the scoring, and the selected rows
    assert sorted(calls)[-7:] == [7] * 6 + [12] and sum(calls) == 45 + 2 * 6
    assert got_made == [] and len(want_made) >= 3, (got_made, want_made)
