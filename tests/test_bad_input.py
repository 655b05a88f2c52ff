"""Every class of bad input gives a ValueError or TypeError whose message
names the argument and the offending value -- never a crash, never an
AttributeError/SystemError/IndexError from deep inside, never silence.

The first part checks the messages of every function; the last part the
exception type of each class of bad input to the core functions.  Where the
contract (docs/API.md) says ValueError, a TypeError is accepted for
arguments of the wrong *type* (a list for out=, a string for a number), and
vice versa nothing else is.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

import fastxent
from fastxent import reference
from conftest import each_isa


N, C = 4, 5
BAD = (ValueError, TypeError)


def _x(shape=(N, C), dtype=np.float64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _probs(shape=(N, C)):
    p = np.random.default_rng(1).random(shape) + 0.1
    return p / p.sum(-1, keepdims=True)


# Every public function that takes arrays, with a builder of a valid call:
# name -> (kind, positional args).  kind: "ce", "block", "norm" (out=), "kl", "bce".
CALLS = {
    "cross_entropy": "ce",
    "cross_entropy_with_grad": "ce",
    "logsumexp": "block",
    "entropy": "block",
    "log_softmax": "norm",
    "softmax": "norm",
    "kl_div": "kl",
    "kl_div_with_grad": "kl",
    "binary_cross_entropy": "bce",
    "binary_cross_entropy_with_grad": "bce",
}
ALL = sorted(CALLS)
WITH_AXIS = [n for n in ALL if CALLS[n] != "bce"]
WITH_BASE = [n for n in ALL if CALLS[n] in ("ce", "kl", "bce")] + ["entropy"]
WITH_REDUCTION = [n for n in ALL if CALLS[n] in ("ce", "kl", "bce")]
WITH_OUT = [n for n in ALL if n.endswith("_with_grad") or CALLS[n] == "norm"]
WITH_GRAD = [n for n in ALL if n.endswith("_with_grad")]
CE = [n for n in ALL if CALLS[n] == "ce"]
KL = [n for n in ALL if CALLS[n] == "kl"]
BCE = [n for n in ALL if CALLS[n] == "bce"]
TWO_ARG = [n for n in ALL if CALLS[n] in ("ce", "kl", "bce")]


def second_arg(name, x, axis=-1):
    """A valid second argument (labels / target) for logits ``x``."""
    kind = CALLS[name]
    x = np.asarray(x)
    if not (isinstance(axis, (int, np.integer)) and x.ndim and -x.ndim <= axis < x.ndim):
        axis = -1  # a bad axis is what is tested: any labels will do
    if kind == "ce":
        batch = tuple(np.delete(np.array(x.shape, dtype=np.int64), axis)) if x.ndim else ()
        return np.zeros(tuple(int(b) for b in batch), dtype=np.int64)
    if kind == "kl":
        return np.full(x.shape, 1.0 / max(x.shape[axis], 1)) if x.ndim else np.float64(1.0)
    if kind == "bce":
        return np.full(x.shape, 0.5)
    return None


def call(name, x=None, second=None, **kw):
    fn = getattr(fastxent, name)
    x = _x() if x is None else x
    if CALLS[name] in ("ce", "kl", "bce"):
        if second is None:
            second = second_arg(name, x, kw.get("axis", -1))
        return fn(x, second, **kw)
    return fn(x, **kw)


def expect(exc, fn, *needles):
    """``fn()`` raises ``exc``; its message contains every needle (case-insensitive)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"message {msg!r} does not mention {needle!r}"
    return msg


# ------------------------------------------------------------------ wrong ndim / shapes


@pytest.mark.parametrize("name", [n for n in ALL if CALLS[n] != "bce"])
def test_zero_dimensional_logits(name):
    expect(ValueError, lambda: call(name, np.float64(1.0), np.float64(1.0) if CALLS[name] != "ce" else np.int64(0)),
           "dimension")


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("labels", [np.zeros((N, 2), np.int64), np.zeros((N, C, 1), np.int64),
                                    np.zeros((), np.int64), np.zeros(N + 1, np.int64), np.zeros(N - 1, np.int64)],
                         ids=["2d", "3d", "0d", "long", "short"])
def test_integer_labels_of_the_wrong_shape(name, labels):
    expect(ValueError, lambda: call(name, _x(), labels), "labels", str(labels.shape), str((N,)))


@pytest.mark.parametrize("name", CE)
def test_integer_labels_of_the_logits_shape(name):
    """Integer labels shaped like the logits (a one-hot matrix?) are not class indices."""
    one_hot = np.eye(C, dtype=np.int64)[np.arange(N) % C]
    expect(ValueError, lambda: call(name, _x(), one_hot), "labels", str(one_hot.shape))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_floating_labels_of_the_batch_shape(name, dtype):
    """Floating class indices (labels.astype(float)) are not probabilities."""
    lab = np.arange(N).astype(dtype)
    expect(ValueError, lambda: call(name, _x(), lab), "labels", str(lab.shape), str((N, C)))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("shape", [(N, C + 1), (N + 1, C), (C, N), (N, C, 1), (1, N, C)])
def test_soft_labels_of_the_wrong_shape(name, shape):
    expect(ValueError, lambda: call(name, _x(), np.full(shape, 0.2)), "labels", str(shape))


@pytest.mark.parametrize("name", KL + BCE)
@pytest.mark.parametrize("shape", [(N, C + 1), (N + 1, C), (C, N), (N, C, 1), (C,), ()])
def test_target_of_the_wrong_shape(name, shape):
    expect(ValueError, lambda: call(name, _x(), np.full(shape, 0.2)), "target", str(shape))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("wshape", [(C - 1,), (C + 1,), (1, C), (C, 1), (0,), ()])
def test_weight_of_the_wrong_shape(name, wshape):
    w = np.ones(wshape)
    expect(ValueError, lambda: call(name, weight=w), "weight", str(wshape))


@pytest.mark.parametrize("name", BCE)
@pytest.mark.parametrize("param", ["weight", "pos_weight"])
@pytest.mark.parametrize("wshape", [(C - 1,), (N + 1, C), (N, C, 2)])
def test_bce_weights_that_do_not_broadcast(name, param, wshape):
    expect(ValueError, lambda: call(name, **{param: np.ones(wshape)}), param, str(wshape))


@pytest.mark.parametrize("name", WITH_GRAD)
@pytest.mark.parametrize("reduction,gshape", [("none", (N - 1,)), ("none", (N, 1, 1)), ("mean", (N,)),
                                              ("sum", (1,))])
def test_grad_output_of_the_wrong_shape(name, reduction, gshape):
    if CALLS[name] == "bce" and gshape == (N,):
        gshape = (N, C + 1)
    expect(ValueError, lambda: call(name, reduction=reduction, grad_output=np.ones(gshape)),
           "grad_output", str(gshape))


# ------------------------------------------------------------------ labels out of range


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("value", [C, C + 7, -1, -101, -99, 2**31, 2**63 - 1, -(2**63)])
def test_label_out_of_range_names_value_and_position(name, value):
    lab = np.array([0, 1, value, 2], dtype=np.int64)
    expect(ValueError, lambda: call(name, _x(), lab), "label", str(value), "(2,)", f"[0, {C})")


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**64 - 100, 2**64 - C])
def test_uint64_labels_beyond_int64(name, value):
    """2**64 - 100 is -100 (the default ignore_index) once wrapped to int64: it
    must still be rejected, and shown as the value the caller passed."""
    lab = np.array([0, value, 1, 2], dtype=np.uint64)
    expect(ValueError, lambda: call(name, _x(), lab), "label", str(value), "(1,)")


@pytest.mark.parametrize("pos", [0, 255, 256, 257, 511, 700, 999])
def test_first_bad_label_in_a_long_batch_on_every_isa(pos):
    """The check takes labels in blocks on vector ISAs; the error still names
    the first bad label, after ignored ones and before a later bad one, and
    the count of labels that are not ignored sets the mean."""
    rng = np.random.default_rng(pos)
    x = rng.standard_normal((1000, C))
    lab = rng.integers(0, C, 1000)
    lab[::7] = -100
    want = np.mean(reference.cross_entropy(x, lab, reduction="none")[lab != -100])
    bad = lab.copy()
    bad[pos + 1 :] = -5
    bad[pos] = C + 3
    for isa in each_isa():
        np.testing.assert_allclose(fastxent.cross_entropy(x, lab), want, rtol=1e-12, err_msg=isa)
        expect(ValueError, lambda: fastxent.cross_entropy(x, bad), "label", str(C + 3), f"({pos},)")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positions", [(35000,), (5, 35000), (34999, 35000), (511, 512),
                                       (69999,), (0, 69999)])
def test_first_bad_label_in_threads_and_blocks(positions, dtype, threads):
    """The loss alone checks each block of labels as its rows run, on every
    thread: the error names the job's first bad label wherever the blocks
    and the threads' ranges fall, and the mean counts the unignored rows."""
    rng = np.random.default_rng(len(positions))
    n = 70000
    x = rng.standard_normal((n, C)).astype(dtype)
    lab = rng.integers(0, C, n)
    lab[::5] = -100
    want = np.mean(reference.cross_entropy(x, lab, reduction="none")[lab != -100])
    got = fastxent.cross_entropy(x, lab, num_threads=threads)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    # The blocks' sums (some shared by two threads' ranges) give the bits
    # of one thread, and of the gradient's call, which sums after the rows.
    assert got == fastxent.cross_entropy(x, lab, num_threads=1)
    assert got == fastxent.cross_entropy_with_grad(x, lab, num_threads=threads)[0]
    bad = lab.copy()
    for p in positions:
        bad[p] = C + p
    g = np.full_like(x, 3.0)
    for isa in each_isa():
        expect(ValueError, lambda: fastxent.cross_entropy(x, bad, num_threads=threads), "label",
               str(C + positions[0]), f"({positions[0]},)")
        # With a gradient the labels are checked (over the threads) first.
        expect(ValueError,
               lambda: fastxent.cross_entropy_with_grad(x, bad, num_threads=threads, out=g),
               "label", str(C + positions[0]), f"({positions[0]},)")
        assert np.all(g == 3.0), isa
        assert fastxent.cross_entropy(x, lab, num_threads=threads) == got, isa


@pytest.mark.parametrize("name", CE)
def test_label_position_in_a_multidimensional_batch(name):
    x = _x((2, C, 3))
    lab = np.zeros((2, 3), dtype=np.int64)
    lab[1, 2] = C
    expect(ValueError, lambda: call(name, x, lab, axis=1), str(C), "(1, 2)")


@pytest.mark.parametrize("name", CE)
def test_label_equal_to_default_ignore_index_is_bad_with_another_ignore_index(name):
    lab = np.array([0, -100, 1, 2])
    expect(ValueError, lambda: call(name, _x(), lab, ignore_index=-1), "-100", "(1,)")


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("ii", [2**63, -(2**63) - 1, 2**100])
def test_ignore_index_that_does_not_fit_int64(name, ii):
    expect(ValueError, lambda: call(name, ignore_index=ii), "ignore_index", str(ii))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("ii", [1.5, None, "a", np.float64(-100.0)])
def test_ignore_index_that_is_not_an_integer(name, ii):
    expect(TypeError, lambda: call(name, ignore_index=ii), "ignore_index", repr(ii) if ii is not None else "None")


@pytest.mark.parametrize("name", CE)
def test_bad_label_leaves_out_and_logits_untouched(name):
    x = _x()
    before = x.copy()
    lab = np.array([0, 1, C, 2])
    kw = {"out": x} if name.endswith("_with_grad") else {}
    with pytest.raises(ValueError):
        call(name, x, lab, **kw)
    assert np.array_equal(x, before)


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("bad,shown", [(math.nan, "nan"), (-1.0, "-1"), (math.inf, "inf"), (-math.inf, "-inf"),
                                       (-1e-300, "-1e-300")])
def test_weight_nan_negative_or_infinite(name, bad, shown):
    w = np.ones(C)
    w[3] = bad
    expect(ValueError, lambda: call(name, weight=w), "weight", shown, "3")


@pytest.mark.parametrize("name", CE)
def test_weight_that_overflows_the_compute_dtype_names_the_value_given(name):
    """1e300 is finite and positive, but not as float32: the message must say
    what the problem is with the value the caller passed (not 'inf')."""
    w = np.ones(C)
    w[1] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflowing cast may warn too
        expect(ValueError, lambda: call(name, _x(dtype=np.float32), weight=w), "weight", "1e+300")


@pytest.mark.parametrize("name", BCE)
@pytest.mark.parametrize("param", ["weight", "pos_weight"])
@pytest.mark.parametrize("bad,shown", [(math.nan, "nan"), (-1.0, "-1")])
def test_bce_weight_nan_or_negative(name, param, bad, shown):
    """Like cross_entropy's weight (and torch's pos_weight contract): finite, >= 0."""
    w = np.ones(C)
    w[2] = bad
    expect(ValueError, lambda: call(name, **{param: w}), param, shown)


# ------------------------------------------------------------------ dtypes


NON_NUMERIC = {
    "complex128": np.zeros((N, C), np.complex128),
    "complex64": np.zeros((N, C), np.complex64),
    "object": np.zeros((N, C)).astype(object),
    "str": np.full((N, C), "a"),
    "bytes": np.full((N, C), b"a"),
    "datetime": np.zeros((N, C), "datetime64[s]"),
    "timedelta": np.zeros((N, C), "timedelta64[s]"),
    "void": np.zeros((N, C), "V8"),
    "structured": np.zeros((N, C), [("a", "f8")]),
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", sorted(NON_NUMERIC))
def test_non_numeric_logits(name, kind):
    x = NON_NUMERIC[kind]
    second = None
    if CALLS[name] in ("kl", "bce"):
        second = np.full((N, C), 0.2)
    elif CALLS[name] == "ce":
        second = np.zeros(N, np.int64)
    msg = expect(TypeError, lambda: call(name, x, second), str(x.dtype))
    assert re.search(r"\b(logits|x)\b", msg), msg


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("kind", sorted(NON_NUMERIC))
def test_non_numeric_labels(name, kind):
    bad = NON_NUMERIC[kind]
    for lab in (bad, bad[:, 0]):
        expect(TypeError, lambda: call(name, _x(), lab), "labels", str(lab.dtype))


@pytest.mark.parametrize("name", CE)
def test_bool_labels(name):
    lab = np.array([True, False, True, False])
    expect(TypeError, lambda: call(name, _x(), lab), "labels", "bool")


@pytest.mark.parametrize("name", CE)
def test_labels_too_big_for_any_integer_dtype(name):
    """Python ints beyond uint64 make an object array."""
    expect(TypeError, lambda: call(name, _x(), [2**70, 0, 1, 2]), "labels", "object")


@pytest.mark.parametrize("name", KL + BCE)
@pytest.mark.parametrize("kind", sorted(NON_NUMERIC))
def test_non_numeric_target(name, kind):
    expect(TypeError, lambda: call(name, _x(), NON_NUMERIC[kind]), "target", str(NON_NUMERIC[kind].dtype))


@pytest.mark.parametrize("name", CE + BCE)
@pytest.mark.parametrize("kind", ["complex128", "object", "str"])
def test_non_numeric_weight(name, kind):
    w = NON_NUMERIC[kind][0]
    expect(TypeError, lambda: call(name, weight=w), "weight", str(w.dtype))


# ------------------------------------------------------------------ zero-size arrays


@pytest.mark.parametrize("name", [n for n in ALL if CALLS[n] != "bce"])
@pytest.mark.parametrize("shape,axis", [((N, 0), -1), ((0, 0), -1), ((0, N), 0), ((2, 0, 3), 1), ((0,), 0)])
def test_no_classes(name, shape, axis):
    x = np.zeros(shape)
    expect(ValueError, lambda: call(name, x, axis=axis), "C == 0")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape,axis", [((0, C), -1), ((C, 0), 0), ((2, 0, 3), -1), ((0, C, 3), 1), ((3, C, 0), 1)])
def test_empty_batch(name, shape, axis):
    """An empty batch is valid: mean NaN, sum 0, none / gradients empty."""
    x = np.zeros(shape)
    kw = {} if CALLS[name] == "bce" else {"axis": axis}
    res = call(name, x, **kw)
    if CALLS[name] in ("ce", "kl", "bce"):
        loss = res[0] if name.endswith("_with_grad") else res
        assert np.isnan(loss)
        summed = call(name, x, reduction="sum", **kw)
        summed = summed[0] if name.endswith("_with_grad") else summed
        assert summed == 0
        if name.endswith("_with_grad"):
            assert res[1].shape == x.shape
        per = call(name, x, reduction="none", **kw)
        per = per[0] if name.endswith("_with_grad") else per
        assert np.asarray(per).size == 0
    elif CALLS[name] == "norm":
        assert res.shape == x.shape
    else:
        assert np.asarray(res).size == 0


# ------------------------------------------------------------------ out=


def _out_kw_call(name, out, x=None, **kw):
    return call(name, x, out=out, **kw)


@pytest.mark.parametrize("name", WITH_OUT)
@pytest.mark.parametrize("shape", [(N, C + 1), (N + 1, C), (C, N), (N * C,), (N, C, 1), ()])
def test_out_of_the_wrong_shape(name, shape):
    out = np.empty(shape)
    expect(ValueError, lambda: _out_kw_call(name, out), "out", str(shape))


@pytest.mark.parametrize("name", WITH_OUT)
@pytest.mark.parametrize("x_dtype,out_dtype", [(np.float64, np.float32), (np.float32, np.float64),
                                               (np.float16, np.float32), (np.float32, np.float16),
                                               (np.float64, np.int64), (np.float64, np.complex128),
                                               (np.float64, ">f8")])
def test_out_of_the_wrong_dtype(name, x_dtype, out_dtype):
    out = np.empty((N, C), out_dtype)
    expect(ValueError, lambda: _out_kw_call(name, out, _x(dtype=x_dtype)), "out", str(np.dtype(out_dtype)))


@pytest.mark.parametrize("name", WITH_OUT)
def test_read_only_out(name):
    out = np.empty((N, C))
    out.flags.writeable = False
    expect(ValueError, lambda: _out_kw_call(name, out), "out", "read-only")


@pytest.mark.parametrize("name", WITH_OUT)
def test_broadcast_out_is_read_only(name):
    out = np.broadcast_to(np.empty(C), (N, C))
    expect(ValueError, lambda: _out_kw_call(name, out), "out")


@pytest.mark.parametrize("name", WITH_OUT)
def test_read_only_logits_as_out(name):
    x = _x()
    x.flags.writeable = False
    expect(ValueError, lambda: _out_kw_call(name, x, x), "out", "read-only")


@pytest.mark.parametrize("name", WITH_OUT)
@pytest.mark.parametrize("out", [[[0.0] * C] * N, (1, 2), 3.0, np.float64(0.0), "out"],
                         ids=["list", "tuple", "float", "npscalar", "str"])
def test_out_that_is_not_an_array(name, out):
    expect(BAD, lambda: _out_kw_call(name, out), "out", type(out).__name__)


@pytest.mark.parametrize("name", WITH_OUT)
@pytest.mark.parametrize("how", ["reversed_rows", "reversed_cols", "shifted", "transposed_square"])
def test_out_overlapping_logits_but_not_the_same_array(name, how):
    if how == "transposed_square":
        buf = _x((C, C))
        x, out = buf, buf.T
    elif how == "shifted":
        buf = _x((N + 1, C))
        x, out = buf[:N], buf[1:]
    elif how == "reversed_rows":
        x = _x()
        out = x[::-1]
    else:
        x = _x()
        out = x[:, ::-1]
    second = second_arg(name, x) if CALLS[name] != "norm" else None
    before = x.copy()
    expect(ValueError, lambda: call(name, x, second, out=out), "out", "overlaps", "logits")
    assert np.array_equal(x, before)


@pytest.mark.parametrize("name", [n for n in WITH_GRAD if CALLS[n] in ("ce", "kl", "bce")])
def test_out_overlapping_the_labels_or_target(name):
    x = _x()
    if CALLS[name] == "ce":
        t = _probs()
        what = "labels"
    else:
        t = np.full((N, C), 0.2) if CALLS[name] == "kl" else np.full((N, C), 0.5)
        what = "target"
    expect(ValueError, lambda: call(name, x, t, out=t), "out", "overlaps", what)
    expect(ValueError, lambda: call(name, x, t[::-1], out=t), "out", "overlaps", what)


@pytest.mark.parametrize("name", [n for n in WITH_GRAD if CALLS[n] in ("ce", "bce")])
def test_out_overlapping_the_weight(name):
    buf = np.ones((N, C))
    expect(ValueError, lambda: call(name, _x(), weight=buf[1], out=buf), "out", "overlaps", "weight")


@pytest.mark.parametrize("name", [n for n in WITH_GRAD if CALLS[n] == "ce"])
def test_out_overlapping_integer_labels(name):
    raw = np.zeros(N * C * 8, np.uint8)
    out = raw.view(np.float64).reshape(N, C)
    labels = raw[: N * 8].view(np.int64)
    expect(ValueError, lambda: call(name, _x(), labels, out=out), "out", "overlaps", "labels")


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_equal_to_logits_is_allowed(name):
    x = _x()
    res = call(name, x, out=x)
    got = res[1] if isinstance(res, tuple) else res
    assert got is x


# ------------------------------------------------------------------ axis


@pytest.mark.parametrize("name", WITH_AXIS)
@pytest.mark.parametrize("axis", [2, -3, 100, 2**70, -(2**70)])
def test_axis_out_of_range(name, axis):
    expect(ValueError, lambda: call(name, axis=axis), "axis", str(axis))


@pytest.mark.parametrize("name", WITH_AXIS)
@pytest.mark.parametrize("axis", [1.0, None, "1", (0, 1), np.float64(1)])
def test_axis_not_an_integer(name, axis):
    expect(TypeError, lambda: call(name, _x(), second_arg(name, _x()), axis=axis), "axis", repr(axis))


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("name", WITH_REDUCTION)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, 1, "elementwise_mean"])
def test_bad_reduction(name, reduction):
    expect(ValueError, lambda: call(name, reduction=reduction), "reduction", repr(reduction))


@pytest.mark.parametrize("name", [n for n in WITH_REDUCTION if CALLS[n] != "kl"])
def test_batchmean_only_for_kl_div(name):
    expect(ValueError, lambda: call(name, reduction="batchmean"), "reduction", "'batchmean'")


@pytest.mark.parametrize("name", WITH_BASE)
@pytest.mark.parametrize("base", [0, -2, 1, 1.0, math.nan, math.inf, -math.inf, 0.0])
def test_bad_base_value(name, base):
    expect(ValueError, lambda: call(name, base=base), "base", str(base))


@pytest.mark.parametrize("name", WITH_BASE)
@pytest.mark.parametrize("base", ["2", b"2", 2j, [2], np.array([2.0, 3.0]), object()])
def test_base_of_the_wrong_type(name, base):
    """A string is not a number: base="2" must not be accepted silently."""
    expect(TypeError, lambda: call(name, base=base), "base")


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("eps", [-0.1, 1.5, 1.0000001, -1e-300, math.nan, math.inf, -math.inf])
def test_bad_label_smoothing_value(name, eps):
    expect(ValueError, lambda: call(name, label_smoothing=eps), "label_smoothing", str(eps))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("eps", ["0.1", None, [0.1], 0.1j, np.array([0.1, 0.2])])
def test_label_smoothing_of_the_wrong_type(name, eps):
    """A string is not a number: label_smoothing="0.1" must not be accepted."""
    expect(TypeError, lambda: call(name, label_smoothing=eps), "label_smoothing")


@pytest.mark.parametrize("name", KL)
@pytest.mark.parametrize("kind", ["prob", "PROBS", None, 1, ""])
def test_bad_target_kind(name, kind):
    expect(ValueError, lambda: call(name, target_kind=kind), "target_kind", repr(kind))


@pytest.mark.parametrize("name", KL)
@pytest.mark.parametrize("T", [0, -1.0, math.nan, math.inf])
def test_bad_temperature_value(name, T):
    expect(ValueError, lambda: call(name, temperature=T), "temperature", str(T))


@pytest.mark.parametrize("name", KL)
@pytest.mark.parametrize("T", ["2", None, 2j, [2.0]])
def test_temperature_of_the_wrong_type(name, T):
    expect(TypeError, lambda: call(name, temperature=T), "temperature")


@pytest.mark.parametrize("name", BCE)
@pytest.mark.parametrize("which", ["logits", "target"])
@pytest.mark.parametrize("bad", [-0.5, 1.5, math.inf, -math.inf])
def test_bce_probabilities_outside_the_unit_interval(name, which, bad):
    p = np.full((N, C), 0.5)
    q = np.full((N, C), 0.5)
    (p if which == "logits" else q)[2, 3] = bad
    expect(ValueError, lambda: call(name, p, q, from_logits=False), which, str(bad))


@pytest.mark.parametrize("name", CE)
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probabilities"])
@pytest.mark.parametrize("bad", [-0.5, 1.5, math.inf, -math.inf])
def test_ce_probabilities_outside_the_unit_interval(name, soft, bad):
    """Only the true class's entry enters the loss, so a bad entry elsewhere
    would go unnoticed: every entry is checked, as for BCE, and the
    reference follows the same rule."""
    from fastxent import reference

    p = _probs()
    p[2, 3] = bad
    y = _probs() if soft else np.zeros(N, dtype=np.int64)
    expect(ValueError, lambda: call(name, p, y, from_logits=False), "logits", str(bad), "(2, 3)")
    expect(ValueError, lambda: getattr(reference, name)(p, y, from_logits=False), str(bad), "(2, 3)")
    # The position is the argument's own, whatever the class axis.
    expect(ValueError, lambda: call(name, p.T.copy(), y.T.copy() if soft else y, axis=0,
                                    from_logits=False), str(bad), "(3, 2)")


def test_ce_probabilities_nan_passes_through():
    p = _probs()
    p[1, 0] = math.nan
    y = np.zeros(N, dtype=np.int64)
    loss = fastxent.cross_entropy(p, y, from_logits=False, reduction="none")
    assert np.isnan(loss[1]) and np.isfinite(np.delete(loss, 1)).all()


@pytest.mark.parametrize("name", ALL)
def test_torch_tensor_requiring_grad_points_at_fastxent_torch(name):
    torch = pytest.importorskip("torch")
    x = torch.tensor(_x(), requires_grad=True)
    second = second_arg(name, _x())
    if second is not None:
        second = torch.from_numpy(second)
    args = (x,) if second is None else (x, second)
    expect(TypeError, lambda: getattr(fastxent, name)(*args), f"fastxent.torch.{name}", "detach()")
    # A second argument that requires grad (a distillation teacher) too.
    if CALLS[name] in ("kl", "bce"):
        t = torch.tensor(second_arg(name, _x()), requires_grad=True)
        expect(TypeError, lambda: getattr(fastxent, name)(_x(), t), f"fastxent.torch.{name}")
    # Detached, the same tensor is just an array.
    getattr(fastxent, name)(*(a.detach() for a in args))


@pytest.mark.parametrize("name", WITH_GRAD)
@pytest.mark.parametrize("g", ["a", None, 1j, object(), [1.0, "a"]], ids=["str", "None", "complex", "object", "mixed"])
def test_grad_output_of_the_wrong_type(name, g):
    """Message must name grad_output (not 'could not convert string to float')."""
    expect(BAD, lambda: call(name, grad_output=g), "grad_output")


@pytest.mark.parametrize("name", WITH_GRAD)
def test_complex_grad_output_array_is_rejected_not_truncated(name):
    shape = (N, C) if CALLS[name] == "bce" else (N,)
    g = np.ones(shape, dtype=np.complex128) * (1 + 1j)
    expect(TypeError, lambda: call(name, reduction="none", grad_output=g), "grad_output", "complex")


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [0, -1, -(2**40), 1025, 2**31, 2**63, 2**64])
def test_num_threads_out_of_range(name, n):
    expect(ValueError, lambda: call(name, num_threads=n), "num_threads", str(n))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1.5, "2", 2.0, [2]])
def test_num_threads_not_an_integer(name, n):
    expect(TypeError, lambda: call(name, num_threads=n), "num_threads", repr(n))


@pytest.mark.parametrize("n", [0, -1, 1025, 2**64])
def test_set_num_threads_out_of_range(n):
    before = fastxent.get_num_threads()
    expect(ValueError, lambda: fastxent.set_num_threads(n), str(n))
    assert fastxent.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, "2", [1]])
def test_set_num_threads_not_an_integer(n):
    before = fastxent.get_num_threads()
    expect(TypeError, lambda: fastxent.set_num_threads(n), repr(n))
    assert fastxent.get_num_threads() == before


@pytest.mark.parametrize("name", ALL)
def test_1024_threads_is_accepted(name):
    """The upper bound itself is valid (and must not oversubscribe into a crash)."""
    x = _x((3, C))
    ref = call(name, x, num_threads=1)
    got = call(name, x, num_threads=1024)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ------------------------------------------------------------------ valid but unusual: never a crash


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("view", ["neg_rows_c1", "neg_both_c1", "neg_rows", "zero_stride_rows", "unaligned",
                                  "big_endian", "one_row_neg"])
def test_unusual_layouts_never_raise(name, view):
    """Found by the fuzzer: one class and a negative row stride made the row
    stride -1, which the binding's ``except -1`` took for an error
    (SystemError: returned NULL without setting an exception)."""
    if view == "neg_rows_c1":
        x = _x((N, 1))[::-1]
    elif view == "neg_both_c1":
        x = _x((N, 1))[::-1, ::-1]
    elif view == "neg_rows":
        x = _x()[::-1]
    elif view == "zero_stride_rows":
        x = np.broadcast_to(_x((1, C)), (N, C))
    elif view == "unaligned":
        raw = np.zeros(N * C * 8 + 1, np.uint8)
        x = raw[1:].view(np.float64).reshape(N, C)
        x[...] = _x()
    elif view == "big_endian":
        x = _x().astype(">f8")
    else:
        x = _x((1, C))[::-1]
    ref = call(name, np.ascontiguousarray(x, dtype=np.float64))
    got = call(name, x)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=0)


# ================================================================== exception types
# The functions of the core (cross entropy and the building blocks): the
# exception type of each class of bad input.

LOSSES = ("cross_entropy", "cross_entropy_with_grad")
BLOCKS = ("logsumexp", "log_softmax", "softmax", "entropy")
CORE = LOSSES + BLOCKS


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal((4, 5))


@pytest.fixture
def labels():
    return np.array([0, 1, 2, 3])


# ------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "bad",
    [
        np.array([0, 1, 2]),  # too few rows
        np.array([0, 1, 2, 3, 4]),  # too many rows
        np.zeros((4, 2), dtype=np.int64),  # wrong batch shape
        np.zeros((4, 6)),  # soft labels of the wrong width
        np.full((5, 5), 0.2),  # soft labels with the wrong number of rows
        np.full(4, 0.5),  # floating labels of the batch shape are not class indices
        np.int64(1),  # a scalar for a batch of 4
    ],
    ids=["short", "long", "batch2d", "soft_width", "soft_rows", "float_batch", "scalar"],
)
def test_labels_of_wrong_shape(name, bad, logits):
    with pytest.raises(ValueError):
        getattr(fastxent, name)(logits, bad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("weight", [np.ones(4), np.ones(6), np.ones((5, 1)), np.ones((1, 5)), np.ones(0)])
def test_weight_of_wrong_shape(name, weight, logits, labels):
    with pytest.raises(ValueError):
        getattr(fastxent, name)(logits, labels, weight=weight)


@pytest.mark.parametrize(
    "reduction,grad_output",
    [("none", np.ones(3)), ("none", np.ones(5)), ("none", np.ones((4, 1))), ("none", np.ones((4, 5))),
     ("mean", np.ones(4)), ("sum", np.ones(4))],
)
def test_grad_output_of_wrong_shape(reduction, grad_output, logits, labels):
    with pytest.raises(ValueError):
        fastxent.cross_entropy_with_grad(logits, labels, reduction=reduction, grad_output=grad_output)


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("axis", [2, -3, 10])
def test_bad_axis(name, axis, logits):
    with pytest.raises(ValueError):
        fn = getattr(fastxent, name)
        if name in LOSSES:
            fn(logits, np.zeros(4, np.int64), axis=axis)
        else:
            fn(logits, axis=axis)


# ------------------------------------------------------------------- C == 0


@pytest.mark.parametrize("name", CORE)
def test_zero_classes(name):
    with pytest.raises(ValueError):
        call(name, np.zeros((3, 0)))
    with pytest.raises(ValueError):
        call(name, np.zeros((0, 3)), axis=0)
    with pytest.raises(ValueError):
        call(name, np.zeros((0,), np.float32))


@pytest.mark.parametrize("name", LOSSES)
def test_zero_classes_soft_labels(name):
    with pytest.raises(ValueError):
        getattr(fastxent, name)(np.zeros((3, 0)), np.zeros((3, 0)))


# ----------------------------------------------------------- label values


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("value", [5, 6, 1000, -1, -101, 2**31])
def test_out_of_range_label_names_value_and_position(name, value):
    x = np.zeros((6, 5))
    y = np.array([0, 1, 2, 3, value, 4], dtype=np.int64)
    with pytest.raises(ValueError) as info:
        getattr(fastxent, name)(x, y)
    message = str(info.value)
    assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?!\d)", message), message
    assert re.search(r"(?<![\d-])4(?!\d)", message), f"position 4 not named: {message}"


def test_out_of_range_label_position_in_a_2d_batch():
    x = np.zeros((2, 3, 5))
    y = np.zeros((2, 3), dtype=np.int32)
    y[1, 2] = 9
    with pytest.raises(ValueError) as info:
        fastxent.cross_entropy(x, y)
    message = str(info.value)
    assert "9" in message
    assert re.search(r"1,\s*2", message) or re.search(r"(?<!\d)5(?!\d)", message), message


@pytest.mark.parametrize(
    "label_dtype,value",
    [(np.uint8, 255), (np.int8, -128), (np.uint64, 2**64 - 1), (np.int64, -(2**63)), (np.uint32, 2**32 - 1)],
)
def test_out_of_range_label_extreme_values(label_dtype, value):
    y = np.zeros(3, dtype=label_dtype)
    y[1] = value
    with pytest.raises(ValueError, match=re.escape(str(value))):
        fastxent.cross_entropy(np.zeros((3, 7)), y)


def test_minus_100_is_a_bad_label_when_ignore_index_is_another_value():
    with pytest.raises(ValueError):
        fastxent.cross_entropy(np.zeros((2, 3)), [0, -100], ignore_index=1)


def test_bad_label_leaves_in_place_logits_untouched():
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    before = x.copy()
    with pytest.raises(ValueError):
        fastxent.cross_entropy_with_grad(x, [0, 1, 2, 3, 4], out=x)
    np.testing.assert_array_equal(x, before)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["avg", "batchmean", "", "means", "elementwise_mean"])
def test_unknown_reduction(name, reduction, logits, labels):
    with pytest.raises(ValueError):
        getattr(fastxent, name)(logits, labels, reduction=reduction)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("eps", [-0.1, -1e-12, 1.0 + 1e-9, 1.5, float("nan")])
def test_label_smoothing_outside_unit_interval(name, eps, logits, labels):
    with pytest.raises(ValueError):
        getattr(fastxent, name)(logits, labels, label_smoothing=eps)


@pytest.mark.parametrize("base", [0, 0.0, -2, -0.5, 1, 1.0, float("nan")])
def test_bad_base(base, logits, labels):
    for fn in (fastxent.cross_entropy, fastxent.cross_entropy_with_grad):
        with pytest.raises(ValueError):
            fn(logits, labels, base=base)
    with pytest.raises(ValueError):
        fastxent.entropy(logits, base=base)


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("n", [0, -1, -8])
def test_non_positive_num_threads(name, n, logits):
    with pytest.raises(ValueError):
        call(name, logits, num_threads=n)


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_non_positive(n, restore_num_threads):
    with pytest.raises(ValueError):
        fastxent.set_num_threads(n)
    assert fastxent.get_num_threads() == restore_num_threads


# --------------------------------------------------------------------- out=

OUT_FUNCS = ("cross_entropy_with_grad", "log_softmax", "softmax")


def _call_out(name, x, out):
    if name == "cross_entropy_with_grad":
        return fastxent.cross_entropy_with_grad(x, np.zeros(x.shape[0], np.int64), out=out)
    return getattr(fastxent, name)(x, out=out)


def _readonly(shape, dtype):
    a = np.zeros(shape, dtype)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("name", OUT_FUNCS)
@pytest.mark.parametrize(
    "dtype,out",
    [
        (np.float64, np.zeros((4, 6))),  # wrong shape
        (np.float64, np.zeros((5, 4))),  # transposed shape
        (np.float64, np.zeros(20)),  # flat
        (np.float64, np.zeros((4, 5), np.float32)),  # wrong dtype
        (np.float32, np.zeros((4, 5), np.float64)),
        (np.float16, np.zeros((4, 5), np.float32)),  # float16 results stay float16
        (np.float64, _readonly((4, 5), np.float64)),  # read-only
        (np.float64, np.zeros((4, 5)).tolist()),  # not an array
    ],
    ids=["shape", "transposed", "flat", "f64_to_f32", "f32_to_f64", "f16_to_f32", "readonly", "list"],
)
def test_bad_out(name, dtype, out):
    x = np.random.default_rng(2).standard_normal((4, 5)).astype(dtype)
    with pytest.raises(ValueError):
        _call_out(name, x, out)


@pytest.mark.parametrize("name", OUT_FUNCS)
def test_readonly_logits_as_out(name):
    x = _readonly((4, 5), np.float32)
    with pytest.raises(ValueError):
        _call_out(name, x, x)


# ------------------------------------------------------------------- dtypes

BAD_DTYPE_INPUTS = [
    np.zeros((3, 4), np.complex64),
    np.zeros((3, 4), np.complex128),
    np.array([[1.0, 2.0], [3.0, None]], dtype=object),
    np.array([[1.0, 2.0], [3.0, 4.0]], dtype=object),
    np.array([["a", "b"], ["c", "d"]]),
    np.array([[b"a", b"b"], [b"c", b"d"]]),
    np.zeros((3, 4), "datetime64[s]"),
    [["a", "b"], ["c", "d"]],
]
BAD_IDS = ["complex64", "complex128", "object_none", "object_float", "str", "bytes", "datetime", "str_list"]


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("bad", BAD_DTYPE_INPUTS, ids=BAD_IDS)
def test_non_numeric_or_complex_logits(name, bad):
    with pytest.raises(TypeError):
        call(name, bad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "bad",
    [np.zeros((3, 4), np.complex128), np.zeros(3, np.complex128), np.array(["0", "1", "2"]),
     np.array([0, 1, 2], dtype=object)],
    ids=["complex_soft", "complex_hard", "str", "object"],
)
def test_non_numeric_or_complex_labels(name, bad):
    with pytest.raises(TypeError):
        getattr(fastxent, name)(np.zeros((3, 4)), bad)


@pytest.mark.parametrize("name", LOSSES)
def test_complex_weight(name):
    with pytest.raises(TypeError):
        getattr(fastxent, name)(np.zeros((3, 4)), [0, 1, 2], weight=np.ones(4, np.complex128))
