"""Property tests: every public function against ``fastxent.reference``.

Hypothesis draws shapes (1 to 3 dimensions, zero-size batches included),
the class axis, the memory layout of every array argument (C or permuted
memory order, steps of 1, 2, 3 and negative steps on each axis, read-only
views, with NaN in the gaps so that a stray read shows), the dtype
(float16, float32, float64, and bfloat16 where ml_dtypes is installed), the
values (moderate, large, shared offsets of 1e4 or 1e30, constant rows, ties,
and in dedicated tests NaN and +-inf) and every option, and compares the
result with the float64 reference computed from the same (rounded) inputs.

Tolerances (API.md): a float32-computed result within a few float32 ulp of
``max(|ref|, 1)`` (losses, logsumexp, log_softmax, entropy), per element
relative for probabilities, and relative to the largest gradient for
gradients; float64 within ~1e-12 relative.  Results stored in a 16-bit dtype
(gradients, softmax and log_softmax of float16 inputs) get that dtype's
rounding on top.

Profiles: ``FASTXENT_HYPOTHESIS_PROFILE=ci`` (the default, 60 examples per
test) or ``long`` (5000 examples per test).

kl_div and binary_cross_entropy are covered when the package has them.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastxent  # noqa: E402
from fastxent import reference as ref  # noqa: E402

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=False, print_blob=True)
settings.register_profile("ci", max_examples=60, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
_PROFILE = os.environ.get("FASTXENT_HYPOTHESIS_PROFILE", "ci")
# Applied per test (not with settings.load_profile) so that this module does
# not change the settings of other test modules.
PROFILE = settings.get_profile(_PROFILE)


EPS32 = 2.0**-23
EPS16 = 2.0**-10
EPSBF16 = 2.0**-7
RTOL64 = 1e-12

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
if ml_dtypes is not None:
    DTYPES.append(np.dtype(ml_dtypes.bfloat16))


def compute_dtype(dt):
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def store_eps(dt):
    """Relative rounding of a result stored in dtype ``dt`` (0 for float32/64)."""
    dt = np.dtype(dt)
    if dt == np.float16:
        return EPS16
    if dt.name == "bfloat16":
        return EPSBF16
    return 0.0


def store_tiny(dt):
    """Absolute rounding of tiny results stored in ``dt`` (subnormal spacing)."""
    dt = np.dtype(dt)
    if dt == np.float16:
        return 2.0**-24
    if dt.name == "bfloat16":
        return 2.0**-133
    if dt == np.float32:
        return 2.0**-149
    return 0.0


def max_abs_for(dt):
    dt = np.dtype(dt)
    if dt == np.float16:
        return 1e4  # keeps differences of two logits (and their log_softmax) finite
    return math.inf


# ------------------------------------------------------------------ strategies

@st.composite
def shapes(draw, min_dims=1, max_dims=3, allow_empty_batch=True, max_c=40):
    ndim = draw(st.integers(min_dims, max_dims))
    dims = [draw(st.integers(1, 6)) for _ in range(ndim)]
    axis = draw(st.integers(-ndim, ndim - 1))
    dims[axis] = draw(st.one_of(st.integers(1, 9), st.integers(1, max_c)))
    if allow_empty_batch and ndim > 1 and draw(st.integers(0, 14)) == 0:
        others = [i for i in range(ndim) if i != axis % ndim]
        dims[draw(st.sampled_from(others))] = 0
    return tuple(dims), axis


@st.composite
def layouts(draw, ndim):
    """(memory order permutation, step per axis, readonly) of a view."""
    perm = draw(st.permutations(range(ndim))) if ndim > 1 and draw(st.booleans()) else list(range(ndim))
    steps = [draw(st.sampled_from([1, 1, 1, 2, -1, -2, 3])) for _ in range(ndim)]
    readonly = draw(st.integers(0, 5)) == 0
    return tuple(perm), tuple(steps), readonly


def lay_out(a, lay, fill=np.nan):
    """A view with the contents of ``a`` (C-ordered) in the layout ``lay``: the
    buffer is allocated in the memory order ``perm``, the view takes every
    ``step``-th element (negative steps run backwards), the gaps hold NaN."""
    perm, steps, readonly = lay
    a = np.asarray(a)
    if a.ndim == 0:
        return a.copy()
    full = [abs(s) * n + 1 for s, n in zip(steps, a.shape)]
    buf_perm = np.empty([full[p] for p in perm], dtype=a.dtype)
    try:
        buf_perm[...] = fill
    except (TypeError, ValueError):
        buf_perm[...] = 0
    buf = np.transpose(buf_perm, np.argsort(perm))
    idx = []
    for s, n in zip(steps, a.shape):
        if s > 0:
            idx.append(slice(1, 1 + s * n, s) if n else slice(0, 0))
        else:
            idx.append(slice(abs(s) * n - 1, None, s) if n else slice(0, 0))
    view = buf[tuple(idx)]
    assert view.shape == a.shape, (view.shape, a.shape)
    view[...] = a
    if readonly:
        view.flags.writeable = False
    return view


@st.composite
def values(draw, shape, dtype, specials=False):
    """Float64 values (already representable in ``dtype``) for logits."""
    size = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lim = max_abs_for(dtype)
    mode = draw(st.sampled_from(["normal", "normal", "wide", "offset", "constant", "ties", "tiny"]))
    if mode == "normal":
        v = rng.standard_normal(size) * draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    elif mode == "wide":
        v = rng.standard_normal(size) * (30.0 if lim < 1e5 else 100.0)
    elif mode == "offset":
        offsets = [1e4, -1e4, 1e3] if lim < 1e5 else [1e4, -1e4, 1e6, 1e30, -1e30]
        v = rng.standard_normal(size) * 3.0 + draw(st.sampled_from(offsets))
    elif mode == "constant":
        c = draw(st.sampled_from([0.0, 1.0, -5.0, 1e4] + ([1e30, -1e30, 1e300] if lim > 1e5 else [])))
        v = np.full(size, c)
    elif mode == "ties":
        v = rng.integers(-3, 4, size).astype(np.float64)
    else:
        v = rng.standard_normal(size) * 1e-6
    v = np.clip(v, -lim, lim)
    if np.dtype(dtype) == np.float32 or np.dtype(dtype) == np.float16 or np.dtype(dtype).name == "bfloat16":
        v = np.clip(v, -3e38, 3e38)
    if specials and size:
        n_special = draw(st.integers(1, 4))
        for _ in range(n_special):
            i = draw(st.integers(0, size - 1))
            v[i] = draw(st.sampled_from([-math.inf, -math.inf, math.inf, math.nan]))
    v = v.astype(dtype).astype(np.float64)
    return v.reshape(shape)


@st.composite
def probabilities(draw, shape, dtype, zeros=True, normalised=None):
    """Rows (last axis) of probabilities in [0, 1], some exactly 0."""
    size = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = rng.random(size).reshape(shape) + 1e-3
    if zeros and size and draw(st.booleans()):
        p.reshape(-1)[rng.random(size) < 0.2] = 0.0
    if normalised is None:
        normalised = draw(st.integers(0, 3)) > 0
    if normalised and p.ndim:
        s = p.sum(axis=-1, keepdims=True)
        p = np.where(s > 0, p / np.where(s > 0, s, 1), 0.0)
    return np.asarray(p).astype(dtype).astype(np.float64)


def threads():
    return st.sampled_from([None, 1, 2, 3])


def bases():
    return st.sampled_from([None, None, None, 2, 10, 0.5, math.e])


def in_dtype(v64, dtype):
    return np.asarray(v64).astype(dtype)


# ------------------------------------------------------------------ assertions

def _nan_inf_match(g, r, what):
    gn, rn = np.isnan(g), np.isnan(r)
    if not np.array_equal(gn, rn):
        i = np.flatnonzero((gn != rn).reshape(-1))[0]
        raise AssertionError(f"{what}: NaN mismatch at flat index {i}: got {g.reshape(-1)[i]!r}, "
                             f"ref {r.reshape(-1)[i]!r}")
    ri = np.isinf(r)
    gi = np.isinf(g)
    if not np.array_equal(gi, ri) or not np.array_equal(g[ri], r[ri]):
        i = np.flatnonzero((gi != ri).reshape(-1) | ((g != r) & ri).reshape(-1))[0]
        raise AssertionError(f"{what}: inf mismatch at flat index {i}: got {g.reshape(-1)[i]!r}, "
                             f"ref {r.reshape(-1)[i]!r}")


def assert_close(got, want, compute, *, store=None, ulps=8, scale=1.0, what=""):
    """|got - want| <= tol * max(|want|, scale) elementwise (+ storage rounding)."""
    got_dtype = np.asarray(got).dtype
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(want, dtype=np.float64)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    if got_dtype != np.float64:
        # beyond the range of the result's dtype the right answer is +-inf
        with np.errstate(over="ignore", invalid="ignore"):
            overflow = np.isfinite(r) & ~np.isfinite(r.astype(got_dtype).astype(np.float64))
        r = np.where(overflow, np.copysign(np.inf, r), r)
    _nan_inf_match(g, r, what)
    tol = ulps * EPS32 if np.dtype(compute) == np.float32 else RTOL64
    mag = np.maximum(np.abs(np.where(np.isfinite(r), r, 0.0)), scale)
    bound = tol * mag
    if store is not None:
        bound = bound + store_eps(store) * mag + store_tiny(store)
    finite = np.isfinite(r)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if bad.any():
        i = int(np.argmax(np.where(finite, err / np.where(bound > 0, bound, 1e-300), 0)))
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} out of tolerance; worst at "
                             f"flat index {i}: got {g.reshape(-1)[i]!r}, ref {r.reshape(-1)[i]!r}, "
                             f"bound {bound.reshape(-1)[i]:.3g}")


def assert_probs_close(got, want, compute, *, store=None, what=""):
    """Probabilities: relative per element; exp(x - lse) carries ~|log p| ulp."""
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(want, dtype=np.float64)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    _nan_inf_match(g, r, what)
    with np.errstate(divide="ignore", invalid="ignore"):
        logr = np.where(r > 0, np.abs(np.log(np.where(r > 0, r, 1.0))), 0.0)
    if np.dtype(compute) == np.float32:
        bound = EPS32 * (8 + 2 * logr) * np.abs(r) + 2.0**-125
    else:
        bound = RTOL64 * (1 + logr) * np.abs(r) + 1e-300
    if store is not None:
        bound = bound + store_eps(store) * np.abs(r) + store_tiny(store)
    finite = np.isfinite(r)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if bad.any():
        i = int(np.argmax(np.where(finite, err / bound, 0)))
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} out of tolerance; worst at "
                             f"flat index {i}: got {g.reshape(-1)[i]!r}, ref {r.reshape(-1)[i]!r}")


def grad_floor(ref_grad):
    r = np.asarray(ref_grad, dtype=np.float64)
    f = r[np.isfinite(r)]
    return max(float(np.max(np.abs(f))) if f.size else 0.0, 1e-300)


def check_loss(got, want, compute, reduction, what, ulps=8, scale=1.0):
    if reduction == "none":
        assert isinstance(got, (np.ndarray, np.generic)), f"{what}: {type(got)}"
        assert np.asarray(got).dtype == compute, f"{what}: dtype {np.asarray(got).dtype} != {compute}"
    else:
        assert isinstance(got, np.generic) and got.dtype == compute, \
            f"{what}: {type(got).__name__} of dtype {getattr(got, 'dtype', None)}, expected a {compute} scalar"
    assert_close(got, want, compute, ulps=ulps, scale=scale, what=what)


def check_grad(got, want, dtype, what, ulps=16, scale=0.0):
    """Gradients: within ``ulps`` of the larger of the largest |gradient| and
    ``scale``, the size of the terms that cancel in it (a gradient like
    ``q * S - coef`` is accurate to a few ulp of ``S``, not of its value)."""
    assert isinstance(got, np.ndarray) and got.dtype == dtype, f"{what}: {type(got)} {getattr(got, 'dtype', None)}"
    assert_close(got, want, compute_dtype(dtype), store=dtype, ulps=ulps,
                 scale=max(grad_floor(want), scale), what=what)


def _finite_max(a):
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _gscale(g_out, reduction, batch, denom, base):
    """|d(reduced loss)/d(per-row loss)| * |grad_output| per row."""
    g = np.abs(np.broadcast_to(np.asarray(g_out, dtype=np.float64), batch))
    if reduction in ("mean", "batchmean"):
        g = g / denom if denom else g * 0.0
    if base is not None:
        g = g / abs(math.log(base))
    return g


def ce_grad_scale(shape, labels_ref, opts, g_out, dtype):
    """Largest ``S_row * gscale_row`` (S = sum of the row's target coefficients)."""
    if not opts["from_logits"]:
        return 0.0
    ax = opts["axis"] % len(shape)
    c = shape[ax]
    batch = tuple(s for i, s in enumerate(shape) if i != ax)
    w = np.ones(c) if opts["weight"] is None else np.asarray(opts["weight"]).astype(compute_dtype(dtype)).astype(np.float64)
    eps = opts["label_smoothing"]
    lab = np.asarray(labels_ref)
    if lab.dtype.kind in "iu":
        counted = lab != opts["ignore_index"]
        y = np.where(counted, lab, 0).astype(np.intp)
        s_row = counted * ((1 - eps) * w[y] + eps / c * w.sum())
        denom = float(np.sum(w[y] * counted))
    else:
        t = np.moveaxis(lab.astype(np.float64), ax, -1)
        s_row = np.sum(w * ((1 - eps) * t + eps / c), axis=-1)
        denom = math.prod(batch)
    return _finite_max(s_row * _gscale(g_out, opts["reduction"], batch, denom, opts["base"]))


def make_out(draw, shape, dtype, x_view):
    kind = draw(st.sampled_from(["none", "none", "prealloc", "inplace"]))
    if kind == "none":
        return None, kind
    if kind == "inplace":
        if not x_view.flags.writeable or x_view.dtype != dtype:
            return None, "none"
        return x_view, kind
    lay = draw(layouts(len(shape)))
    lay = (lay[0], lay[1], False)
    out = lay_out(np.full(shape, 12345, dtype=np.float64).astype(dtype), lay)
    return out, kind


def settings_for(n=None):
    return settings(PROFILE, max_examples=n) if n else settings(PROFILE)


# ------------------------------------------------------------------ building blocks

@settings_for()
@given(data=st.data(), dtype=st.sampled_from(DTYPES), specials=st.sampled_from([False, False, True]))
def test_logsumexp_and_entropy(data, dtype, specials):
    shape, axis = data.draw(shapes())
    v = data.draw(values(shape, dtype, specials))
    x = lay_out(in_dtype(v, dtype), data.draw(layouts(len(shape))))
    nt = data.draw(threads())
    comp = compute_dtype(dtype)
    with np.errstate(all="ignore"):
        got = fastxent.logsumexp(x, axis=axis, num_threads=nt)
        want = ref.logsumexp(v, axis=axis)
    assert np.asarray(got).dtype == comp
    assert_close(got, want, comp, ulps=4, what="logsumexp")

    base = data.draw(bases())
    from_logits = data.draw(st.booleans())
    if not from_logits:
        v = data.draw(probabilities(tuple(np.moveaxis(np.empty(shape), axis, -1).shape), dtype))
        v = np.moveaxis(v, -1, axis)
        x = lay_out(in_dtype(v, dtype), data.draw(layouts(len(shape))))
    with np.errstate(all="ignore"):
        got = fastxent.entropy(x, axis=axis, from_logits=from_logits, base=base, num_threads=nt)
        want = ref.entropy(v, axis=axis, from_logits=from_logits, base=base)
    assert np.asarray(got).dtype == comp
    assert np.shape(got) == np.shape(want)
    assert_close(got, want, comp, ulps=16, what=f"entropy(from_logits={from_logits}, base={base})")


@settings_for()
@given(data=st.data(), dtype=st.sampled_from(DTYPES), fn=st.sampled_from(["softmax", "log_softmax"]),
       specials=st.sampled_from([False, False, True]))
def test_softmax_and_log_softmax(data, dtype, fn, specials):
    shape, axis = data.draw(shapes())
    v = data.draw(values(shape, dtype, specials))
    x = lay_out(in_dtype(v, dtype), data.draw(layouts(len(shape))))
    x_before = np.array(x, copy=True)
    out, kind = make_out(data.draw, shape, np.dtype(dtype), x)
    nt = data.draw(threads())
    with np.errstate(all="ignore"):
        got = getattr(fastxent, fn)(x, axis=axis, out=out, num_threads=nt)
        want = getattr(ref, fn)(v, axis=axis)
    if out is not None:
        assert got is out
    if kind != "inplace":
        assert np.array_equal(x, x_before, equal_nan=True), "the input was modified"
    assert got.dtype == np.dtype(dtype) and got.shape == tuple(shape)
    comp = compute_dtype(dtype)
    if fn == "softmax":
        assert_probs_close(got, want, comp, store=dtype, what=f"softmax ({kind})")
    else:
        assert_close(got, want, comp, store=dtype, ulps=8, what=f"log_softmax ({kind})")


# ------------------------------------------------------------------ cross entropy

@st.composite
def ce_case(draw, specials=False):
    dtype = draw(st.sampled_from(DTYPES))
    shape, axis = draw(shapes())
    ndim = len(shape)
    ax = axis % ndim
    c = shape[ax]
    batch = tuple(s for i, s in enumerate(shape) if i != ax)
    from_logits = draw(st.integers(0, 4)) > 0
    if from_logits:
        v = draw(values(shape, dtype, specials))
    else:
        moved = tuple(np.moveaxis(np.empty(shape), ax, -1).shape)
        p = draw(probabilities(moved, dtype, normalised=True))
        if dtype != np.float64:
            # keep -t/p within the float16/float32 range of the gradient
            p = np.where((p > 0) & (p < 1e-3), 1e-3, p).astype(dtype).astype(np.float64)
        v = np.moveaxis(p, -1, ax)
    x = lay_out(in_dtype(v, dtype), draw(layouts(ndim)))

    soft = draw(st.integers(0, 3)) == 0
    ignore_index = draw(st.sampled_from([-100, -100, 0, -1, c - 1]))
    if soft:
        moved = tuple(np.moveaxis(np.empty(shape), ax, -1).shape)
        t = np.moveaxis(draw(probabilities(moved, np.float64)), -1, ax)
        lab_dtype = draw(st.sampled_from([np.float64, np.float32, dtype]))
        t = t.astype(lab_dtype)
        labels = lay_out(t, draw(layouts(ndim)))
        labels_ref = t.astype(np.float64)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        lab = rng.integers(0, c, size=batch)
        if lab.size and draw(st.booleans()):
            lab.reshape(-1)[rng.random(lab.size) < 0.3] = ignore_index
        lab_dtype = draw(st.sampled_from([np.int64, np.int32, np.int16, np.int8, np.uint8, np.intp]))
        if np.dtype(lab_dtype).kind == "u" and (lab < 0).any():
            lab_dtype = np.int64
        if np.iinfo(lab_dtype).max < max(c, 1) or np.iinfo(lab_dtype).min > min(ignore_index, 0):
            lab_dtype = np.int64
        lab = lab.astype(lab_dtype)
        labels = lay_out(lab, draw(layouts(len(batch)))) if batch else lab
        labels_ref = lab
    weight = None
    if draw(st.integers(0, 2)) == 0:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w = rng.random(c) * 3
        if draw(st.booleans()):
            w[rng.random(c) < 0.3] = 0.0
        weight = w.astype(draw(st.sampled_from([np.float64, np.float32, dtype])))
    opts = dict(
        axis=axis, weight=weight, ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        from_logits=from_logits, base=draw(bases()),
    )
    return dtype, shape, batch, v, x, labels, labels_ref, opts


def _ref_inputs(dtype, opts):
    """The options as the reference sees them: weights rounded to the compute
    dtype (the library computes with them there)."""
    r = dict(opts)
    if r["weight"] is not None:
        r["weight"] = np.asarray(r["weight"]).astype(compute_dtype(dtype)).astype(np.float64)
    return r


def _soft_ref(labels_ref, dtype):
    if labels_ref.dtype.kind == "f":
        return labels_ref.astype(compute_dtype(dtype)).astype(np.float64)
    return labels_ref


@settings_for()
@given(case=ce_case(), nt=threads())
def test_cross_entropy(case, nt):
    dtype, shape, batch, v, x, labels, labels_ref, opts = case
    comp = compute_dtype(dtype)
    with np.errstate(all="ignore"):
        got = fastxent.cross_entropy(x, labels, num_threads=nt, **opts)
        want = ref.cross_entropy(v, _soft_ref(labels_ref, dtype), **_ref_inputs(dtype, opts))
    check_loss(got, want, comp, opts["reduction"], f"cross_entropy {opts}", ulps=16)


@st.composite
def grad_outputs(draw, reduction, batch):
    if reduction == "none" and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        g = rng.standard_normal(batch)
        return lay_out(g, draw(layouts(len(batch)))) if batch else g
    return draw(st.sampled_from([1.0, 1.0, 0.5, -2.0, 3, np.float32(0.25)]))


@settings_for()
@given(case=ce_case(), nt=threads(), data=st.data())
def test_cross_entropy_with_grad(case, nt, data):
    dtype, shape, batch, v, x, labels, labels_ref, opts = case
    comp = compute_dtype(dtype)
    g_out = data.draw(grad_outputs(opts["reduction"], batch))
    out, kind = make_out(data.draw, shape, np.dtype(dtype), x)
    with np.errstate(all="ignore"):
        want_loss, want_grad = ref.cross_entropy_with_grad(
            v, _soft_ref(labels_ref, dtype), grad_output=np.asarray(g_out, dtype=np.float64),
            **_ref_inputs(dtype, opts))
        loss_only = fastxent.cross_entropy(x, labels, num_threads=nt, **opts)  # before out=x
        loss, grad = fastxent.cross_entropy_with_grad(x, labels, num_threads=nt, grad_output=g_out,
                                                      out=out, **opts)
    what = f"cross_entropy_with_grad {opts} out={kind}"
    check_loss(loss, want_loss, comp, opts["reduction"], what, ulps=16)
    # the fused pass gives bitwise the loss of cross_entropy
    assert np.asarray(loss).tobytes() == np.asarray(loss_only).tobytes(), f"{what}: loss differs from cross_entropy"
    if out is not None:
        assert grad is out
    check_grad(grad, want_grad, np.dtype(dtype), what + " (grad)",
               scale=ce_grad_scale(shape, labels_ref, opts, g_out, dtype))


@settings_for()
@given(case=ce_case(specials=True), nt=threads())
def test_cross_entropy_nonfinite_logits(case, nt):
    """NaN in a row gives NaN for that row only; -inf logits are classes of
    probability 0; +inf follows IEEE -- all as the reference says."""
    dtype, shape, batch, v, x, labels, labels_ref, opts = case
    opts = dict(opts, reduction="none")
    comp = compute_dtype(dtype)
    with np.errstate(all="ignore"):
        got, grad = fastxent.cross_entropy_with_grad(x, labels, num_threads=nt, **opts)
        want, want_grad = ref.cross_entropy_with_grad(v, _soft_ref(labels_ref, dtype), **_ref_inputs(dtype, opts))
    check_loss(got, want, comp, "none", f"cross_entropy (non-finite) {opts}", ulps=16)
    check_grad(grad, want_grad, np.dtype(dtype), f"cross_entropy grad (non-finite) {opts}",
               scale=ce_grad_scale(shape, labels_ref, opts, 1.0, dtype))


# ------------------------------------------------------------------ KL divergence

@st.composite
def kl_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape, axis = draw(shapes(max_c=24))
    ndim = len(shape)
    ax = axis % ndim
    batch = tuple(s for i, s in enumerate(shape) if i != ax)
    v = draw(values(shape, dtype))
    if np.abs(v).max(initial=0) > 1e6:
        v = np.clip(v, -1e4, 1e4).astype(dtype).astype(np.float64)
    x = lay_out(in_dtype(v, dtype), draw(layouts(ndim)))
    kind = draw(st.sampled_from(["probs", "log_probs", "logits"]))
    moved = tuple(np.moveaxis(np.empty(shape), ax, -1).shape)
    p = draw(probabilities(moved, np.float64, normalised=True))
    if kind == "probs":
        t = p
    elif kind == "log_probs":
        with np.errstate(divide="ignore"):
            t = np.log(p)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        t = rng.standard_normal(moved) * 3
    t = np.moveaxis(t, -1, ax)
    t_dtype = draw(st.sampled_from([np.float64, np.float32, dtype]))
    t = t.astype(t_dtype)
    target = lay_out(t, draw(layouts(ndim)))
    t_ref = t.astype(compute_dtype(dtype)).astype(np.float64)
    opts = dict(axis=axis, target_kind=kind,
                reduction=draw(st.sampled_from(["batchmean", "mean", "sum", "none"])),
                temperature=draw(st.sampled_from([1.0, 1.0, 2.0, 0.5, 4.0])), base=draw(bases()))
    return dtype, shape, batch, v, x, target, t_ref, opts


def _kl_condition(v, t_ref, opts):
    """Scale for KL tolerances: T**2 * sum_c P_c (|log P_c| + |log Q_c|) summed
    like the loss (KL cancels: P close to Q gives a tiny result from big terms)."""
    ax = opts["axis"]
    T = opts["temperature"]
    z = np.moveaxis(v, ax, -1) / T
    t = np.moveaxis(t_ref, ax, -1)
    with np.errstate(all="ignore"):
        logq = z - z.max(-1, keepdims=True)
        logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
        if opts["target_kind"] == "probs":
            p, logp = t, np.log(t)
        elif opts["target_kind"] == "log_probs":
            p, logp = np.exp(t), t
        else:
            logp = t / T - (t / T).max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            p = np.exp(logp)
        terms = np.where(p != 0, p * (np.abs(logp) + np.abs(logq)), 0.0)
    per_row = T**2 * terms.sum(-1) + T**2
    if opts["reduction"] == "none":
        return per_row
    if per_row.size == 0:
        return 1.0
    if opts["reduction"] == "sum":
        return float(per_row.sum())
    return float(per_row.mean())


@settings_for()
@given(case=kl_case(), nt=threads(), data=st.data())
def test_kl_div(case, nt, data):
    dtype, shape, batch, v, x, target, t_ref, opts = case
    comp = compute_dtype(dtype)
    g_out = data.draw(grad_outputs(opts["reduction"], batch))
    out, kind = make_out(data.draw, shape, np.dtype(dtype), x)
    scale = _kl_condition(v, t_ref, opts)
    if opts["base"] is not None:
        scale = scale / abs(math.log(opts["base"]))
    with np.errstate(all="ignore"):
        want = ref.kl_div(v, t_ref, **opts)
        want_loss, want_grad = ref.kl_div_with_grad(v, t_ref, grad_output=np.asarray(g_out, np.float64), **opts)
        got = fastxent.kl_div(x, target, num_threads=nt, **opts)
        loss, grad = fastxent.kl_div_with_grad(x, target, num_threads=nt, grad_output=g_out, out=out, **opts)
    what = f"kl_div {opts} out={kind}"
    check_loss(got, want, comp, opts["reduction"], what, ulps=8, scale=scale)
    check_loss(loss, want_loss, comp, opts["reduction"], what, ulps=8, scale=scale)
    assert np.asarray(loss).tobytes() == np.asarray(got).tobytes(), f"{what}: fused loss differs"
    if out is not None:
        assert grad is out
    ax = opts["axis"] % len(shape)
    t = np.moveaxis(t_ref, ax, -1)
    with np.errstate(all="ignore"):
        if opts["target_kind"] == "probs":
            sum_p = t.sum(-1)
        elif opts["target_kind"] == "log_probs":
            sum_p = np.exp(t).sum(-1)
        else:
            sum_p = np.ones(batch)
    gs = _gscale(g_out, opts["reduction"], batch, math.prod(batch), opts["base"])
    scale = _finite_max(opts["temperature"] * np.maximum(sum_p, 1.0) * gs)
    check_grad(grad, want_grad, np.dtype(dtype), what + " (grad)", scale=scale)


# ------------------------------------------------------------------ binary cross entropy

@st.composite
def bce_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape, _ = draw(shapes(max_c=24))
    ndim = len(shape)
    from_logits = draw(st.integers(0, 3)) > 0
    if from_logits:
        v = draw(values(shape, dtype))
        if np.dtype(dtype) == np.float16:
            v = np.clip(v, -1e3, 1e3).astype(dtype).astype(np.float64)
        elif np.dtype(dtype) != np.float64:
            # elementwise losses (times weights up to 2) must fit float32 themselves
            v = np.clip(v, -1e37, 1e37).astype(dtype).astype(np.float64)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        v = rng.random(shape)
        if v.size and draw(st.booleans()):
            v.reshape(-1)[rng.random(v.size) < 0.2] = draw(st.sampled_from([0.0, 1.0]))
        v = v.astype(dtype).astype(np.float64)
    x = lay_out(in_dtype(v, dtype), draw(layouts(ndim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = rng.random(shape)
    if draw(st.booleans()):
        t = np.round(t)
    t = t.astype(draw(st.sampled_from([np.float64, np.float32, dtype])))
    target = lay_out(t, draw(layouts(ndim)))
    t_ref = t.astype(compute_dtype(dtype)).astype(np.float64)
    weight = pos_weight = None
    wkind = draw(st.sampled_from([None, None, "full", "last", "scalar"]))
    if wkind == "full":
        weight = rng.random(shape) * 2
    elif wkind == "last":
        weight = rng.random(shape[-1:]) * 2
    elif wkind == "scalar":
        weight = 1.5
    if draw(st.integers(0, 2)) == 0:
        pos_weight = rng.random(shape[-1:]) * 3
    opts = dict(weight=weight, pos_weight=pos_weight,
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                from_logits=from_logits, base=draw(bases()))
    return dtype, shape, v, x, target, t_ref, opts


@settings_for()
@given(case=bce_case(), nt=threads(), data=st.data())
def test_binary_cross_entropy(case, nt, data):
    dtype, shape, v, x, target, t_ref, opts = case
    comp = compute_dtype(dtype)
    r_opts = dict(opts)
    for k in ("weight", "pos_weight"):
        if r_opts[k] is not None:
            r_opts[k] = np.asarray(r_opts[k]).astype(comp).astype(np.float64)
    if opts["reduction"] == "none" and data.draw(st.booleans()):
        g_out = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
    else:
        g_out = data.draw(st.sampled_from([1.0, 0.5, -2.0]))
    out, kind = make_out(data.draw, shape, np.dtype(dtype), x)
    g_ref = np.asarray(g_out, np.float64)
    if g_ref.ndim:
        g_ref = g_ref.astype(comp).astype(np.float64)
    with np.errstate(all="ignore"):
        want = ref.binary_cross_entropy(v, t_ref, **r_opts)
        want_loss, want_grad = ref.binary_cross_entropy_with_grad(v, t_ref, grad_output=g_ref, **r_opts)
        got = fastxent.binary_cross_entropy(x, target, num_threads=nt, **opts)
        loss, grad = fastxent.binary_cross_entropy_with_grad(x, target, num_threads=nt, grad_output=g_out,
                                                             out=out, **opts)
    what = f"binary_cross_entropy {opts} out={kind}"
    check_loss(got, want, comp, opts["reduction"], what, ulps=16)
    check_loss(loss, want_loss, comp, opts["reduction"], what, ulps=16)
    if out is not None:
        assert grad is out
    w = 1.0 if r_opts["weight"] is None else np.abs(np.broadcast_to(r_opts["weight"], shape))
    pw = 1.0 if r_opts["pos_weight"] is None else np.broadcast_to(r_opts["pos_weight"], shape)
    lw = 1.0 + (pw - 1.0) * t_ref
    gs = _gscale(g_ref, opts["reduction"], shape, math.prod(shape), opts["base"])
    scale = 0.0
    if opts["from_logits"]:
        scale = _finite_max(w * (np.abs(lw) + np.abs(pw * t_ref)) * gs)
    check_grad(grad, want_grad, np.dtype(dtype), what + " (grad)", ulps=32, scale=scale)


# ------------------------------------------------------------------ thread controls

@settings_for(30)
@given(n=st.integers(1, 64))
def test_set_get_num_threads_round_trip(n):
    before = fastxent.get_num_threads()
    try:
        fastxent.set_num_threads(n)
        assert fastxent.get_num_threads() == n
        x = np.arange(12.0).reshape(3, 4)
        np.testing.assert_allclose(fastxent.softmax(x), ref.softmax(x), rtol=1e-12)
        cfg = fastxent.show_config(print_=False)
        assert cfg["num_threads"] == n
    finally:
        fastxent.set_num_threads(None)
        if fastxent.get_num_threads() != before:
            fastxent.set_num_threads(before)
