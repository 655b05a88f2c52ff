"""fastxent.torch.linear_cross_entropy against torch.nn.functional.linear_cross_entropy:
loss and gradients w.r.t. input, weight and bias, incl. reduction="none"
with a per-row upstream gradient (Liger #968)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("threadpoolctl")
import fastxent.torch as fxt  # noqa: E402


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"weight": True}],
                         ids=["plain", "smoothing", "weight"])
def test_matches_torch(reduction, opts):
    g = torch.Generator().manual_seed(0)
    n, d, v = 29, 12, 70
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[::6] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5 if opts.get("weight") else None
    eps = opts.get("label_smoothing", 0.0)
    up = torch.randn(n, generator=g, dtype=torch.float64) if reduction == "none" else None
    results = []
    for fn in (torch.nn.functional.linear_cross_entropy, fxt.linear_cross_entropy):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        loss = fn(hh, ww, y, linear_bias=bb, weight=cw, reduction=reduction, ignore_index=-100,
                  label_smoothing=eps)
        loss.backward(up)
        results.append((loss.detach(), hh.grad, ww.grad, bb.grad))
    for a, c in zip(*results):
        np.testing.assert_allclose(c.numpy(), a.numpy(), rtol=1e-10, atol=1e-13)


def test_float32_and_no_grad():
    h = torch.randn(16, 8, dtype=torch.float32)
    w = torch.randn(30, 8, dtype=torch.float32)
    y = torch.randint(0, 30, (16,))
    with torch.no_grad():
        loss = fxt.linear_cross_entropy(h, w, y)
    ref = torch.nn.functional.linear_cross_entropy(h, w, y)
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)
