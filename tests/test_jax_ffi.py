"""fastxent.jax's XLA FFI handler (csrc/xla_ffi.c): every op in every dtype
it takes gives the NumPy functions' bits; labels of every integer type; data
errors and malformed calls come back as XLA errors, never a crash.

Skipped when jax is not installed.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _core  # noqa: E402

pytestmark = pytest.mark.skipif(fxj.transport != "ffi", reason="the XLA FFI is not available")

DTYPES = ["float32", "float64", "bfloat16", "float16"]


@pytest.fixture(autouse=True)
def ffi(monkeypatch):
    monkeypatch.setattr(fxj, "transport", "ffi")


def rng(seed=0):
    return np.random.default_rng(seed)


def arrays(dtype, shape=(5, 2, 11), seed=0):
    """Logits in ``dtype`` (NumPy, for the reference call, and JAX) and
    the compute dtype's name."""
    x = (3 * rng(seed).standard_normal(shape)).astype(jnp.dtype(dtype))
    return x, ("float64" if dtype == "float64" else "float32")


def same(got, want):
    """The handler's result against the NumPy function's: the same bits."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))


def x64(dtype):
    return jax.enable_x64(dtype == "float64")


# The ops, each as (fastxent.jax call, NumPy call, NumPy call with grad or None),
# over logits x, a float target t (compute dtype), integer labels y, a class
# weight w and an elementwise weight ew (compute dtype).
CASES = {
    "ce_hard": dict(kw=dict(axis=1, ignore_index=2, label_smoothing=0.1, reduction="sum")),
    "ce_hard_none": dict(kw=dict(reduction="none", base=2)),
    "ce_weight_mean": dict(kw=dict(label_smoothing=0.2), weight=True),
    "ce_soft": dict(kw=dict(reduction="mean"), soft=True, weight=True),
    "ce_probs": dict(kw=dict(from_logits=False), probs=True),
    "kl_probs": dict(fn="kl_div", kw=dict(target_kind="probs")),
    "kl_log_probs": dict(fn="kl_div", kw=dict(target_kind="log_probs", reduction="none")),
    "kl_logits": dict(fn="kl_div", kw=dict(target_kind="logits", temperature=2.5, reduction="sum")),
    "bce": dict(fn="binary_cross_entropy", kw=dict(reduction="mean"), bce_weights=True),
    "bce_none": dict(fn="binary_cross_entropy", kw=dict(reduction="none", base=10),
                     bce_weights=True),
    "bce_probs": dict(fn="binary_cross_entropy", kw=dict(from_logits=False, reduction="sum"),
                      probs=True),
}


def _inputs(case, dtype):
    x, cdt = arrays(dtype)
    spec = CASES[case]
    fn = spec.get("fn", "cross_entropy")
    kw = dict(spec["kw"])
    r = rng(1)
    if spec.get("probs"):
        x = r.random(x.shape).astype(x.dtype)
    if fn == "cross_entropy" and not spec.get("soft"):
        axis = kw.get("axis", -1)
        shape = x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:]
        t = r.integers(0, x.shape[axis], shape)
    elif fn == "kl_div" and kw["target_kind"] != "logits":
        p = r.random(x.shape)
        p /= p.sum(-1, keepdims=True)
        t = (np.log(p) if kw["target_kind"] == "log_probs" else p).astype(cdt)
    else:
        t = r.random(x.shape).astype(cdt)
        if spec.get("soft"):
            t /= t.sum(-1, keepdims=True)
    if spec.get("weight"):
        kw["weight"] = (r.random(x.shape[kw.get("axis", -1)]) + 0.1).astype(cdt)
    if spec.get("bce_weights"):
        kw["weight"] = r.random((2, 1)).astype(cdt)
        kw["pos_weight"] = (3 * r.random(x.shape[-1])).astype(cdt)
    return fn, x, t, kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(set(CASES) - {"ce_weight_mean"}))
def test_losses_give_the_numpy_bits(case, dtype):
    fn, x, t, kw = _inputs(case, dtype)
    with x64(dtype):
        jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        f = getattr(fxj, fn)
        loss = jax.jit(lambda x, t: f(x, t, **jkw))(jnp.asarray(x), jnp.asarray(t))
        same(loss, getattr(fastxent, fn)(x, t, **kw))
        # the gradient with a cotangent of 1: the handler's fused gradient as it is
        vg = jax.jit(jax.value_and_grad(lambda x, t: jnp.sum(f(x, t, **jkw))))
        _, grad = vg(jnp.asarray(x), jnp.asarray(t))
        _, want = getattr(fastxent, fn + "_with_grad")(x, t, **kw)
        # the cotangent 1 leaves the fused gradient's bits as they are
        same(grad, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_mean_matches_numpy(dtype):
    # Its denominator, the counted labels' weights, is summed left to right
    # by the handler and pairwise by NumPy: equal to rounding.
    fn, x, t, kw = _inputs("ce_weight_mean", dtype)
    with x64(dtype):
        w = jnp.asarray(kw.pop("weight"))
        loss, grad = jax.jit(jax.value_and_grad(
            lambda x: fxj.cross_entropy(x, jnp.asarray(t), weight=w, **kw)))(jnp.asarray(x))
        want_loss, want_grad = fastxent.cross_entropy_with_grad(x, t, weight=np.asarray(w), **kw)
    tol = 1e-13 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=tol)
    np.testing.assert_allclose(np.asarray(grad, np.float64), np.asarray(want_grad, np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks_give_the_numpy_bits(dtype):
    x, _ = arrays(dtype)
    with x64(dtype):
        for axis in (-1, 0):
            for name in ("log_softmax", "softmax", "logsumexp"):
                got = jax.jit(lambda x: getattr(fxj, name)(x, axis=axis))(jnp.asarray(x))
                same(got, getattr(fastxent, name)(x, axis=axis))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32",
                                   "int64", "uint64"])
def test_labels_of_every_integer_type(dtype):
    x, _ = arrays("float32", (6, 7))
    y = np.array([0, 6, 3, 255 if dtype.startswith("u") else -100, 1, 2], dtype)
    ii = int(y[3])
    with jax.enable_x64(dtype.endswith("64")):
        yj = jnp.asarray(y)
        assert yj.dtype == np.dtype(dtype)
        loss, grad = jax.jit(jax.value_and_grad(
            lambda x: fxj.cross_entropy(x, yj, ignore_index=ii)))(jnp.asarray(x))
    want_loss, want_grad = fastxent.cross_entropy_with_grad(x, y.astype(np.int64), ignore_index=ii)
    same(loss, want_loss)
    same(grad, want_grad)


def test_empty_batches():
    x = jnp.zeros((0, 5), jnp.float32)
    assert np.isnan(float(fxj.cross_entropy(x, jnp.zeros(0, jnp.int32))))
    assert float(fxj.cross_entropy(x, jnp.zeros(0, jnp.int32), reduction="sum")) == 0.0
    assert fxj.logsumexp(x).shape == (0,)
    assert np.isnan(float(fxj.binary_cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3, 0)))))
    with pytest.raises(ValueError, match="no classes"):
        fxj.cross_entropy(jnp.zeros((3, 0)), jnp.zeros(3, jnp.int32))


def test_vmap_of_a_loss_over_its_labels_only():
    # The logits come unbatched (a lead dimension of 1), the labels batched.
    x, _ = arrays("float32", (4, 9))
    ys = rng(3).integers(0, 9, (3, 4))
    loss, grad = jax.vmap(jax.value_and_grad(fxj.cross_entropy), in_axes=(None, 0))(
        jnp.asarray(x), jnp.asarray(ys, jnp.int32))
    for i in range(3):
        want_loss, want_grad = fastxent.cross_entropy_with_grad(x, ys[i])
        same(loss[i], want_loss)
        same(grad[i], want_grad)


# ------------------------------------------------------------------ errors


def _raises(match, f, *args):
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
        jax.block_until_ready(jax.jit(f)(*args))


def test_data_errors_name_the_value_and_where():
    x = jnp.asarray(rng(4).random((2, 3, 4)), jnp.float32)
    y = jnp.zeros((2, 3), jnp.int32).at[1, 2].set(-5)
    _raises(r"ValueError: label -5 at position \(1, 2\) is out of range \[0, 4\) and is not "
            r"ignore_index \(-100\)", lambda x: fxj.cross_entropy(x, y), x)
    # vmap: the position is within the batch element, as the NumPy call says
    _raises(r"label -5 at position \(2,\)", jax.vmap(lambda x, y: fxj.cross_entropy(x, y)), x, y)
    _raises(r"weight must be finite and non-negative; weight\[1\] = nan",
            lambda x: fxj.cross_entropy(x, jnp.zeros((2, 3), jnp.int32),
                                        weight=jnp.asarray([1, np.nan, 1, 1.0])), x)
    _raises(r"pos_weight must be finite and non-negative; pos_weight holds -2.5 at flat index 3",
            lambda x: fxj.binary_cross_entropy(x, x, pos_weight=jnp.asarray([1, 1, 1, -2.5])), x)
    _raises(r"weight must be finite and non-negative; weight holds inf at flat index 1",
            lambda x: fxj.binary_cross_entropy(x, x, weight=jnp.asarray([[1.0], [np.inf], [1]])), x)
    _raises(r"with from_logits=False, logits must hold probabilities in \[0, 1\]; found 1.5 at "
            r"position \(0, 1, 2\)",
            lambda x: fxj.cross_entropy(x.at[0, 1, 2].set(1.5), jnp.zeros((2, 3), jnp.int32),
                                        from_logits=False), x)
    _raises(r"target must hold probabilities in \[0, 1\]; found -0.25 at position \(1, 0, 0\)",
            lambda x: fxj.binary_cross_entropy(x, x.at[1, 0, 0].set(-0.25), from_logits=False), x)


def test_malformed_calls_are_xla_errors():
    # Calls fastxent.jax never makes, straight to the handler: each is refused
    # with an error (the kernels never see a shape they would overrun).
    x = jnp.ones((4, 6), jnp.float32)
    y = jnp.zeros(4, jnp.int32)
    loss = jax.ShapeDtypeStruct((), jnp.float32)
    i64, f64 = np.int64, np.float64

    def call(results, *args, **attrs):
        return jax.ffi.ffi_call(fxj._FFI_TARGET, results)(*args, **attrs)

    base = dict(fn=i64(0), ndim=i64(2), reduction=i64(2))
    _raises("unknown attribute colour", lambda x: call(loss, x, y, colour=i64(1), **base), x)
    _raises("without a valid fn", lambda x: call(loss, x, y, fn=i64(9), ndim=i64(2)), x)
    _raises("not an integer", lambda x: call(loss, x, y, fn=f64(0.5), ndim=i64(2)), x)
    _raises("labels or target shape", lambda x: call(loss, x, y[:3], **base), x)
    _raises("loss shape", lambda x: call(jax.ShapeDtypeStruct((4,), jnp.float32), x, y, **base), x)
    _raises("loss shape", lambda x: call(jax.ShapeDtypeStruct((), jnp.float16), x, y, **base), x)
    _raises("labels of XLA dtype", lambda x: call(loss, x, y.astype(jnp.bool_), **base), x)
    _raises("logits of XLA dtype", lambda x: call(loss, x.astype(jnp.int32), y, **base), x)
    _raises("loss arity", lambda x: call(loss, x, y, weights=i64(1), **base), x)
    _raises("loss arity", lambda x: call(loss, x, **base), x)  # no labels operand at all
    _raises("gradient shape", lambda x: call(
        (loss, jax.ShapeDtypeStruct((4, 5), jnp.float32)), x, y, grad=i64(1), **base), x)
    _raises("row op result shape", lambda x: call(
        jax.ShapeDtypeStruct((4, 5), jnp.float32), x, fn=i64(3), ndim=i64(2)), x)
    _raises("threads", lambda x: call(loss, x, y, threads=i64(-1), **base), x)


def test_the_handler_is_a_capsule_and_follows_set_num_threads():
    assert type(_core.xla_ffi_handler()).__name__ == "PyCapsule"
    # The handler's default thread count (num_threads=None) is the extension's
    # global, which fastxent.set_num_threads sets.
    default = ctypes.c_int.in_dll(ctypes.CDLL(_core.__file__), "fx_xla_default_threads")
    try:
        fastxent.set_num_threads(3)
        assert default.value == 3
    finally:
        fastxent.set_num_threads(None)
    assert default.value == 0
