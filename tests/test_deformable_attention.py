"""Multi-scale deformable attention against an explicit float64 bilinear-sampling reference."""

from __future__ import annotations

import math

import pytest
import torch

from vastdet.models.deformable_attention import MSDeformAttn, ms_deform_attn

SHAPES = torch.tensor([[6, 8], [3, 4], [2, 2]])


def bilinear(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """feature [C, H, W]; (x, y) normalised in [0, 1]; zero outside; pixel centres at i + 0.5."""
    _, h, w = feature.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(feature.shape[0], dtype=feature.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * feature[:, yi, xi]
    return out


def reference(value, shapes, locations, weights):
    b, _, heads, dh = value.shape
    _, q, _, levels, points, _ = locations.shape
    starts = [0] + torch.cumsum(shapes.prod(1), 0).tolist()
    out = torch.zeros(b, q, heads, dh, dtype=value.dtype)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for li, (h, w) in enumerate(shapes.tolist()):
                    fmap = value[bi, starts[li] : starts[li + 1], hi].T.reshape(dh, h, w)
                    for pi in range(points):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        out[bi, qi, hi] += weights[bi, qi, hi, li, pi] * bilinear(fmap, x, y)
    return out.flatten(2)


def random_inputs(b=2, q=3, heads=2, dh=4, points=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    value = torch.randn(b, s, heads, dh, generator=g, dtype=dtype)
    locations = (
        torch.rand(b, q, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    )  # some outside
    weights = torch.rand(b, q, heads, len(SHAPES), points, generator=g, dtype=dtype)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return value, locations, weights


def test_matches_explicit_bilinear_sampling_in_float64():
    value, locations, weights = random_inputs()
    torch.testing.assert_close(
        ms_deform_attn(value, SHAPES, locations, weights),
        reference(value, SHAPES, locations, weights),
    )


def test_gradcheck():
    value, locations, weights = random_inputs(b=1, q=2, heads=2, dh=2, points=2, seed=1)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, SHAPES, loc, w), inputs)


def test_module_initial_offsets_fan_out_by_head():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 looks along +x, head 1 along +y, head 2 along -x; point p at distance p + 1
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(
        bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        bias[2, 0], torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_runs_and_ignores_padded_values(ref_dim):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2).double()
    s = int(SHAPES.prod(1).sum())
    value = torch.randn(2, s, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    refs = torch.rand(2, 5, 3, ref_dim, dtype=torch.float64)
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[1, -10:] = True
    out = attn(query, refs, value, SHAPES, mask)
    assert out.shape == (2, 5, 16)
    changed = value.clone()
    changed[1, -10:] += 100.0  # padded positions: must not matter
    torch.testing.assert_close(attn(query, refs, changed, SHAPES, mask), out)
    out.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())
