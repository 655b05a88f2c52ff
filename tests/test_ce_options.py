"""The language-model options of cross_entropy: z_loss, softcap,
sample_weight, n_valid, return_stats.  Against fastxent.reference over
dtypes x layouts x threads x ISAs, finite differences, Liger's formulas,
scikit-learn's log_loss and torch."""
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
    random_soft_labels,
    to_logical,
)

import fastxent
from fastxent import reference

try:
    import ml_dtypes

    DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    DTYPES = (np.float32, np.float64, np.float16)

OPTIONS = [
    {"z_loss": 1e-2},
    {"softcap": 5.0},
    {"softcap": 3.0, "z_loss": 1e-3, "label_smoothing": 0.1},
    {"sample_weight": True},
    {"sample_weight": True, "weight": True},
    {"n_valid": 9.0},
    {"z_loss": 1e-2, "sample_weight": True, "weight": True, "reduction": "sum"},
    {"softcap": 2.0, "reduction": "none"},
    {"z_loss": 1e-4, "base": 2.0},
]


def ce(logits, labels, **kw):
    return fastxent.cross_entropy(logits, labels, **kw)


def ce_grad(logits, labels, **kw):
    return fastxent.cross_entropy_with_grad(logits, labels, **kw)


def _kw(opts, rng, bshape, c):
    kw = dict(opts)
    if kw.get("sample_weight") is True:
        kw["sample_weight"] = rng.random(bshape) * 2
    if kw.get("weight") is True:
        kw["weight"] = rng.random(c) + 0.5
    return kw


def _labels(rng, bshape, c, soft, dtype):
    if soft:
        return random_soft_labels(rng, bshape + (c,), np.float64).astype(dtype)
    y = rng.integers(0, c, bshape)
    y.reshape(-1)[::4] = -100
    return y


def _check_against_reference(logits, axis, labels, kw, compute, grad_output=1.0, what=""):
    soft_labels = labels
    if labels.dtype.kind == "f" or labels.dtype.name == "bfloat16":
        soft_labels = np.moveaxis(to_logical(labels, -1), -1, axis)
    ref_loss, ref_grad = reference.cross_entropy_with_grad(
        logits.astype(np.float64), soft_labels, axis=axis, grad_output=grad_output, **kw)
    loss, grad = ce_grad(logits, soft_labels, axis=axis, grad_output=grad_output, **kw)
    ulps = 64 if compute == np.float32 else 8
    assert_close(loss, ref_loss, compute, ulps=ulps, rtol64=1e-11, what=f"{what} loss")
    if logits.dtype.itemsize == 2:
        rel = 2.0**-7 if logits.dtype.name == "bfloat16" else 2.0**-10
        s = grad_scale(ref_grad, 0)
        assert np.max(np.abs(grad.astype(np.float64) - ref_grad)) <= rel * s, what
    else:
        assert_close(grad, ref_grad, compute, ulps=ulps, scale=grad_scale(ref_grad, 1e-30),
                     rtol64=1e-11, what=f"{what} grad")
    assert grad.dtype == logits.dtype
    return loss, grad


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "class_first", "axis1_3d"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_against_reference(rng, opts, dtype, layout, soft):
    c = 9
    bshape = batch_shape(layout, 13)
    logical = (3 * rng.standard_normal(bshape + (c,))).astype(dtype)
    if layout == "axis1_3d":
        logical = logical.reshape(bshape + (c,))
    logits, axis = make_layout(logical, layout)
    labels = _labels(rng, bshape, c, soft, dtype)
    kw = _kw(opts, rng, bshape, c)
    g = rng.standard_normal(bshape) if kw.get("reduction") == "none" else 0.75
    _check_against_reference(logits, axis, labels, kw, compute_dtype(dtype), g, str(opts))


@pytest.mark.parametrize("c", [1, 17, 1000])
def test_wide_rows_threads_and_isas(rng, c, isa):
    x = (4 * rng.standard_normal((19, c))).astype(np.float32)
    y = rng.integers(0, c, 19)
    kw = dict(z_loss=1e-3, softcap=6.0, sample_weight=rng.random(19), return_stats=True)
    results = [ce_grad(x, y, num_threads=nt, **kw) for nt in (1, 2)]
    for a, b in zip(results[0][:2], results[1][:2]):
        assert_bitwise_equal(a, b, "threads")
    _check_against_reference(x, -1, y, {k: v for k, v in kw.items() if k != "return_stats"},
                             np.float32, what=isa)


def test_finite_differences(rng):
    x = 2 * rng.standard_normal((5, 6))
    y = np.array([0, 5, -100, 2, 3])
    for kw in (dict(z_loss=0.1, softcap=2.5, sample_weight=rng.random(5), weight=rng.random(6)),
               dict(z_loss=0.05, n_valid=3.0, label_smoothing=0.2)):
        _, grad = ce_grad(x, y, **kw)
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += 1e-6
            xm[i] -= 1e-6
            fd[i] = (float(ce(xp, y, **kw)) - float(ce(xm, y, **kw))) / 2e-6
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_z_loss_gradient_is_liger_formula(rng):
    # d/dx z * lse(x)**2 = 2 * z * lse * softmax(x) (Liger's lse_square_scale),
    # here for a sum, so the mean's denominator does not enter.
    x = 3 * rng.standard_normal((7, 11))
    y = rng.integers(0, 11, 7)
    z = 0.03
    _, g0 = ce_grad(x, y, reduction="sum")
    _, gz = ce_grad(x, y, reduction="sum", z_loss=z)
    lse = reference.logsumexp(x)
    np.testing.assert_allclose(gz - g0, 2 * z * lse[:, None] * reference.softmax(x),
                               rtol=1e-10, atol=1e-14)


def test_softcap_is_chain_rule(rng):
    x = 10 * rng.standard_normal((6, 8))
    y = rng.integers(0, 8, 6)
    cap = 7.0
    capped = cap * np.tanh(x / cap)
    loss, g = ce_grad(x, y, softcap=cap)
    loss0, g0 = ce_grad(capped, y)
    np.testing.assert_allclose(loss, loss0, rtol=1e-12)
    np.testing.assert_allclose(g, g0 * (1 - np.tanh(x / cap) ** 2), rtol=1e-10, atol=1e-15)


def test_z_loss_with_weights_matches_liger(rng):
    # Liger: class-weighted CE mean plus an unweighted z-loss mean over the
    # non-ignored rows.
    torch = pytest.importorskip("torch")
    x = 2 * rng.standard_normal((10, 5))
    y = rng.integers(0, 5, 10)
    y[[1, 4]] = -100
    w = rng.random(5) + 0.5
    z = 0.02
    ce_mean = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(y),
                                                weight=torch.tensor(w)).item()
    lse = reference.logsumexp(x)
    expected = ce_mean + z * np.mean(lse[y != -100] ** 2)
    np.testing.assert_allclose(ce(x, y, weight=w, z_loss=z), expected, rtol=1e-12)


def test_sample_weight_is_log_loss(rng):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    x = 2 * rng.standard_normal((30, 4))
    y = rng.integers(0, 4, 30)
    sw = rng.random(30)
    p = reference.softmax(x)
    expected = sklearn_metrics.log_loss(y, p, sample_weight=sw, labels=np.arange(4))
    np.testing.assert_allclose(ce(x, y, sample_weight=sw), expected, rtol=1e-10)


def test_n_valid_makes_micro_batches_add_up(rng):
    x = 2 * rng.standard_normal((24, 7)).astype(np.float64)
    y = rng.integers(0, 7, 24)
    y[::5] = -100
    n_valid = int(np.count_nonzero(y != -100))
    full_loss, full_grad = ce_grad(x, y, z_loss=1e-2)
    parts = [ce_grad(x[s], y[s], z_loss=1e-2, n_valid=n_valid) for s in (slice(0, 10), slice(10, 24))]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full_loss, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([parts[0][1], parts[1][1]]), full_grad,
                               rtol=1e-12, atol=1e-16)


def test_stats(rng):
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0], [0.0, 1.0, 5.0], [9.0, 9.0, 9.0]])
    y = np.array([1, 2, 2, -100])
    loss, stats = ce(x, y, return_stats=True, z_loss=0.1)
    np.testing.assert_array_equal(stats.argmax, [1, 0, 2, 0])  # ties: the lowest index
    np.testing.assert_allclose(stats.accuracy, 2 / 3)
    lse = reference.logsumexp(x)
    np.testing.assert_allclose(stats.lse, lse[:3].mean(), rtol=1e-12)
    np.testing.assert_allclose(stats.z_loss, 0.1 * np.mean(lse[:3] ** 2), rtol=1e-12)
    np.testing.assert_allclose(loss - stats.z_loss, ce(x, y), rtol=1e-12)
    _, _, rows = ce_grad(x, y, reduction="none", return_stats=True)
    np.testing.assert_allclose(rows.lse, lse, rtol=1e-12)
    np.testing.assert_array_equal(rows.accuracy, [1.0, 0.0, 1.0, np.nan])
    ref = reference.cross_entropy(x, y, reduction="none", return_stats=True)[1]
    np.testing.assert_array_equal(rows.argmax, ref.argmax)


def test_defaults_unchanged(rng):
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    a = fastxent.cross_entropy_with_grad(x, y)
    b = ce_grad(x, y, z_loss=0.0, softcap=None, sample_weight=None, n_valid=None)
    assert_bitwise_equal(a[0], b[0])
    assert_bitwise_equal(a[1], b[1])


def test_errors_leave_out_untouched(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    cases = [
        (dict(softcap=0.0), "softcap must be a positive finite number, got 0.0"),
        (dict(softcap=-2), "softcap must be a positive finite number, got -2"),
        (dict(z_loss=-1e-3), "z_loss must be a finite number >= 0, got -0.001"),
        (dict(z_loss=float("nan")), "z_loss"),
        (dict(sample_weight=np.array([1.0, -1.0, 1.0, 1.0])), r"sample_weight .*\(1,\) is -1.0"),
        (dict(sample_weight=np.array([1.0, 1.0, np.nan, 1.0])), "sample_weight"),
        (dict(sample_weight=np.ones(3)), "batch shape"),
        (dict(n_valid=-1), "n_valid must be a positive finite number, got -1"),
        (dict(n_valid=2, reduction="none"), "n_valid is the denominator"),
        (dict(z_loss=0.1, from_logits=False), "need from_logits=True"),
    ]
    for kw, match in cases:
        out = np.full_like(x, 7.0)
        with pytest.raises(ValueError, match=match):
            ce_grad(x, y, out=out, **kw)
        assert (out == 7.0).all(), kw


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "class_first"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_every_isa_and_thread_count(rng, dtype, layout, soft):
    # The fused kernel (soft-capping, z-loss, statistics) gives the same bits
    # for every ISA and thread count, in every dtype and layout, and matches
    # the reference, statistics included.
    c = 40
    bshape = batch_shape(layout, 21)
    logits, axis = make_layout((4 * rng.standard_normal(bshape + (c,))).astype(dtype), layout)
    labels = _labels(rng, bshape, c, soft, dtype)
    if soft:
        labels = np.moveaxis(labels, -1, axis)
    kw = dict(z_loss=1e-3, softcap=5.0, label_smoothing=0.05, weight=rng.random(c) + 0.5,
              sample_weight=rng.random(bshape), return_stats=True, axis=axis)
    results = []
    for isa in each_isa():
        for nt in (1, 2):
            results.append((isa, nt, ce_grad(logits, labels, num_threads=nt, **kw)))
    for isa, nt, res in results[1:]:
        for a, b in zip(res[:2] + tuple(res[2]), results[0][2][:2] + tuple(results[0][2][2])):
            assert_bitwise_equal(a, b, f"{isa}, {nt} threads")
    loss, grad, stats = results[0][2]
    ref_loss, ref_grad, ref_stats = reference.cross_entropy_with_grad(
        logits.astype(np.float64), labels, **kw)
    compute = compute_dtype(dtype)
    assert_close(loss, ref_loss, compute, ulps=64, rtol64=1e-11, what="loss")
    scale = grad_scale(ref_grad, 0)
    if np.dtype(dtype).itemsize == 2:
        rel = 2.0**-7 if np.dtype(dtype).name == "bfloat16" else 2.0**-10
        assert np.max(np.abs(grad.astype(np.float64) - ref_grad)) <= rel * scale
    else:
        assert_close(grad, ref_grad, compute, ulps=64, scale=scale, rtol64=1e-11, what="grad")
    assert_close(stats.lse, ref_stats.lse, compute, ulps=64, rtol64=1e-11, what="lse")
    assert_close(stats.z_loss, ref_stats.z_loss, compute, ulps=64, rtol64=1e-11, what="z_loss")
    np.testing.assert_array_equal(stats.argmax, ref_stats.argmax)
    assert_close(stats.accuracy, ref_stats.accuracy, compute, ulps=8, what="accuracy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_and_in_place(rng, dtype):
    # out= given, and out=logits in place (soft-capping recomputes tanh from
    # the logits it overwrites): the same bits as a fresh gradient.
    x = (4 * rng.standard_normal((12, 300))).astype(dtype)
    y = rng.integers(0, 300, 12)
    for kw in (dict(softcap=5.0, z_loss=1e-2), dict(z_loss=1e-2, return_stats=True)):
        fresh = ce_grad(x, y, **kw)
        out = np.full_like(x, 7.0)
        assert_bitwise_equal(ce_grad(x, y, out=out, **kw)[1], fresh[1], "out=")
        xin = x.copy()
        res = ce_grad(xin, y, out=xin, **kw)
        assert res[1] is xin
        assert_bitwise_equal(xin, fresh[1], "in place")
        assert_bitwise_equal(res[0], fresh[0], "loss in place")
