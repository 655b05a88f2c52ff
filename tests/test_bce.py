"""binary_cross_entropy and binary_cross_entropy_with_grad against
fastxent.reference, PyTorch and finite differences.

from_logits=True is torch's binary_cross_entropy_with_logits (weight broadcast
to the input, pos_weight broadcast over the last axis); from_logits=False is
torch's binary_cross_entropy on probabilities, each log clamped at -100, with
torch's gradient.  The loss is elementwise: "none" has the input's shape, and
"mean" divides by the number of elements.

The product dtype x width x layout x from_logits x ISA runs on the small
widths, every out= variant and thread count inside each case; the wide widths
(1000, 50257) take every layout with few rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent
from fastxent import _core
from fastxent import reference as ref

from conftest import (
    AVAILABLE_ISAS,
    EPS32,
    FLOAT_DTYPES,
    OUT_KINDS,
    RTOL64,
    SMALL_WIDTHS,
    THREADS,
    WIDE_WIDTHS,
    assert_bitwise_equal,
    assert_close,
    assert_scalar_of,
    call_with_out,
    check_grad,
    compute_dtype,
    make_layout,
)

REDUCTIONS = ("mean", "sum", "none")

# Memory layouts of the input; the values are always those of the logical array.
BCE_LAYOUTS = (
    "contiguous",  # (n, C), C order
    "strided",  # a view with steps on both axes (gaps hold NaN)
    "fortran",  # (n, C), F order: transposed memory
    "negative",  # negative strides on both axes
    "readonly",  # contiguous, setflags(write=False)
    "moved_3d",  # (2, m, C) viewed from a (2, C, m) C-order buffer
    "flat",  # 1-D, contiguous
    "flat_reversed",  # 1-D, a negative step of 2 (gaps hold NaN)
)

# The options each part of a matrix case runs with, in turn, so that the
# plain, weighted and pos-weighted paths all meet every layout.
LOSS_OPTIONS = {"mean": (False, False), "sum": (True, False), "none": (True, True)}
GRAD_OPTIONS = {  # out_kind: (reduction, weight, pos_weight)
    "none": ("mean", False, False),
    "prealloc": ("sum", True, True),
    "inplace": ("none", False, True),
}


# --------------------------------------------------------------- helpers


def logical_shape(layout, n, C):
    if layout == "moved_3d":
        return (2, (n + 1) // 2, C)
    if layout in ("flat", "flat_reversed"):
        return (n * C + 3,)
    return (n, C)


def bce_layout(logical, layout):
    """``logical`` laid out in memory as ``layout`` (equal elementwise)."""
    # A copy first: for some shapes a layout is a view of its input (an (n, 1)
    # array is already in F order), and out=logits would overwrite the input.
    logical = np.array(logical, order="C", copy=True)
    if layout in ("contiguous", "strided", "fortran", "negative", "readonly"):
        return make_layout(logical, layout)[0]
    if layout == "moved_3d":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(logical, -1, 1)), 1, -1)
    if layout == "flat":
        return logical.copy()
    if layout == "flat_reversed":
        buf = np.full(2 * logical.size + 1, np.nan, dtype=logical.dtype)
        view = buf[-2::-2]
        view[...] = logical
        return view
    raise AssertionError(layout)


def gaps_of(view):
    """The elements of a gapped layout's buffer that are not in the view."""
    buf = view
    while buf.base is not None:
        buf = buf.base
    mask = np.ones(buf.size, dtype=bool)
    # Mark the view's own elements through their offsets in the buffer.
    start = view.__array_interface__["data"][0] - buf.__array_interface__["data"][0]
    idx = np.zeros(view.shape, dtype=np.int64) + start // view.itemsize
    for ax, stride in enumerate(view.strides):
        shape = [1] * view.ndim
        shape[ax] = view.shape[ax]
        idx = idx + (np.arange(view.shape[ax]) * (stride // view.itemsize)).reshape(shape)
    mask[idx.reshape(-1)] = False
    return buf.reshape(-1)[mask]


def random_bce_logits(rng, shape, dtype):
    return (3.0 * rng.standard_normal(shape)).astype(dtype)


def random_probabilities(rng, shape, dtype):
    return rng.uniform(0.001, 0.999, shape).astype(dtype)


def random_bce_target(rng, shape, dtype):
    """Soft targets in [0, 1], a third of them hard 0 or 1."""
    t = rng.uniform(0.0, 1.0, shape)
    hard = rng.random(shape) < 1 / 3
    t[hard] = np.round(t[hard])
    return t.astype(dtype)


def grad_magnitude(x, t, weight, pos_weight, from_logits, grad_output, base, shape):
    """The size of the terms a gradient element is formed from, elementwise:
    w * (lw * s + pw * t) * |grad_output| / ln(base) (over p (1 - p) for
    probabilities), s = sigmoid(x) or p, lw = 1 + (pw - 1) t.  A float32
    gradient is accurate to a few ulp of this, whatever cancels."""
    x = np.broadcast_to(np.asarray(x, np.float64), shape)
    t = np.broadcast_to(np.asarray(t, np.float64), shape)
    w = 1.0 if weight is None else np.broadcast_to(np.asarray(weight, np.float64), shape)
    pw = 1.0 if pos_weight is None else np.broadcast_to(np.asarray(pos_weight, np.float64), shape)
    lw = 1.0 + (pw - 1.0) * t
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if from_logits:
            s = 1.0 / (1.0 + np.exp(-np.clip(x, -700, 700)))
            mag = lw * s + pw * t
        else:
            mag = (lw * x + pw * t) / np.maximum(x * (1.0 - x), 1e-12)
    lb = 1.0 if base is None else math.log(base)
    return np.abs(w * mag * np.asarray(grad_output, np.float64) / lb)


def assert_close_elementwise(got, expected, compute, magnitude, *, ulps=16, what=""):
    """``got`` within ``ulps`` float32 ulp (or 1e-12, float64) of
    ``max(magnitude, |expected|)`` elementwise; NaN and inf where the reference
    has them."""
    # Positions of NaN and inf first (the bound below is infinite).
    assert_close(got, expected, compute, scale=np.inf, what=what)
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(expected, dtype=np.float64)
    tol = ulps * EPS32 if np.dtype(compute) == np.float32 else RTOL64
    floor = 2.0**-120 if np.dtype(compute) == np.float32 else 1e-300
    finite = np.isfinite(r)
    bound = tol * np.maximum(np.broadcast_to(magnitude, r.shape), np.abs(r)) + floor
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if np.any(bad):
        i = int(np.argmax(np.where(bad, err / bound, 0)))
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements out of tolerance; "
                             f"worst at flat index {i}: got {g.reshape(-1)[i]!r}, ref "
                             f"{r.reshape(-1)[i]!r}, bound {bound.reshape(-1)[i]:.3g}")


def check_loss(got, expected, reduction, ct, shape, what):
    if reduction == "none":
        assert isinstance(got, np.ndarray), f"{what}: {type(got)} is not an array"
        assert got.dtype == ct and got.shape == shape, f"{what}: {got.dtype} {got.shape}"
    else:
        assert_scalar_of(got, ct, what)
    assert_close(got, expected, ct, what=what)


def elementwise(dtype, magnitude):
    """check_grad's comparison for BCE: elementwise, against the gradient's magnitude."""
    return lambda got, expected, scale, what: assert_close_elementwise(
        got, expected, compute_dtype(dtype), magnitude, what=what)


def options(rng, shape, dtype, weight, pos_weight):
    kw = {}
    if weight:  # broadcast over the first axis, or over all but the last
        wshape = (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 and rng.random() < 0.5 \
            else shape[-1:]
        kw["weight"] = rng.uniform(0.0, 2.0, wshape).astype(dtype)
    if pos_weight:
        kw["pos_weight"] = rng.uniform(0.25, 3.0, shape[-1:]).astype(dtype)
    return kw


def check_matrix_case(rng, dtype, C, layout, from_logits, n, threads_list=THREADS):
    ct = compute_dtype(dtype)
    shape = logical_shape(layout, n, C)
    size = math.prod(shape)
    make = random_bce_logits if from_logits else random_probabilities
    logical = make(rng, shape, dtype)
    target = random_bce_target(rng, shape, dtype)
    arr = bce_layout(logical, layout)
    tarr = bce_layout(target, layout)
    common = dict(from_logits=from_logits)

    # ---- loss only, every reduction
    for i, reduction in enumerate(REDUCTIONS):
        threads = threads_list[i % len(threads_list)]
        kw = options(rng, shape, dtype, *LOSS_OPTIONS[reduction])
        got = fastxent.binary_cross_entropy(arr, tarr, reduction=reduction, num_threads=threads,
                                            **kw, **common)
        expected = ref.binary_cross_entropy(logical, target, reduction=reduction, **kw, **common)
        check_loss(got, expected, reduction, ct, shape, f"{reduction} {sorted(kw)} threads={threads}")
        assert np.all(np.isfinite(got))

    # ---- loss and gradient: every out= variant with every thread count
    for out_kind in OUT_KINDS:
        reduction, weight, pos_weight = GRAD_OPTIONS[out_kind]
        kw = options(rng, shape, dtype, weight, pos_weight)
        go = rng.uniform(-2.0, 2.0, shape) if reduction == "none" else 0.75
        ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(
            logical, target, reduction=reduction, grad_output=go, **kw, **common)
        gscale = go if reduction != "mean" else go / size
        mag = grad_magnitude(logical, target, kw.get("weight"), kw.get("pos_weight"),
                             from_logits, gscale, None, shape)
        for threads in threads_list:
            arr = bce_layout(logical, layout)
            what = f"{out_kind} {reduction} {sorted(kw)} threads={threads}"
            call = dict(reduction=reduction, grad_output=go, num_threads=threads, **kw, **common)
            step = call_with_out(
                lambda out: fastxent.binary_cross_entropy_with_grad(arr, tarr, out=out, **call),
                arr, logical, -1, layout, out_kind, what=what,
                gaps=gaps_of if layout in ("strided", "flat_reversed") else None)
            if step is None:
                continue
            (loss, grad), out = step
            check_loss(loss, ref_loss, reduction, ct, shape, what + " loss")
            check_grad(grad, arr, dtype, out, ref_grad, what=what + " grad",
                       close=elementwise(dtype, mag))
    assert_bitwise_equal(tarr, target, what="target was modified")


# ------------------------------------------------- the layout/threads matrix


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("layout", BCE_LAYOUTS)
@pytest.mark.parametrize("C", SMALL_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_widths_full_product(dtype, C, layout, from_logits, isa, rng):
    check_matrix_case(rng, dtype, C, layout, from_logits, n=11)


WIDE_LAYOUTS = ("contiguous", "strided", "fortran", "negative", "flat_reversed")


@pytest.mark.parametrize("layout", WIDE_LAYOUTS)
@pytest.mark.parametrize("C", WIDE_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_wide_widths(dtype, C, layout, isa, rng):
    # from_logits and the thread count turn with the ISA: over the ISAs each
    # layout meets both forms, and each ISA meets both.
    i = AVAILABLE_ISAS.index(isa)
    from_logits = (WIDE_LAYOUTS.index(layout) + i) % 2 == 0
    threads = (THREADS[i % len(THREADS)],)
    check_matrix_case(rng, dtype, C, layout, from_logits, n=2 if C > 10000 else 8, threads_list=threads)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_long_row(dtype, from_logits, isa, rng):
    """One row of 200003 elements: split across threads, bitwise the same."""
    shape = (1, 200_003)
    ct = compute_dtype(dtype)
    x = (random_bce_logits if from_logits else random_probabilities)(rng, shape, dtype)
    t = random_bce_target(rng, shape, dtype)
    pw = rng.uniform(0.5, 2.0, shape[-1:]).astype(dtype)
    ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(x, t, pos_weight=pw, from_logits=from_logits)
    mag = grad_magnitude(x, t, None, pw, from_logits, 1.0 / x.size, None, shape)
    results = []
    for threads in THREADS:
        loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, pos_weight=pw, from_logits=from_logits,
                                                             num_threads=threads)
        assert_close(loss, ref_loss, ct)
        check_grad(grad, x, dtype, None, ref_grad, what=f"threads={threads}",
                   close=elementwise(dtype, mag))
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert_bitwise_equal(loss, results[0][0], what="loss across threads")
        assert_bitwise_equal(grad, results[0][1], what="grad across threads")


# ---------------------------------------------------- options vs reference


@pytest.mark.parametrize("base", [None, 2, 10.0])
@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_options_against_reference(dtype, from_logits, reduction, weight, pos_weight, base, rng):
    ct = compute_dtype(dtype)
    for shape in ((29,), (6, 17), (3, 5, 64)):
        make = random_bce_logits if from_logits else random_probabilities
        x = make(rng, shape, dtype)
        t = random_bce_target(rng, shape, dtype)
        kw = options(rng, shape, dtype, weight, pos_weight)
        kw.update(reduction=reduction, from_logits=from_logits, base=base)
        what = f"shape={shape}"
        got = fastxent.binary_cross_entropy(x, t, **kw)
        check_loss(got, ref.binary_cross_entropy(x, t, **kw), reduction, ct, shape, what)
        go = rng.uniform(-2.0, 2.0, shape) if reduction == "none" else -1.5
        loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, grad_output=go, **kw)
        ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(x, t, grad_output=go, **kw)
        check_loss(loss, ref_loss, reduction, ct, shape, what + " fused")
        assert_close(loss, got, ct, what=what + " fused loss vs loss-only")
        gscale = go / x.size if reduction == "mean" else go
        mag = grad_magnitude(x, t, kw.get("weight"), kw.get("pos_weight"), from_logits, gscale, base, shape)
        check_grad(grad, x, dtype, None, ref_grad, what=what + " grad",
                   close=elementwise(dtype, mag))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_weight_and_pos_weight_broadcasting(dtype, rng):
    ct = compute_dtype(dtype)
    shape = (4, 5, 6)
    x = random_bce_logits(rng, shape, dtype)
    t = random_bce_target(rng, shape, dtype)
    cases = [
        dict(weight=rng.uniform(0, 2, (6,))),
        dict(weight=rng.uniform(0, 2, (5, 6))),
        dict(weight=rng.uniform(0, 2, (4, 1, 1))),
        dict(weight=rng.uniform(0, 2, (4, 5, 6))),
        dict(weight=rng.uniform(0, 2, (1, 5, 1)), pos_weight=rng.uniform(0.5, 3, (6,))),
        dict(pos_weight=rng.uniform(0.5, 3, (1, 6))),
        dict(pos_weight=rng.uniform(0.5, 3, (5, 6))),
        dict(weight=2.0, pos_weight=3.0),
        dict(weight=[0.5, 1, 1.5, 2, 2.5, 3], pos_weight=[1, 2, 3, 4, 5, 6]),
    ]
    for kw in cases:
        kw = {k: (np.asarray(v).astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        what = str({k: np.shape(v) for k, v in kw.items()})
        got = fastxent.binary_cross_entropy(x, t, reduction="none", **kw)
        assert_close(got, ref.binary_cross_entropy(x, t, reduction="none", **kw), ct, what=what)
        _, grad = fastxent.binary_cross_entropy_with_grad(x, t, reduction="sum", **kw)
        ref_grad = ref.binary_cross_entropy_with_grad(x, t, reduction="sum", **kw)[1]
        mag = grad_magnitude(x, t, kw.get("weight"), kw.get("pos_weight"), True, 1.0, None, shape)
        check_grad(grad, x, dtype, None, ref_grad, what=what,
                   close=elementwise(dtype, mag))
    # The weight multiplies the elementwise loss; pos_weight only the positive part.
    w = rng.uniform(0.5, 2, shape).astype(dtype)
    plain = fastxent.binary_cross_entropy(x, t, reduction="none").astype(np.float64)
    assert_close(fastxent.binary_cross_entropy(x, t, weight=w, reduction="none"),
                 plain * w.astype(np.float64), ct, ulps=16)
    ones = np.ones(shape, dtype)
    assert_close(fastxent.binary_cross_entropy(x, ones, pos_weight=np.full(6, 2.0, dtype), reduction="none"),
                 2 * fastxent.binary_cross_entropy(x, ones, reduction="none").astype(np.float64), ct, ulps=16)
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t, weight=np.ones(4, dtype))
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t, pos_weight=np.ones(5, dtype))


# ------------------------------------------------------------- grad_output


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_scalar(dtype, reduction, from_logits, isa, rng):
    ct = compute_dtype(dtype)
    shape = (23, 17)
    x = (random_bce_logits if from_logits else random_probabilities)(rng, shape, dtype)
    t = random_bce_target(rng, shape, dtype)
    kw = dict(weight=rng.uniform(0.5, 2, 17).astype(dtype), reduction=reduction, from_logits=from_logits)
    go = -2.5
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, grad_output=go, **kw)
    ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(x, t, grad_output=go, **kw)
    assert_close(loss, ref_loss, ct)
    gscale = go / x.size if reduction == "mean" else go
    mag = grad_magnitude(x, t, kw["weight"], None, from_logits, gscale, None, shape)
    check_grad(grad, x, dtype, None, ref_grad, what="grad",
               close=elementwise(dtype, mag))
    loss1, grad1 = fastxent.binary_cross_entropy_with_grad(x, t, **kw)
    assert_bitwise_equal(loss, loss1, what="the loss does not depend on grad_output")
    assert_close_elementwise(grad, go * grad1.astype(np.float64), ct, mag)
    for other in (np.float32(go), np.float64(go), np.array(go)):
        assert_bitwise_equal(fastxent.binary_cross_entropy_with_grad(x, t, grad_output=other, **kw)[1], grad)
    assert np.all(fastxent.binary_cross_entropy_with_grad(x, t, grad_output=0.0, **kw)[1] == 0)


@pytest.mark.parametrize("layout", ["contiguous", "fortran", "moved_3d", "flat_reversed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_elementwise(dtype, layout, isa, rng):
    ct = compute_dtype(dtype)
    shape = logical_shape(layout, 12, 9)
    logical = random_bce_logits(rng, shape, dtype)
    target = random_bce_target(rng, shape, dtype)
    arr, tarr = bce_layout(logical, layout), bce_layout(target, layout)
    pw = rng.uniform(0.5, 2, shape[-1:]).astype(dtype)
    go = rng.standard_normal(shape)
    ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(logical, target, pos_weight=pw,
                                                            reduction="none", grad_output=go)
    mag = grad_magnitude(logical, target, None, pw, True, go, None, shape)
    for g in (go, go.astype(dtype), bce_layout(go, layout), go.tolist()):
        loss, grad = fastxent.binary_cross_entropy_with_grad(arr, tarr, pos_weight=pw, reduction="none",
                                                             grad_output=g)
        assert_close(loss, ref_loss, ct)
        check_grad(grad, arr, dtype, None, ref_grad, what="grad",
                   close=elementwise(dtype, mag))
    go0 = go.copy()
    go0.reshape(-1)[1::2] = 0
    _, grad = fastxent.binary_cross_entropy_with_grad(arr, tarr, reduction="none", grad_output=go0)
    assert np.all(np.ascontiguousarray(grad).reshape(-1)[1::2] == 0)
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy_with_grad(arr, tarr, reduction="sum", grad_output=go)


# ------------------------------------------------------------ PyTorch oracle


# (from_logits, weight, pos_weight): torch has no pos_weight on probabilities.
TORCH_CASES = [(True, False, False), (True, True, False), (True, False, True), (True, True, True),
               (False, False, False), (False, True, False)]


@pytest.mark.parametrize("shape", [(7,), (13, 17), (3, 4, 9)])
@pytest.mark.parametrize("from_logits,weight,pos_weight", TORCH_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_against_torch(dtype, from_logits, weight, pos_weight, shape, rng):
    """Every reduction, loss and autograd gradient."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ct = compute_dtype(dtype)
    x = (random_bce_logits if from_logits else random_probabilities)(rng, shape, dtype)
    if not from_logits:  # the clamped ends, and p = 1/2
        x.reshape(-1)[:3] = [0.0, 1.0, 0.5]
    t = random_bce_target(rng, shape, dtype)
    kw = options(rng, shape, dtype, weight, pos_weight)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64))
    tkw = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in kw.items()}
    for reduction in REDUCTIONS:
        if from_logits:
            expected = F.binary_cross_entropy_with_logits(xt, tt, reduction=reduction, **tkw)
        else:
            expected = F.binary_cross_entropy(xt, tt, reduction=reduction, **tkw)
        go = rng.standard_normal(shape) if reduction == "none" else 0.6
        t_grad, = torch.autograd.grad(expected, xt, torch.tensor(go, dtype=torch.float64))
        loss, grad = fastxent.binary_cross_entropy_with_grad(
            x, t, reduction=reduction, from_logits=from_logits, grad_output=go, **kw)
        check_loss(loss, expected.detach().numpy(), reduction, ct, shape, f"{reduction} loss vs torch")
        gscale = go / x.size if reduction == "mean" else go
        mag = grad_magnitude(x, t, kw.get("weight"), kw.get("pos_weight"), from_logits, gscale, None, shape)
        check_grad(grad, x, dtype, None, t_grad.numpy(), what=f"{reduction} grad vs torch",
                   close=elementwise(dtype, mag))


def test_torch_tensors_as_input(rng):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 10, generator=g)
    t = torch.rand(12, 10, generator=g)
    got = fastxent.binary_cross_entropy(x, t, reduction="none")
    assert_bitwise_equal(got, fastxent.binary_cross_entropy(x.numpy(), t.numpy(), reduction="none"))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
    assert_close(got, expected.numpy(), np.float32)
    got_t = fastxent.binary_cross_entropy(x.t(), t.t(), reduction="none")
    assert_close(got_t, expected.numpy().T, np.float32)


# ------------------------------------------------------- finite differences


def _fourth_order(f, x, direction, h):
    return (-f(x + 2 * h * direction) + 8 * f(x + h * direction)
            - 8 * f(x - h * direction) + f(x - 2 * h * direction)) / (12 * h)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_gradient_finite_differences(from_logits, reduction, rng):
    shape = (4, 5)
    if from_logits:
        x, h = random_bce_logits(rng, shape, np.float64), 1e-3
    else:
        x, h = rng.uniform(0.05, 0.95, shape), 1e-5
    t = random_bce_target(rng, shape, np.float64)
    kw = dict(weight=rng.uniform(0.5, 2, (5,)), pos_weight=rng.uniform(0.5, 3, (5,)),
              reduction=reduction, from_logits=from_logits, base=2)
    # Elementwise: perturbing every element at once gives every partial derivative.
    e = np.ones_like(x)
    if reduction == "none":
        go = rng.uniform(0.5, 2.0, shape)
        _, grad = fastxent.binary_cross_entropy_with_grad(x, t, grad_output=go, **kw)
        fd = _fourth_order(lambda v: fastxent.binary_cross_entropy(v, t, **kw).astype(np.float64), x, e, h)
        np.testing.assert_allclose(grad, go * fd, rtol=1e-7, atol=1e-9)
    else:
        _, grad = fastxent.binary_cross_entropy_with_grad(x, t, **kw)
        fd = np.empty_like(x)
        for idx in np.ndindex(shape):
            d = np.zeros_like(x)
            d[idx] = 1.0
            fd[idx] = _fourth_order(lambda v: float(fastxent.binary_cross_entropy(v, t, **kw)), x, d, h)
        np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ edges


@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_very_large_logits(dtype, pos_weight, isa):
    """|x| of 1e4, 88, 89, 100, 1e30: finite, and the exact loss."""
    ct = compute_dtype(dtype)
    mags = [0.0, 1.0, 20.0, 88.0, 89.0, 100.0, 1e4, 1e30]
    xs = np.array([s * m for m in mags for s in (1.0, -1.0)])
    ts = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    x = np.repeat(xs, ts.size).astype(dtype)
    t = np.tile(ts, xs.size).astype(dtype)
    pw = None if pos_weight is None else np.full(x.shape, pos_weight, dtype)
    got = fastxent.binary_cross_entropy(x, t, pos_weight=pw, reduction="none")
    assert np.all(np.isfinite(got)), x[~np.isfinite(got)]
    expected = ref.binary_cross_entropy(x, t, pos_weight=pw, reduction="none")
    assert_close(got, expected, ct)
    # Exactly: x (1 - t) for large positive x, -x t pw for large negative x.
    big = np.abs(x.astype(np.float64)) >= 1e4
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    pw64 = 1.0 if pos_weight is None else pos_weight
    exact = np.where(x64 > 0, x64 * (1 - t64), -x64 * t64 * pw64)
    assert_close(got[big], exact[big], ct)
    # x = 0: -(pw t + 1 - t) log(1/2) = lw ln 2, with lw = 1 + (pw - 1) t.
    zero = x64 == 0
    lw = 1 + (pw64 - 1) * t64
    assert_close(got[zero], (math.log(2) * lw)[zero], ct)
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, pos_weight=pw, reduction="sum")
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert_close(loss, expected.sum(), ct)
    ref_grad = ref.binary_cross_entropy_with_grad(x, t, pos_weight=pw, reduction="sum")[1]
    check_grad(grad, x, dtype, None, ref_grad, what="grad",
               close=elementwise(dtype, grad_magnitude(x, t, None, pw, True, 1.0, None, x.shape)))
    # Saturated sigmoid: the gradient is lw - pw t = 1 - t for large x, -pw t for large -x.
    sat = np.abs(x64) >= 100
    assert_close(grad[sat], np.where(x64 > 0, 1 - t64, -pw64 * t64)[sat], ct)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_probabilities_at_zero_and_one(dtype):
    """Logs clamped at -100 (loss 100 at most); the gradient is torch's."""
    torch = pytest.importorskip("torch")
    ct = compute_dtype(dtype)
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1e-30, 1 - 2.0**-24], dtype=dtype)
    t = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.5, 1.0, 0.0], dtype=dtype)
    got = fastxent.binary_cross_entropy(p, t, from_logits=False, reduction="none")
    np.testing.assert_array_equal(got[:4], [100.0, 100.0, 0.0, 0.0])
    assert_close(got, ref.binary_cross_entropy(p, t, from_logits=False, reduction="none"), ct)
    pt = torch.tensor(p.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64))
    expected = torch.nn.functional.binary_cross_entropy(pt, tt, reduction="sum")
    expected.backward()
    loss, grad = fastxent.binary_cross_entropy_with_grad(p, t, from_logits=False, reduction="sum")
    assert_close(loss, expected.item(), ct)
    t_grad = pt.grad.numpy()
    assert np.all(np.isfinite(grad))
    assert_close_elementwise(grad, t_grad, ct, np.abs(t_grad))
    ref_grad = ref.binary_cross_entropy_with_grad(p, t, from_logits=False, reduction="sum")[1]
    assert_close_elementwise(grad, ref_grad, ct, np.abs(t_grad))


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_input(dtype, from_logits):
    ct = compute_dtype(dtype)
    for shape in ((0,), (0, 5), (3, 0), (2, 0, 4)):
        x = np.zeros(shape, dtype=dtype)
        mean = fastxent.binary_cross_entropy(x, x, from_logits=from_logits)
        assert_scalar_of(mean, ct)
        assert np.isnan(mean)
        total = fastxent.binary_cross_entropy(x, x, reduction="sum", from_logits=from_logits)
        assert_scalar_of(total, ct)
        assert total == 0
        none = fastxent.binary_cross_entropy(x, x, reduction="none", from_logits=from_logits)
        assert none.shape == shape and none.dtype == ct
        loss, grad = fastxent.binary_cross_entropy_with_grad(x, x, from_logits=from_logits)
        assert np.isnan(loss) and grad.shape == shape and grad.dtype == dtype
        loss, grad = fastxent.binary_cross_entropy_with_grad(x, x, reduction="sum", from_logits=from_logits)
        assert loss == 0 and grad.shape == shape


@pytest.mark.parametrize("where", ["logits", "target"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("C", [7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_poisons_its_element_only(dtype, C, from_logits, where, isa, rng):
    ct = compute_dtype(dtype)
    x = (random_bce_logits if from_logits else random_probabilities)(rng, (5, C), dtype)
    t = random_bce_target(rng, (5, C), dtype)
    (x if where == "logits" else t)[2, C // 2] = np.nan
    poisoned = np.zeros(x.shape, bool)
    poisoned[2, C // 2] = True
    kw = dict(from_logits=from_logits)
    got = fastxent.binary_cross_entropy(x, t, reduction="none", **kw)
    assert np.array_equal(np.isnan(got), poisoned)
    assert_close(got, ref.binary_cross_entropy(x, t, reduction="none", **kw), ct)
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, reduction="none", **kw)
    assert np.array_equal(np.isnan(loss), poisoned)
    assert np.array_equal(np.isnan(grad), poisoned)
    ref_grad = ref.binary_cross_entropy_with_grad(x, t, reduction="none", **kw)[1]
    check_grad(grad, x, dtype, None, ref_grad, what="grad",
               close=elementwise(dtype, grad_magnitude(x, t, None, None, from_logits, 1.0, None, x.shape)))
    assert np.isnan(fastxent.binary_cross_entropy(x, t, **kw))
    assert np.isnan(fastxent.binary_cross_entropy(x, t, reduction="sum", **kw))
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, **kw)
    assert np.isnan(loss) and np.array_equal(np.isnan(grad), poisoned)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_edges_in_vector_blocks(dtype, isa, rng):
    """Probabilities are taken 8 at a time with the project's log; 0, 1, 1/2,
    the neighbours of 1/2 (where log1p(-p) changes method), the tiniest
    values (log clamped at -100, as torch) and 1 - ulp sit inside vector
    blocks of 37-wide rows, and match the reference elementwise."""
    C = 37
    p = random_probabilities(rng, (4, C), dtype)
    tiny = np.finfo(dtype).smallest_subnormal
    edges = [0.0, 1.0, 0.5, np.nextafter(dtype(0.5), dtype(0)), np.nextafter(dtype(0.5), dtype(1)),
             tiny, 1e-30, np.nextafter(dtype(1), dtype(0)), 1e-3, 0.999]
    p[0, : len(edges)] = edges
    p[1, 8 : 8 + len(edges)] = edges[::-1]
    t = random_bce_target(rng, (4, C), dtype)
    ct = compute_dtype(dtype)
    kw = dict(from_logits=False, reduction="none")
    got = fastxent.binary_cross_entropy(p, t, **kw)
    want = ref.binary_cross_entropy(p, t, **kw)
    assert np.all(np.isfinite(got))
    assert_close(got, want, ct)
    loss, grad = fastxent.binary_cross_entropy_with_grad(p, t, **kw)
    assert_bitwise_equal(loss, got, what="loss")
    ref_grad = ref.binary_cross_entropy_with_grad(p, t, **kw)[1]
    check_grad(grad, p, dtype, None, ref_grad, what="grad",
               close=elementwise(dtype, grad_magnitude(p, t, None, None, False, 1.0, None, p.shape)))


def test_seeds():
    """x = 0 costs ln 2 whatever the target; a confident right answer ~0."""
    x = np.array([0.0, 0.0, 0.0, 10.0, -10.0])
    t = np.array([0.0, 1.0, 0.5, 1.0, 0.0])
    got = fastxent.binary_cross_entropy(x, t, reduction="none")
    assert_close(got[:3], [math.log(2)] * 3, np.float64)
    assert_close(got[3:], [math.log1p(math.exp(-10))] * 2, np.float64)
    assert got[3] > 0 and got[3] < 5e-5
    assert_close(fastxent.binary_cross_entropy(x, t, reduction="none", base=2)[:3], [1.0] * 3, np.float64)
    _, grad = fastxent.binary_cross_entropy_with_grad(x, t, reduction="sum")
    assert_close(grad[:3], [0.5, -0.5, 0.0], np.float64)
    # Probabilities: -log(0.7) - log(0.8) - log(0.9), as the three doors.
    p = np.array([0.7, 0.2, 0.9])
    y = np.array([1.0, 0.0, 1.0])
    total = fastxent.binary_cross_entropy(p, y, from_logits=False, reduction="sum")
    assert round(float(total), 3) == 0.685
    assert_close(total, -(math.log(0.7) + math.log(0.8) + math.log(0.9)), np.float64)


def test_errors(rng):
    x = rng.uniform(0, 1, (4, 3))
    t = rng.uniform(0, 1, (4, 3))
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x + 1.5, t, from_logits=False)
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t - 1.5, from_logits=False)
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t, reduction="batchmean")
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t[:, :2])
    with pytest.raises(ValueError):
        fastxent.binary_cross_entropy(x, t, base=0)
    with pytest.raises(TypeError):
        fastxent.binary_cross_entropy(x.astype(np.complex128), t)
    for out in (np.empty((4, 3), np.float32), np.empty((3, 4)), "no"):
        with pytest.raises((ValueError, TypeError)):
            fastxent.binary_cross_entropy_with_grad(x, t, out=out)
    with pytest.raises(ValueError):  # out may be logits, but no other input
        fastxent.binary_cross_entropy_with_grad(x, t, out=t)


# ------------------------------------------------------------- inputs, out=


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_is_logits_in_place(dtype, from_logits, rng):
    ct = compute_dtype(dtype)
    x = (random_bce_logits if from_logits else random_probabilities)(rng, (64, 50), dtype)
    t = random_bce_target(rng, (64, 50), dtype)
    pw = rng.uniform(0.5, 2, 50).astype(dtype)
    kw = dict(pos_weight=pw, from_logits=from_logits)
    ref_loss, ref_grad = ref.binary_cross_entropy_with_grad(x.copy(), t, **kw)
    mag = grad_magnitude(x.copy(), t, None, pw, from_logits, 1 / x.size, None, x.shape)
    buf = x
    loss, grad = fastxent.binary_cross_entropy_with_grad(buf, t, out=buf, **kw)
    assert grad is buf or (np.shares_memory(grad, buf) and grad.shape == buf.shape)
    assert_close(loss, ref_loss, ct)
    assert_close_elementwise(buf, ref_grad, ct, mag)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_prealloc_strided(dtype, rng):
    ct = compute_dtype(dtype)
    x = random_bce_logits(rng, (20, 33), dtype)
    t = random_bce_target(rng, (20, 33), dtype)
    ref_grad = ref.binary_cross_entropy_with_grad(x, t)[1]
    mag = grad_magnitude(x, t, None, None, True, 1 / x.size, None, x.shape)
    for out in (np.empty((33, 20), dtype).T, np.full((20, 70), np.nan, dtype)[:, ::2][:, :33],
                np.empty((20, 33), dtype)[::-1]):
        _, grad = fastxent.binary_cross_entropy_with_grad(x, t, out=out)
        assert np.shares_memory(grad, out)
        assert_close_elementwise(out, ref_grad, ct, mag)


def test_mixed_target_dtype(rng):
    x = random_bce_logits(rng, (20, 9), np.float32)
    t64 = rng.uniform(0, 1, (20, 9))
    assert_close(fastxent.binary_cross_entropy(x, t64), ref.binary_cross_entropy(x, t64), np.float32)
    x64 = x.astype(np.float64)
    t32 = t64.astype(np.float32)
    assert_close(fastxent.binary_cross_entropy(x64, t32), ref.binary_cross_entropy(x64, t32), np.float64)
    # Integer (hard) targets.
    ti = rng.integers(0, 2, (20, 9))
    assert_close(fastxent.binary_cross_entropy(x64, ti), ref.binary_cross_entropy(x64, ti), np.float64)


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("shape", [(257, 1000), (64, 17), (3, 50257), (1, 100003), (100003,)],
                         ids=["many_rows", "narrow", "vocab", "one_row", "flat"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitwise_identical_across_threads_and_isas(dtype, shape, rng):
    x = random_bce_logits(rng, shape, dtype)
    p = random_probabilities(rng, shape, dtype)
    t = random_bce_target(rng, shape, dtype)
    pw = rng.uniform(0.5, 2, shape[-1:]).astype(dtype)
    previous = _core.get_isa()
    baseline = None
    try:
        for name in AVAILABLE_ISAS:
            _core.set_isa(name)
            for threads in (1, 2, 3, 4, None):
                kw = dict(num_threads=threads)
                results = {
                    "logits_none": fastxent.binary_cross_entropy(x, t, pos_weight=pw, reduction="none", **kw),
                    "logits_grad": fastxent.binary_cross_entropy_with_grad(x, t, pos_weight=pw, **kw),
                    "probs_grad": fastxent.binary_cross_entropy_with_grad(p, t, from_logits=False,
                                                                          reduction="sum", **kw),
                }
                if baseline is None:
                    baseline = results
                    continue
                for key, value in results.items():
                    where = f"{key} isa={name} threads={threads}"
                    if isinstance(value, tuple):
                        assert_bitwise_equal(value[0], baseline[key][0], what=f"{where} loss")
                        assert_bitwise_equal(value[1], baseline[key][1], what=f"{where} grad")
                    else:
                        assert_bitwise_equal(value, baseline[key], what=where)
    finally:
        _core.set_isa(previous)
