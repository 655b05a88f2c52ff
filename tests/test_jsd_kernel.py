"""The row kernels of jsd (csrc/rows/jsd.h, ops JSD_PROBS / JSD_LOG_PROBS /
JSD_LOGITS) called through the binding, against fastxent.reference, in place
and not, and with the same bits for every ISA and thread count."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import AVAILABLE_ISAS, assert_bitwise_equal, assert_close, each_isa, grad_scale

from fastxent import _core, reference

OPS = {"logits": _core.JSD_LOGITS, "log_probs": _core.JSD_LOG_PROBS, "probs": _core.JSD_PROBS}


def _teacher(rng, shape, kind, dtype):
    t = 3 * rng.standard_normal(shape)
    t = {"logits": t, "log_probs": reference.log_softmax(t), "probs": reference.softmax(t)}[kind]
    return t.astype(dtype)


def _run(x, t, kind, beta, T, labels, gscale, grad, num_threads=1, xdtype=-1):
    kw = {} if grad is None else dict(out=grad, grad_output=gscale)
    return _core.run(OPS[kind], x, target=t, labels=labels, ignore_index=-100, beta=beta,
                     temperature=T, reduction="none", num_threads=num_threads, xdtype=xdtype,
                     **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("c", [29, 1500])
def test_rows_against_reference(dtype, kind, beta, inplace, c):
    rng = np.random.default_rng(3 + c)
    n, T = 7, 1.6
    x = (3 * rng.standard_normal((n, c))).astype(dtype)
    t = _teacher(rng, (n, c), kind, dtype)
    if kind == "probs":
        t[1, :5] = 0  # 0 log 0 = 0
    labels = rng.integers(0, c, n)
    labels[2] = -100
    gscale = rng.random(n)
    kw = dict(beta=beta, temperature=T, target_kind=kind, labels=labels, reduction="none")
    ref_rows = reference.jsd(x, t, **kw)
    _, ref_g = reference.jsd_with_grad(x, t, grad_output=gscale, **kw)
    xin = x.copy()
    grad = xin if inplace else np.empty_like(x)
    loss = _run(xin, t, kind, beta, T, labels, gscale, grad)
    assert_close(loss, ref_rows, dtype, ulps=64, rtol64=1e-11, what="loss")
    assert_close(grad, ref_g, dtype, ulps=64, scale=grad_scale(ref_g, 1e-30), rtol64=1e-11,
                 what="grad")
    assert not grad[2].any()
    if not inplace:  # in place gives the same bits
        xin2 = x.copy()
        _run(xin2, t, kind, beta, T, labels, gscale, xin2)
        assert_bitwise_equal(xin2, grad, "in place")
    assert_bitwise_equal(_run(x, t, kind, beta, T, labels, None, None), loss, "loss alone")


def test_non_finite_rows():
    x = np.array([[0.0, np.inf, 1.0], [-np.inf, -np.inf, -np.inf], [1.0, np.nan, 0.0],
                  [-np.inf, 1.0, 2.0]])
    t = np.array([[0.0, 1.0, 2.0]] * 4)
    for beta in (0.0, 0.5, 1.0):
        g = np.ones(4)
        grad = np.empty_like(x)
        loss = _run(x, t, "logits", beta, 1.0, None, g, grad)
        with np.errstate(all="ignore"):
            ref, ref_g = reference.jsd_with_grad(x, t, beta=beta, reduction="none",
                                                 grad_output=g)
        assert_close(loss, ref, np.float64, rtol64=1e-12, what=f"loss beta={beta}")
        assert np.array_equal(np.isnan(grad[:3]), np.isnan(ref_g[:3])), beta
        # A student logit of -inf has Q = 0: its dX is 0 for every beta (the
        # reference forms 0 * -inf at beta = 1 and gives NaN), and the row's
        # gradient is finite and sums to 0.
        assert np.isfinite(grad[3]).all() and abs(grad[3].sum()) < 1e-15, beta


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_same_bits_every_isa_and_thread_count(kind, dtype):
    if dtype == "bfloat16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype(dtype)
    code = -1 if dt.itemsize > 2 else (2 if dt == np.float16 else 3)
    compute = np.float64 if dt == np.float64 else np.float32
    rng = np.random.default_rng(5)
    n, c = 21, 300
    x = (3 * rng.standard_normal((n, c))).astype(dt)
    t = _teacher(rng, (n, c), kind, compute)
    labels = rng.integers(0, c, n)
    labels[3] = -100
    g = rng.random(n)
    results = []
    for isa in each_isa():
        for nt in (1, 2):
            grad = np.empty_like(x)
            loss = _run(x, t, kind, 0.3, 2.0, labels, g, grad, nt, code)
            results.append((isa, nt, loss, grad))
    for isa, nt, loss, grad in results[1:]:
        assert_bitwise_equal(loss, results[0][2], f"{isa}, {nt} threads")
        assert_bitwise_equal(grad, results[0][3], f"{isa}, {nt} threads")
    assert len(results) == 2 * len(AVAILABLE_ISAS)
