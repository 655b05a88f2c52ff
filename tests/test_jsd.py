"""jsd / jsd_with_grad: Liger's generalised JSD against fastxent.reference,
its limits (beta = 0, 1: the two KLs), Liger's gradient formula, finite
differences, the ignore mask, layouts, dtypes and threads."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_bitwise_equal,
    assert_close,
    batch_shape,
    compute_dtype,
    each_isa,
    grad_scale,
    make_layout,
    to_logical,
)

import fastxent
from fastxent import reference

try:
    import ml_dtypes

    DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    DTYPES = (np.float32, np.float64, np.float16)


def _teacher(rng, shape, kind, dtype):
    t = 2 * rng.standard_normal(shape)
    if kind == "log_probs":
        t = reference.log_softmax(t)
    elif kind == "probs":
        t = reference.softmax(t)
    return t.astype(dtype)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_against_reference(rng, beta, kind, reduction, dtype):
    x = (3 * rng.standard_normal((11, 13))).astype(dtype)
    t = _teacher(rng, (11, 13), kind, dtype)
    labels = rng.integers(0, 13, 11)
    labels[[2, 7]] = -100
    kw = dict(beta=beta, target_kind=kind, reduction=reduction, temperature=1.7, labels=labels)
    g = rng.standard_normal(11) if reduction == "none" else 1.3
    ref_loss, ref_grad = reference.jsd_with_grad(x, t, grad_output=g, **kw)
    loss, grad = fastxent.jsd_with_grad(x, t, grad_output=g, **kw)
    compute = compute_dtype(dtype)
    assert_close(loss, ref_loss, compute, ulps=64, rtol64=1e-11)
    if np.dtype(dtype).itemsize == 2:
        rel = 2.0**-7 if np.dtype(dtype).name == "bfloat16" else 2.0**-10
        assert np.max(np.abs(grad.astype(np.float64) - ref_grad)) <= rel * grad_scale(ref_grad, 0)
    else:
        assert_close(grad, ref_grad, compute, ulps=64, scale=grad_scale(ref_grad, 1e-30),
                     rtol64=1e-11)
    assert grad.dtype == np.dtype(dtype)
    assert_close(fastxent.jsd(x, t, **kw), ref_loss, compute, ulps=64, rtol64=1e-11)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "class_first", "axis1_3d", "readonly"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_layouts_and_threads(rng, layout, num_threads):
    bshape = batch_shape(layout, 12)
    xs = 2 * rng.standard_normal(bshape + (10,))
    ts = 2 * rng.standard_normal(bshape + (10,))
    x, axis = make_layout(xs.astype(np.float32), layout)
    t, _ = make_layout(ts.astype(np.float32), layout)
    loss, grad = fastxent.jsd_with_grad(x, t, axis=axis, beta=0.4, num_threads=num_threads)
    ref_loss, ref_grad = reference.jsd_with_grad(xs.astype(np.float32), ts.astype(np.float32),
                                                 beta=0.4)
    assert_close(loss, ref_loss, np.float32, ulps=64)
    assert_close(to_logical(grad, axis), ref_grad, np.float32, ulps=64,
                 scale=grad_scale(ref_grad, 1e-30))
    loss1, grad1 = fastxent.jsd_with_grad(x, t, axis=axis, beta=0.4, num_threads=1)
    assert_bitwise_equal(loss, loss1)
    assert_bitwise_equal(grad, grad1)


def test_limits_are_the_two_kls(rng):
    x = 2 * rng.standard_normal((6, 9))
    t = 2 * rng.standard_normal((6, 9))
    forward = fastxent.kl_div(x, t, target_kind="logits", temperature=2.0)
    np.testing.assert_allclose(fastxent.jsd(x, t, beta=0.0, temperature=2.0), forward, rtol=1e-12)
    # beta = 1: KL(student || teacher), the KL with the roles swapped.
    reverse = fastxent.kl_div(t, x, target_kind="logits", temperature=2.0)
    np.testing.assert_allclose(fastxent.jsd(x, t, beta=1.0, temperature=2.0), reverse, rtol=1e-12)
    # beta = 1/2: the symmetric Jensen-Shannon divergence, at most ln 2.
    p, q = reference.softmax(t), reference.softmax(x)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m) + q * np.log(q / m), axis=1)
    np.testing.assert_allclose(fastxent.jsd(x, t, reduction="none"), js, rtol=1e-12)
    assert np.all(js <= np.log(2))


def test_gradient_is_liger_formula(rng):
    # Liger's dX = beta * Q * (X - log M) is the gradient w.r.t. the student's
    # log-probabilities X; through the log-softmax it becomes dX - Q * sum(dX).
    x = 2 * rng.standard_normal((5, 7))
    t = 2 * rng.standard_normal((5, 7))
    beta = 0.35
    _, grad = fastxent.jsd_with_grad(x, t, beta=beta, reduction="sum")
    X = reference.log_softmax(x)
    Q, P = np.exp(X), reference.softmax(t)
    dX = beta * Q * (X - np.log(beta * Q + (1 - beta) * P))
    np.testing.assert_allclose(grad, dX - Q * dX.sum(axis=1, keepdims=True), rtol=1e-10,
                               atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_finite_differences(rng, beta):
    x = 2 * rng.standard_normal((4, 5))
    t = 2 * rng.standard_normal((4, 5))
    labels = np.array([1, -100, 3, 0])
    kw = dict(beta=beta, temperature=1.5, labels=labels)
    _, grad = fastxent.jsd_with_grad(x, t, **kw)
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += 1e-6
        xm[i] -= 1e-6
        fd[i] = (float(fastxent.jsd(xp, t, **kw)) - float(fastxent.jsd(xm, t, **kw))) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert not grad[1].any()  # the ignored row


def test_ignore_mask_denominator(rng):
    x = rng.standard_normal((6, 4))
    t = rng.standard_normal((6, 4))
    labels = np.array([0, -100, 1, -100, 2, 3])
    rows = fastxent.jsd(x, t, reduction="none")
    np.testing.assert_allclose(fastxent.jsd(x, t, labels=labels), rows[labels != -100].mean(),
                               rtol=1e-12)
    assert np.isnan(fastxent.jsd(x, t, labels=np.full(6, -100)))


def test_errors_leave_out_untouched(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    t = rng.standard_normal((3, 4)).astype(np.float32)
    cases = [
        (dict(beta=1.5), "beta must be in \\[0, 1\\], got 1.5"),
        (dict(beta=-0.1), "beta must be in \\[0, 1\\], got -0.1"),
        (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
        (dict(target_kind="prob"), "target_kind must be one of"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(labels=np.zeros(2, np.int64)), "labels must have the batch shape"),
    ]
    for kw, match in cases:
        out = np.full_like(x, 7.0)
        with pytest.raises(ValueError, match=match):
            fastxent.jsd_with_grad(x, t, out=out, **kw)
        assert (out == 7.0).all()
    with pytest.raises(ValueError, match="teacher_logits must have the shape"):
        fastxent.jsd(x, t[:2])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("layout", ["strided", "class_first"])
def test_every_isa_and_thread_count(rng, dtype, kind, layout):
    bshape = batch_shape(layout, 17)
    xs = (3 * rng.standard_normal(bshape + (50,))).astype(dtype)
    ts = _teacher(rng, bshape + (50,), kind, dtype)
    x, axis = make_layout(xs, layout)
    t, _ = make_layout(ts, layout)
    labels = rng.integers(0, 50, bshape)
    labels[3] = -100
    kw = dict(beta=0.3, temperature=1.5, target_kind=kind, labels=labels, axis=axis)
    results = []
    for isa in each_isa():
        for nt in (1, 2):
            results.append((isa, nt, fastxent.jsd_with_grad(x, t, num_threads=nt, **kw)))
    for isa, nt, (loss, grad) in results[1:]:
        assert_bitwise_equal(loss, results[0][2][0], f"{isa}, {nt} threads")
        assert_bitwise_equal(grad, results[0][2][1], f"{isa}, {nt} threads")
    loss, grad = results[0][2]
    ref_loss, ref_grad = reference.jsd_with_grad(xs, ts, **dict(kw, axis=-1))
    compute = compute_dtype(dtype)
    assert_close(loss, ref_loss, compute, ulps=64, rtol64=1e-11)
    scale = grad_scale(ref_grad, 0)
    if np.dtype(dtype).itemsize == 2:
        rel = 2.0**-7 if np.dtype(dtype).name == "bfloat16" else 2.0**-10
        assert np.max(np.abs(to_logical(grad, axis).astype(np.float64) - ref_grad)) <= rel * scale
    else:
        assert_close(to_logical(grad, axis), ref_grad, compute, ulps=64, scale=scale,
                     rtol64=1e-11)


def test_out_and_in_place(rng):
    x = (3 * rng.standard_normal((9, 200))).astype(np.float32)
    t = (3 * rng.standard_normal((9, 200))).astype(np.float32)
    loss, grad = fastxent.jsd_with_grad(x, t, beta=0.4)
    out = np.full_like(x, 7.0)
    assert_bitwise_equal(fastxent.jsd_with_grad(x, t, beta=0.4, out=out)[1], grad, "out=")
    xin = x.copy()
    res = fastxent.jsd_with_grad(xin, t, beta=0.4, out=xin)
    assert res[1] is xin
    assert_bitwise_equal(xin, grad, "in place")
    assert_bitwise_equal(res[0], loss, "loss")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["probs", "logits", "log_probs"])
def test_nan_teacher_gives_nan_gradient(isa, kind, dtype):
    """A NaN in the teacher makes the mixture NaN: loss and gradient are NaN
    on every ISA, in the lanewise and the scalar paths alike (no floor may
    turn a NaN mixture into a finite log)."""
    x = np.array([[0.1, 0.2, 0.3] + [0.05] * 37], dtype)
    t = np.full_like(x, 0.025 if kind == "probs" else 0.5)
    t[0, 2] = np.nan
    loss, grad = fastxent.jsd_with_grad(x, t, beta=0.5, target_kind=kind)
    assert np.isnan(loss)
    assert np.isnan(grad[0, 2])
