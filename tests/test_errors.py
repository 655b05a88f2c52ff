"""Bad input gives a clear ValueError or TypeError, never a crash."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastxent

BLOCKS = ("logsumexp", "log_softmax", "softmax", "entropy")
LOSSES = ("cross_entropy", "cross_entropy_with_grad")
ALL = LOSSES + BLOCKS


def call(name, x, *args, **kw):
    """Call a public function; losses get valid labels unless some are given."""
    fn = getattr(fastxent, name)
    if name in LOSSES:
        if not args:
            x_arr = np.asarray(x)
            axis = kw.get("axis", -1)
            batch = np.delete(np.array(x_arr.shape), axis) if x_arr.ndim else ()
            args = (np.zeros(tuple(batch), dtype=np.int64),)
        return fn(x, *args, **kw)
    return fn(x, **kw)


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


@pytest.mark.parametrize("name", ALL)
def test_zero_dimensional_logits(name):
    with pytest.raises(ValueError):
        call(name, np.float64(1.0), np.int64(0)) if name in LOSSES else call(name, np.float64(1.0))


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


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [2, -3, 10])
def test_bad_axis(name, axis, logits):
    with pytest.raises(ValueError):
        fn = getattr(fastxent, name)
        if name in LOSSES:
            fn(logits, np.zeros(4, np.int64), axis=axis)
        else:
            fn(logits, axis=axis)


# ------------------------------------------------------------------- C == 0


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", ALL)
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
