"""The row kernels of the cross entropy options (csrc/rows/ce_opts.h, ops
CE_OPTS_HARD / CE_OPTS_SOFT) called through the binding, against
fastxent.reference: per-row loss, lse, argmax and the gradient with per-row
factors, soft-capping and z-loss, hard and soft labels, in place; the vector
tanh of soft-capping (csrc/simd/tanhm.h) against float64 over dense sweeps;
the same bits for every ISA and thread count."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import AVAILABLE_ISAS, assert_bitwise_equal, assert_close, each_isa, grad_scale

from fastxent import _core, reference

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    BF16 = None

# The largest error of the vector tanh, in ulp of the result, over the
# sweeps below (measured: 1.47 ulp in float32, every float32 in [0, 12];
# 1.46 ulp in float64).
TANH_MAX_ULP = 2.0


def _run(x, labels=None, t=None, w=None, eps=0.0, softcap=0.0, z_loss=0.0, ce_scale=None,
         z_scale=None, inplace=False, num_threads=1, xdtype=-1):
    n, c = x.shape
    grad = None if ce_scale is None else (x if inplace else np.empty_like(x))
    lse, am = np.empty(n), np.empty(n, np.int64)
    kw = {} if grad is None else dict(out=grad, grad_output=ce_scale, zscale=z_scale)
    op = _core.CE_OPTS_HARD if t is None else _core.CE_OPTS_SOFT
    w_sum = float(c if w is None else np.sum(w, dtype=np.float64))
    ce = _core.run(op, x, labels=labels, ignore_index=-100, target=t, weight=w, w_sum=w_sum,
                   smoothing=eps, softcap=softcap, z_loss=z_loss, lse_out=lse, argmax_out=am,
                   reduction="none", num_threads=num_threads, xdtype=xdtype, **kw)
    return ce, lse, am, grad


def _labels(rng, n, c, soft, dtype, ignored):
    """(labels, None) with row ``ignored`` ignored, or (None, soft targets)."""
    if soft:
        t = rng.random((n, c)).astype(dtype)
        return None, t / t.sum(axis=1, keepdims=True)
    labels = rng.integers(0, c, n)
    labels[ignored] = -100
    return labels, None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(softcap=4.0),
    dict(z_loss=1e-2),
    dict(softcap=3.0, z_loss=1e-3, eps=0.1, weighted=True),
    dict(eps=0.2),
], ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("c", [37, 1500])
def test_rows_against_reference(dtype, soft, opts, inplace, c):
    rng = np.random.default_rng(len(str(opts)) + 7 * soft + c)
    n = 9
    x = (4 * rng.standard_normal((n, c))).astype(dtype)
    x[0, [3, 9]] = x[0].max() + 1  # a tie: the lowest index wins
    labels, t = _labels(rng, n, c, soft, dtype, 4)
    w = (rng.random(c) + 0.5).astype(dtype) if opts.get("weighted") else None
    eps, cap, z = opts.get("eps", 0.0), opts.get("softcap", 0.0), opts.get("z_loss", 0.0)
    ce_scale, z_scale = rng.random(n), rng.random(n)
    x64 = x.astype(np.float64)
    ce, lse, am, grad = _run(x.copy() if inplace else x, labels, t, w, eps, cap, z,
                             ce_scale, z_scale, inplace)
    kw = dict(weight=w, label_smoothing=eps, softcap=cap or None, reduction="none")
    y = t.astype(np.float64) if soft else labels
    # reduction "none" with grad_output = ce_scale gives the cross entropy
    # part's gradient; the z part is added with its own scale below.
    ref_ce = reference.cross_entropy(x64, y, **kw)
    _, ref_g = reference.cross_entropy_with_grad(x64, y, grad_output=ce_scale, **kw)
    ref_lse = reference.logsumexp(cap * np.tanh(x64 / cap) if cap else x64)
    counted = np.ones(n, bool) if soft else labels != -100
    if z:
        zc = cap * np.tanh(x64 / cap) if cap else x64
        dz = (1 - np.tanh(x64 / cap) ** 2) if cap else 1.0
        ref_g = ref_g + np.where(counted, 2 * z * ref_lse * z_scale, 0)[:, None] \
            * reference.softmax(zc) * dz
    assert_close(ce, ref_ce, dtype, ulps=32, rtol64=1e-12, what="ce")
    assert_close(lse, ref_lse, dtype, ulps=32, rtol64=1e-12, what="lse")
    np.testing.assert_array_equal(am, np.argmax(x, axis=1))
    assert am[0] == 3
    assert_close(grad, ref_g, dtype, ulps=64, scale=grad_scale(ref_g, 1e-30), rtol64=1e-11,
                 what="grad")
    if not soft:
        assert not grad[4].any()


def test_loss_only_leaves_no_gradient():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    ce, lse, am, grad = _run(x, labels=np.array([0, 1, 2]))
    assert grad is None
    np.testing.assert_allclose(lse, reference.logsumexp(x), rtol=1e-15)
    np.testing.assert_array_equal(am, [3, 3, 3])


@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_non_finite_rows(cap):
    # +inf, all -inf, NaN (argmax: the first NaN, as NumPy), -inf among finite.
    x = np.array([[0.0, np.inf, 1.0, np.inf],
                  [-np.inf, -np.inf, -np.inf, -np.inf],
                  [1.0, 5.0, np.nan, np.nan],
                  [-np.inf, 2.0, 3.0, 3.0]])
    labels = np.array([1, 0, 1, 2])
    g = np.ones(4)
    ce, lse, am, grad = _run(x.copy(), labels=labels, softcap=cap, z_loss=0.1, ce_scale=g,
                             z_scale=g)
    kw = dict(softcap=cap or None, reduction="none")
    with np.errstate(all="ignore"):
        ref_ce, ref_g = reference.cross_entropy_with_grad(x, labels, **kw)
        z = cap * np.tanh(x / cap) if cap else x
        m = np.max(z, axis=1)
        ref_lse = np.where(np.isfinite(m), reference.logsumexp(np.where(np.isnan(z), 0, z)), m)
        ref_lse = np.where(np.isnan(x).any(axis=1), np.nan, ref_lse)
    np.testing.assert_array_equal(am, np.argmax(x, axis=1))
    assert_close(lse, ref_lse, np.float64, rtol64=1e-12, what="lse")
    assert_close(ce, ref_ce, np.float64, rtol64=1e-12, what="ce")
    assert np.array_equal(np.isnan(grad), np.isnan(ref_g) | np.isnan(ref_ce)[:, None])


def _ulp_error(got, ref, dtype):
    ref = np.asarray(ref, np.float64)
    tiny = np.finfo(dtype).tiny
    ulp = np.spacing(np.maximum(np.abs(ref), tiny).astype(dtype)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / ulp


def test_tanh_accuracy_float32():
    # Every 7th float32 in [0, 12] (and the negatives: tanh is odd), the
    # 0.625 switch between its two forms densely, and the special values.
    lo, hi = np.float32(0).view(np.uint32), np.float32(12).view(np.uint32)
    x = np.arange(lo, hi, 7, dtype=np.uint32).view(np.float32)
    edge = np.float32(0.625).view(np.uint32)
    x = np.concatenate([x, np.arange(edge - 4096, edge + 4096, dtype=np.uint32).view(np.float32)])
    ref = np.tanh(x.astype(np.float64))
    results = []
    for isa in each_isa():
        y = _core.tanh(x)
        assert _ulp_error(y, ref, np.float32).max() <= TANH_MAX_ULP, isa
        assert_bitwise_equal(_core.tanh(-x), -y, isa)
        results.append(y)
        s = _core.tanh(np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 50.0, 1e-30], np.float32))
        assert s[0] == 1 and s[1] == -1 and np.isnan(s[2]) and s[5] == 1 and s[6] == np.float32(1e-30)
        assert np.signbit(s[3]) and not np.signbit(s[4])
    for y in results[1:]:
        assert_bitwise_equal(y, results[0], "ISAs")


def test_tanh_accuracy_float64():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(0, 20, 1_000_001), np.linspace(0.62, 0.63, 100_001),
                        np.exp(rng.uniform(-40, 3, 200_000))])
    # float64's own tanh is correctly rounded to within ~1 ulp: the reference
    # is tanh in long double where it is wider, which bounds ours better.
    ref = np.tanh(x.astype(np.longdouble))
    results = []
    for isa in each_isa():
        y = _core.tanh(x)
        err = np.abs(y.astype(np.longdouble) - ref) / np.spacing(np.abs(ref).astype(np.float64))
        assert float(err.max()) <= TANH_MAX_ULP, isa
        results.append(y)
    for y in results[1:]:
        assert_bitwise_equal(y, results[0], "ISAs")


def _dtypes():
    return [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_same_bits_every_isa_and_thread_count(dtype, soft):
    rng = np.random.default_rng(11)
    n, c = 23, 300
    x = (5 * rng.standard_normal((n, c))).astype(dtype)
    code = {2: 2 if np.dtype(dtype) == np.float16 else 3}.get(np.dtype(dtype).itemsize, -1)
    compute = np.float64 if dtype == np.float64 else np.float32
    labels, t = _labels(rng, n, c, soft, compute, 5)
    w = (rng.random(c) + 0.5).astype(compute)
    g = rng.random(n)
    results = []
    for isa in each_isa():
        for nt in (1, 2):
            out = _run(x, labels, t, w, 0.1, 3.0, 1e-3, g, g, num_threads=nt, xdtype=code)
            results.append((isa, nt, out))
    for isa, nt, res in results[1:]:
        for a, b in zip(res, results[0][2]):
            assert_bitwise_equal(a, b, f"{isa}, {nt} threads")
    assert len(results) == 2 * len(AVAILABLE_ISAS)
