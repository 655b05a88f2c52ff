"""16-bit inputs: float16, and ml_dtypes.bfloat16 when it is installed, for
every function.

16-bit inputs are computed with float32 arithmetic.  The oracle gets the same
16-bit values upcast to float64, so:

* losses and per-row values (cross_entropy, kl_div, binary_cross_entropy,
  logsumexp, entropy) are float32 and held to float32's tolerance;
* gradients and the outputs of log_softmax and softmax have the input's 16-bit
  dtype and are held to one 16-bit ulp of the exact value, |got - ref| <=
  spacing(round16(ref)), plus a float32-sized slack (a few float32 ulp of the
  output's scale) for values near 0.  A float32 result rounded once to 16 bits
  is within half an ulp of it; anything computed in 16 bits along the way (say
  p in float16, then p - 1) is not.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastxent
from fastxent import _core
from fastxent import reference as ref

from conftest import (
    AVAILABLE_ISAS,
    EPS32,
    OUT_KINDS,
    THREADS,
    assert_bitwise_equal,
    assert_close,
    assert_scalar_of,
    make_layout,
    make_out,
    random_probs,
    strided_gaps,
    to_logical,
)

# (mantissa bits, smallest normal exponent) of each 16-bit format.
FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}
LAYOUTS16 = ("contiguous", "class_first", "negative", "strided")
F32 = np.float32


@pytest.fixture(params=list(FORMATS))
def dtype16(request):
    """float16, and bfloat16 where ml_dtypes is installed."""
    if request.param == "float16":
        return np.dtype(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------- helpers


def to16(a, dtype):
    """``a`` rounded to the 16-bit ``dtype``."""
    return np.asarray(a, dtype=np.float64).astype(dtype)


def as64(a):
    return np.asarray(a).astype(np.float64)


def spacing16(values, dtype):
    """The 16-bit ulp at each value: the gap above |round16(value)|."""
    nmant, min_exp = FORMATS[dtype.name]
    r = np.abs(as64(to16(values, dtype)))
    with np.errstate(divide="ignore"):
        _, e = np.frexp(r)  # r = m 2**e, 0.5 <= m < 1: the binade is 2**(e - 1)
    exponent = np.maximum(e - 1, min_exp)
    return np.ldexp(1.0, exponent - nmant)


def assert_16bit_close(got, expected, dtype, *, scale, what=""):
    """``got`` (16-bit) within one 16-bit ulp of ``expected`` (float64), plus
    8 float32 ulp of ``scale``; NaN and inf where the reference has them."""
    got = np.asarray(got)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    g, r = as64(got), np.asarray(expected, dtype=np.float64)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    assert np.array_equal(np.isnan(g), np.isnan(r)), f"{what}: NaN mismatch"
    inf = np.isinf(r)
    assert np.array_equal(g[inf], r[inf]) and not np.isinf(g[~inf]).any(), f"{what}: inf mismatch"
    finite = np.isfinite(r)
    bound = spacing16(np.where(finite, r, 0.0), dtype) + 8 * EPS32 * scale
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if np.any(bad):
        i = int(np.argmax(np.where(bad, err / bound, 0.0)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements further than one {dtype} ulp; "
            f"worst at flat index {i}: got {g.reshape(-1)[i]!r}, ref {r.reshape(-1)[i]!r}, "
            f"16-bit rounding of ref {as64(to16(r.reshape(-1)[i], dtype))!r}"
        )


def max_abs(a, floor=0.0):
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return max(float(np.max(np.abs(a))) if a.size else 0.0, floor)


def check_reduced(got, expected, reduction, shape, what):
    """A loss: a float32 scalar, or a float32 array of ``shape`` for "none"."""
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == F32, f"{what}: {type(got)} {got.dtype}"
        assert got.shape == shape, f"{what}: shape {got.shape} != {shape}"
    else:
        assert_scalar_of(got, F32, what)
    assert_close(got, expected, F32, what=what)


# ------------------------------------------------------------ the cases

# Each case: the loss (and its _with_grad twin) and fixed keywords; build_case
# draws the 16-bit inputs and any weights.
CASES = {
    "ce_hard": ("cross_entropy", dict(label_smoothing=0.1)),
    "ce_soft": ("cross_entropy", {}),
    "ce_probs": ("cross_entropy", dict(from_logits=False)),
    "kl_probs": ("kl_div", dict(target_kind="probs")),
    "kl_log_probs": ("kl_div", dict(target_kind="log_probs")),
    "kl_logits": ("kl_div", dict(target_kind="logits", temperature=2.0)),
    "bce_logits": ("binary_cross_entropy", {}),
    "bce_probs": ("binary_cross_entropy", dict(from_logits=False)),
}


def build_case(name, rng, shape, dtype):
    """Logical (class axis last) 16-bit inputs of case ``name``."""
    func, kw = CASES[name]
    kw = dict(kw)
    batch, C = shape[:-1], shape[-1]
    labels = rng.integers(0, C, batch)
    if name == "bce_probs":
        x = to16(rng.uniform(0.01, 0.99, shape), dtype)  # 16-bit p of 1 would give a gradient of 1e12
    elif name == "ce_probs":
        # Used as given: the true class gets at least 0.05, so that -w/p stays
        # inside float16's range (65504) however wide the row (and at most 1:
        # probabilities outside [0, 1] are an error).
        p = random_probs(rng, shape, np.float64)
        true_p = np.minimum(1.0, 0.05 + np.take_along_axis(p, labels[..., None], -1))
        np.put_along_axis(p, labels[..., None], true_p, -1)
        x = to16(p, dtype)
    else:
        x = to16(3.0 * rng.standard_normal(shape), dtype)
    if name in ("ce_hard", "ce_probs"):
        second = labels
        kw["weight"] = to16(rng.uniform(0.5, 2.0, C), dtype)
    elif name == "ce_soft":
        second = to16(random_probs(rng, shape, np.float64), dtype)
    elif name == "kl_probs":
        second = to16(random_probs(rng, shape, np.float64), dtype)
    elif name == "kl_log_probs":
        second = to16(np.log(random_probs(rng, shape, np.float64)), dtype)
    elif name == "kl_logits":
        second = to16(3.0 * rng.standard_normal(shape), dtype)
    else:
        second = to16(rng.uniform(0.0, 1.0, shape), dtype)
        kw["pos_weight"] = to16(rng.uniform(0.5, 3.0, C), dtype)
    return func, x, second, kw


def reductions_of(func):
    return ("batchmean", "sum", "none") if func == "kl_div" else ("mean", "sum", "none")


def check_case(name, rng, dtype, C, layout, n, threads_list=THREADS):
    """Every reduction of the loss, then loss and gradient with every out= and
    thread count, against the reference on the upcast 16-bit values."""
    func, logical, second, kw = build_case(name, rng, (n, C), dtype)
    elementwise = func == "binary_cross_entropy"
    if elementwise and layout == "class_first":
        layout = "fortran"  # no class axis: keep the shape, transpose the memory
    per_shape = (n, C) if elementwise else (n,)
    x64 = as64(logical)
    s64 = second if second.dtype.kind in "iu" else as64(second)

    def lay(a):
        if a.dtype.kind in "iu":
            return a, -1  # integer labels: batch-shaped
        return make_layout(np.array(a, copy=True), layout)

    arr, axis = lay(logical)
    sarr, _ = lay(second)
    call_axis = {} if elementwise else {"axis": axis}
    loss_f, grad_f = getattr(fastxent, func), getattr(fastxent, func + "_with_grad")

    for i, reduction in enumerate(reductions_of(func)):
        threads = threads_list[i % len(threads_list)]
        got = loss_f(arr, sarr, reduction=reduction, num_threads=threads, **call_axis, **kw)
        expected = getattr(ref, func)(x64, s64, reduction=reduction, **kw)
        check_reduced(got, expected, reduction, per_shape, f"{name} {reduction}")

    for out_kind in OUT_KINDS:
        reduction = {"none": reductions_of(func)[0], "prealloc": "sum", "inplace": "none"}[out_kind]
        go = rng.uniform(0.5, 2.0, per_shape) if reduction == "none" else 1.25
        ref_loss, ref_grad = getattr(ref, func + "_with_grad")(
            x64, s64, reduction=reduction, grad_output=go, **kw)
        scale = max_abs(ref_grad, 1e-6)
        for threads in threads_list:
            arr, axis = lay(logical)
            out = make_out(arr, out_kind)
            what = f"{name} {out_kind} {reduction} threads={threads}"
            loss, grad = grad_f(arr, sarr, reduction=reduction, grad_output=go, out=out,
                                num_threads=threads, **call_axis, **kw)
            check_reduced(loss, ref_loss, reduction, per_shape, what + " loss")
            assert isinstance(grad, np.ndarray) and grad.shape == arr.shape, what
            if out is not None:
                assert np.shares_memory(grad, out), f"{what}: not written into out="
            assert_16bit_close(to_logical(grad, axis), ref_grad, dtype, scale=scale, what=what + " grad")
            if out_kind != "inplace":
                assert np.array_equal(as64(to_logical(arr, axis)), x64), "logits were modified"
            if layout == "strided":
                assert np.isnan(as64(strided_gaps(arr))).all(), "wrote outside the view"


def check_blocks(rng, dtype, C, layout, n, threads_list=THREADS):
    """logsumexp and entropy (float32 per row), log_softmax and softmax (16-bit)."""
    logical = to16(3.0 * rng.standard_normal((n, C)), dtype)
    x64 = as64(logical)
    arr, axis = make_layout(np.array(logical, copy=True), layout)
    for i, (name, expected) in enumerate((("logsumexp", ref.logsumexp(x64)), ("entropy", ref.entropy(x64)))):
        got = getattr(fastxent, name)(arr, axis=axis, num_threads=threads_list[i % len(threads_list)])
        assert isinstance(got, np.ndarray) and got.dtype == F32 and got.shape == (n,), name
        assert_close(got, expected, F32, what=name)
    got = fastxent.entropy(arr, axis=axis, base=2)
    assert_close(got, ref.entropy(x64, base=2), F32, what="entropy base 2")
    for name in ("log_softmax", "softmax"):
        expected = getattr(ref, name)(x64)
        scale = max_abs(expected, 1.0)
        for out_kind in OUT_KINDS:
            for threads in threads_list:
                arr, axis = make_layout(np.array(logical, copy=True), layout)
                out = make_out(arr, out_kind)
                got = getattr(fastxent, name)(arr, axis=axis, out=out, num_threads=threads)
                what = f"{name} {out_kind} threads={threads}"
                if out is not None:
                    assert np.shares_memory(got, out), what
                assert got.shape == arr.shape, what
                assert_16bit_close(to_logical(got, axis), expected, dtype, scale=scale, what=what)
                if layout == "strided":
                    assert np.isnan(as64(strided_gaps(arr))).all(), "wrote outside the view"


# ------------------------------------------------------------ the matrix


# 37 rows: two full 16-row groups of the small-row path (contiguous rows
# are widened and narrowed as one block) and a partial one.
@pytest.mark.parametrize(
    "C,n", [(1, 9), (7, 9), (17, 9), (1000, 9), (10, 37), (33, 37), (48, 37), (63, 37), (64, 9)]
)
@pytest.mark.parametrize("name", list(CASES) + ["blocks"])
def test_every_function(name, C, n, dtype16, isa, rng):
    for layout in LAYOUTS16:
        if name == "blocks":
            check_blocks(rng, dtype16, C, layout, n=n)
        else:
            check_case(name, rng, dtype16, C, layout, n=n)


@pytest.mark.parametrize("name", list(CASES) + ["blocks"])
def test_every_function_vocab_width(name, dtype16, isa, rng):
    # One thread count per ISA (they are compared bitwise below).
    threads = (THREADS[AVAILABLE_ISAS.index(isa) % len(THREADS)],)
    layout = LAYOUTS16[AVAILABLE_ISAS.index(isa) % len(LAYOUTS16)]
    if name == "blocks":
        check_blocks(rng, dtype16, 50257, layout, n=1, threads_list=threads)
    else:
        check_case(name, rng, dtype16, 50257, layout, n=1, threads_list=threads)


# ------------------------------------------- p - 1 is formed before rounding


def near_certain_row(dtype, C=4, miss=1e-4):
    """A row whose class 0 has probability about 1 - ``miss``; its exact
    16-bit logits (the offset d of the others is rounded to 16 bits)."""
    d = math.log((C - 1) / miss)
    x = np.full((1, C), -d)
    x[0, 0] = 0.0
    return to16(x, dtype)


def assert_small_gradient(got, expected, dtype, what):
    """``got`` is the 16-bit rounding of ``expected`` (about -1e-4), not 0: within
    one 16-bit ulp and 4 float32 ulp of 1 (the rounding of a float32 p near 1)."""
    g = float(as64(got))
    assert g != 0.0, f"{what}: the gradient rounded to 0 (p rounded to 1 before p - 1?)"
    assert abs(expected) > 5e-5
    bound = float(spacing16(expected, dtype)) + 4 * EPS32
    rounded = float(as64(to16(expected, dtype)))
    assert abs(g - expected) <= bound, f"{what}: got {g!r}, expected {expected!r} (16-bit {rounded!r})"
    assert abs(g - expected) <= 0.02 * abs(expected), f"{what}: got {g!r}, expected {expected!r}"


def test_true_class_gradient_formed_before_rounding(dtype16, isa):
    x = near_certain_row(dtype16)
    x64 = as64(x)
    p0 = float(ref.softmax(x64)[0, 0])
    assert 1 - 2e-4 < p0 < 1 - 5e-5 and as64(to16(p0, dtype16)) == 1.0, "the case needs p to round to 1"
    # Cross entropy with a hard label and with its one-hot soft label, then KL to a one-hot target.
    _, grad = fastxent.cross_entropy_with_grad(x, np.array([0]), reduction="sum")
    assert grad.dtype == dtype16
    expected = ref.cross_entropy_with_grad(x64, np.array([0]), reduction="sum")[1]
    assert_small_gradient(grad[0, 0], expected[0, 0], dtype16, "cross_entropy hard")
    assert_16bit_close(grad, expected, dtype16, scale=1.0, what="cross_entropy hard row")
    one_hot = to16(np.eye(4)[[0]], dtype16)
    _, grad = fastxent.cross_entropy_with_grad(x, one_hot, reduction="sum")
    assert_small_gradient(grad[0, 0], expected[0, 0], dtype16, "cross_entropy soft")
    for kind, target in (("probs", one_hot), ("log_probs", to16(np.log(np.eye(4)[[0]] + 1e-30), dtype16))):
        _, grad = fastxent.kl_div_with_grad(x, target, target_kind=kind, reduction="sum")
        expected = ref.kl_div_with_grad(x64, as64(target), target_kind=kind, reduction="sum")[1]
        assert grad.dtype == dtype16
        assert_small_gradient(grad[0, 0], expected[0, 0], dtype16, f"kl_div {kind}")
    # A target of logits: the target is near certain too, the model a little less.
    t = near_certain_row(dtype16, miss=1e-6)
    _, grad = fastxent.kl_div_with_grad(x, t, target_kind="logits", reduction="sum")
    expected = ref.kl_div_with_grad(x64, as64(t), target_kind="logits", reduction="sum")[1]
    assert_small_gradient(grad[0, 0], expected[0, 0], dtype16, "kl_div logits")
    # log_softmax of the near-certain class: log(1 - 1e-4), not 0.
    got = fastxent.log_softmax(x)
    assert got.dtype == dtype16
    assert_small_gradient(got[0, 0], ref.log_softmax(x64)[0, 0], dtype16, "log_softmax")


def test_bce_gradient_formed_before_rounding(dtype16, isa):
    """sigmoid(9.21) - 1 is about -1e-4: the float32 sigmoid is about 1, its
    16-bit rounding is 1."""
    x = to16(np.array([9.21, -9.21, 9.21]), dtype16)
    t = to16(np.array([1.0, 0.0, 0.0]), dtype16)
    x64, t64 = as64(x), as64(t)
    _, grad = fastxent.binary_cross_entropy_with_grad(x, t, reduction="sum")
    assert grad.dtype == dtype16
    expected = ref.binary_cross_entropy_with_grad(x64, t64, reduction="sum")[1]
    assert_small_gradient(grad[0], expected[0], dtype16, "bce sigmoid(x) - 1")
    assert_small_gradient(grad[1], expected[1], dtype16, "bce sigmoid(-x)")
    assert_16bit_close(grad, expected, dtype16, scale=1.0, what="bce")
    # Probabilities: p = 1 - 2**-8 (exact in both formats), t = 1: the gradient
    # (p - t) / (p (1 - p)) = -1/p, computed from the 16-bit p.
    p = to16(np.array([1 - 2.0**-8, 2.0**-8]), dtype16)
    tp = to16(np.array([1.0, 1.0]), dtype16)
    _, grad = fastxent.binary_cross_entropy_with_grad(p, tp, from_logits=False, reduction="sum")
    expected = ref.binary_cross_entropy_with_grad(as64(p), as64(tp), from_logits=False, reduction="sum")[1]
    assert_16bit_close(grad, expected, dtype16, scale=max_abs(expected), what="bce probs")


# ------------------------------------------------------------ dtypes, out=


def test_result_dtypes(dtype16, rng):
    x = to16(3.0 * rng.standard_normal((5, 6)), dtype16)
    y = rng.integers(0, 6, 5)
    t = to16(rng.uniform(0, 1, (5, 6)), dtype16)
    for f, second, kw in ((fastxent.cross_entropy, y, {}), (fastxent.kl_div, t, {"target_kind": "logits"}),
                          (fastxent.binary_cross_entropy, t, {})):
        assert_scalar_of(f(x, second, reduction="sum", **kw), F32, f.__name__)
        assert f(x, second, reduction="none", **kw).dtype == F32, f.__name__
        grad_f = getattr(fastxent, f.__name__ + "_with_grad")
        loss, grad = grad_f(x, second, **kw)
        assert_scalar_of(loss, F32, f.__name__)
        assert grad.dtype == dtype16, f.__name__
        with pytest.raises(ValueError):  # out= must have the gradient's (16-bit) dtype
            grad_f(x, second, out=np.empty(x.shape, np.float32), **kw)
    assert fastxent.logsumexp(x).dtype == F32
    assert fastxent.entropy(x).dtype == F32
    assert fastxent.log_softmax(x).dtype == dtype16
    assert fastxent.softmax(x).dtype == dtype16
    with pytest.raises(ValueError):
        fastxent.softmax(x, out=np.empty(x.shape, np.float32))


def test_float32_and_16bit_agree(dtype16, rng):
    """A 16-bit input computes exactly as its float32 upcast: the same losses,
    and gradients that are their 16-bit rounding."""
    x = to16(3.0 * rng.standard_normal((33, 40)), dtype16)
    x32 = x.astype(np.float32)
    y = rng.integers(0, 40, 33)
    t = to16(rng.standard_normal((33, 40)), dtype16)
    t32 = t.astype(np.float32)
    b = to16(rng.uniform(0, 1, (33, 40)), dtype16)
    b32 = b.astype(np.float32)
    pairs = [
        ("cross_entropy", (x, y), (x32, y), {}),
        ("kl_div", (x, t), (x32, t32), {"target_kind": "logits", "temperature": 2.0}),
        ("binary_cross_entropy", (x, b), (x32, b32), {}),
    ]
    for name, args16, args32, kw in pairs:
        loss16, grad16 = getattr(fastxent, name + "_with_grad")(*args16, **kw)
        loss32, grad32 = getattr(fastxent, name + "_with_grad")(*args32, **kw)
        assert_bitwise_equal(loss16, loss32, what=name)
        assert_bitwise_equal(getattr(fastxent, name)(*args16, reduction="none", **kw),
                             getattr(fastxent, name)(*args32, reduction="none", **kw), what=name + " none")
        assert_bitwise_equal(grad16, to16(grad32, dtype16), what=name + " grad")
    for name in ("log_softmax", "softmax"):
        expected = to16(getattr(fastxent, name)(x32), dtype16)
        assert_bitwise_equal(getattr(fastxent, name)(x), expected, what=name)
    for name in ("logsumexp", "entropy"):
        assert_bitwise_equal(getattr(fastxent, name)(x), getattr(fastxent, name)(x32), what=name)


@pytest.mark.parametrize("shape", [(64, 1000), (1, 100003)], ids=["rows", "one_row"])
def test_bitwise_identical_across_threads_and_isas(shape, dtype16, rng):
    x = to16(3.0 * rng.standard_normal(shape), dtype16)
    y = rng.integers(0, shape[1], shape[0])
    t = to16(3.0 * rng.standard_normal(shape), dtype16)
    b = to16(rng.uniform(0, 1, shape), dtype16)
    previous = _core.get_isa()
    baseline = None
    try:
        for isa in AVAILABLE_ISAS:
            _core.set_isa(isa)
            for threads in (1, 2, 3, None):
                kw = dict(num_threads=threads)
                results = {
                    "ce": fastxent.cross_entropy_with_grad(x, y, **kw),
                    "kl": fastxent.kl_div_with_grad(x, t, target_kind="logits", **kw),
                    "bce": fastxent.binary_cross_entropy_with_grad(x, b, **kw),
                    "log_softmax": fastxent.log_softmax(x, **kw),
                    "softmax": fastxent.softmax(x, **kw),
                    "entropy": fastxent.entropy(x, **kw),
                }
                if baseline is None:
                    baseline = results
                    continue
                for key, value in results.items():
                    if isinstance(value, tuple):
                        assert_bitwise_equal(value[0], baseline[key][0], what=f"{key} loss {isa} {threads}")
                        assert_bitwise_equal(value[1], baseline[key][1], what=f"{key} grad {isa} {threads}")
                    else:
                        assert_bitwise_equal(value, baseline[key], what=f"{key} {isa} {threads}")
    finally:
        _core.set_isa(previous)


def test_bfloat16_without_importing_ml_dtypes_up_front():
    """``import fastxent`` leaves ml_dtypes alone (its import costs about
    half a second); bfloat16 arrays made after it, with ml_dtypes imported
    then, still take the kernels' 16-bit path and give float32's losses of
    the same values."""
    pytest.importorskip("ml_dtypes")
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fastxent
        assert "ml_dtypes" not in sys.modules, "import fastxent imported ml_dtypes"
        import ml_dtypes
        x = (np.arange(60, dtype=np.float32).reshape(6, 10) / 7).astype(ml_dtypes.bfloat16)
        y = np.arange(6) % 10
        got = fastxent.cross_entropy(x, y, reduction="none")
        want = fastxent.cross_entropy(x.astype(np.float32), y, reduction="none")
        assert got.dtype == np.float32, got.dtype
        assert np.array_equal(got, want), (got, want)
        lsm = fastxent.log_softmax(x)
        assert lsm.dtype == x.dtype, lsm.dtype
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
