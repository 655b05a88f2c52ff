"""cross_entropy and cross_entropy_with_grad against fastxent.reference,
finite differences, PyTorch, and the worked examples of the seeds.

The full product dtype x layout x out= x threads x ISA runs on the small
widths; the wide widths (1000, 50257) take every layout but only a slice of
the out= variants, with few rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent
from fastxent import reference as ref

from conftest import (
    EDGE_WIDTHS,
    EPS32,
    FLOAT_DTYPES,
    LAYOUTS,
    OUT_KINDS,
    SMALL_WIDTHS,
    THREADS,
    assert_bitwise_equal,
    assert_close,
    assert_scalar_of,
    batch_shape,
    call_with_out,
    check_grad,
    compute_dtype,
    each_isa,
    grad_scale,
    make_layout,
    make_out,
    random_logits,
    random_probs,
    random_soft_labels,
    to_logical,
    wide_cases,
)

INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)


# --------------------------------------------------------------- helpers


class MatrixCase:
    """Random logits, hard and soft labels, and their reference results,
    computed once and checked against any layout / out= / threads / ISA."""

    def __init__(self, rng, dtype, C, layout, n):
        self.dtype, self.C, self.layout = dtype, C, layout
        self.ct = compute_dtype(dtype)
        self.batch = batch_shape(layout, n)
        self.n_rows = math.prod(self.batch)
        self.logical = random_logits(rng, self.batch + (C,), dtype)
        self.labels = rng.integers(0, C, size=self.batch)
        self.soft = random_soft_labels(rng, self.batch + (C,), dtype)
        x, y, t = self.logical, self.labels, self.soft
        self.hard_none = ref.cross_entropy(x, y, reduction="none")
        self.hard_sum = ref.cross_entropy(x, y, reduction="sum")
        self.hard_mean, self.hard_grad = ref.cross_entropy_with_grad(x, y)
        self.soft_none = ref.cross_entropy(x, t, reduction="none")
        self.soft_sum, self.soft_grad = ref.cross_entropy_with_grad(x, t, reduction="sum")

    def check(self, out_kind, threads, where=""):
        """Hard and soft labels, every reduction, loss and gradient."""
        dtype, ct, batch, layout = self.dtype, self.ct, self.batch, self.layout
        labels = self.labels
        threads_kw = {"num_threads": threads}

        # ---- hard labels: loss only
        arr, axis = make_layout(self.logical, layout)
        got = fastxent.cross_entropy(arr, labels, axis=axis, reduction="none", **threads_kw)
        assert isinstance(got, np.ndarray) and got.dtype == ct and got.shape == batch, where
        assert_close(got, self.hard_none, ct, what=f"hard none {where}")
        got = fastxent.cross_entropy(arr, labels, axis=axis, reduction="sum", **threads_kw)
        assert_scalar_of(got, ct, f"hard sum {where}")
        assert_close(got, self.hard_sum, ct, what=f"hard sum {where}")

        # ---- hard labels: loss and gradient, mean
        step = call_with_out(
            lambda out: fastxent.cross_entropy_with_grad(arr, labels, axis=axis, out=out, **threads_kw),
            arr, self.logical, axis, layout, out_kind, what=where)
        if step is None:
            return
        (loss, grad), out = step
        assert_scalar_of(loss, ct, f"hard mean {where}")
        assert_close(loss, self.hard_mean, ct, what=f"hard mean {where}")
        check_grad(grad, arr, dtype, out, self.hard_grad, axis=axis, floor=1.0 / self.n_rows,
                   what=f"hard grad {where}")

        # ---- soft labels (laid out like the logits): none, and sum with gradient
        arr, axis = make_layout(self.logical, layout)
        soft_arr, _ = make_layout(self.soft, layout)
        got = fastxent.cross_entropy(arr, soft_arr, axis=axis, reduction="none", **threads_kw)
        assert got.dtype == ct and got.shape == batch, where
        assert_close(got, self.soft_none, ct, what=f"soft none {where}")
        (loss, grad), out = call_with_out(
            lambda out: fastxent.cross_entropy_with_grad(arr, soft_arr, axis=axis, reduction="sum",
                                                         out=out, **threads_kw),
            arr, self.logical, axis, layout, out_kind, what=where)
        assert_scalar_of(loss, ct, f"soft sum {where}")
        assert_close(loss, self.soft_sum, ct, what=f"soft sum {where}")
        check_grad(grad, arr, dtype, out, self.soft_grad, axis=axis, floor=1.0, what=f"soft grad {where}")
        assert np.array_equal(to_logical(soft_arr, axis), self.soft), f"labels were modified {where}"


# ------------------------------------------------- the layout/threads matrix


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", SMALL_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_widths_full_product(dtype, C, layout, out_kind, threads, isa, rng):
    MatrixCase(rng, dtype, C, layout, n=37).check(out_kind, threads)


# With an odd row count.
@pytest.mark.parametrize("C", EDGE_WIDTHS)
@pytest.mark.parametrize("layout", ("contiguous", "strided"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_small_path_edge_widths(dtype, C, layout, isa, rng):
    case = MatrixCase(rng, dtype, C, layout, n=53)
    for out_kind in OUT_KINDS:
        case.check(out_kind, 1)


WIDE_CASES = wide_cases([
    ("contiguous", "prealloc"),
    ("contiguous", "inplace"),
    ("class_first", "inplace"),
    ("strided", "prealloc"),
    ("negative", "inplace"),
    ("axis1_3d", "inplace"),
])


@pytest.mark.parametrize("C,layout,out_kind", WIDE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_wide_widths(dtype, C, layout, out_kind, rng):
    """Every ISA and thread count on one set of data: the float64 reference
    of a 50257-wide row is the slow part, so it is computed once."""
    case = MatrixCase(rng, dtype, C, layout, n=3 if C > 10000 else 24)
    for isa_name in each_isa():
        for threads in THREADS:
            case.check(out_kind, threads, where=f"[isa={isa_name} threads={threads}]")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_huge_row(dtype, threads, isa, rng):
    """Fewer rows than threads: the row itself is split (max, sum merge)."""
    C = 200_003
    x = random_logits(rng, (1, C), dtype)
    y = np.array([C // 3])
    ct = compute_dtype(dtype)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, num_threads=threads)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x, y)
    assert_close(loss, ref_loss, ct)
    check_grad(grad, x, dtype, None, ref_grad, axis=-1, floor=1.0)
    soft = random_soft_labels(rng, (1, C), dtype)
    assert_close(
        fastxent.cross_entropy(x, soft, num_threads=threads), ref.cross_entropy(x, soft), ct
    )
    # In place (out=x): the split keeps exp(x - m) in the output between
    # passes, so x_y must be read first; the bits are those of one thread.
    if dtype in (np.float32, np.float64):
        w = rng.uniform(0.5, 2.0, C).astype(dtype)
        one = fastxent.cross_entropy_with_grad(x, y, weight=w, num_threads=1)
        xin = x.copy()
        got = fastxent.cross_entropy_with_grad(xin, y, weight=w, out=xin, num_threads=threads)
        assert_bitwise_equal(got[0], one[0], what="in-place loss")
        assert_bitwise_equal(xin, one[1], what="in-place grad")


# ---------------------------------------------------- every option vs reference

# "weight": True draws class weights; "ignore": v sets every third label to v;
# "soft": "normalized"/"unnormalized" draws probability targets.
OPTION_SETS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight_mean": {"weight": True},
    "weight_sum": {"weight": True, "reduction": "sum"},
    "weight_none": {"weight": True, "reduction": "none"},
    "ignore_default": {"ignore": -100},
    "ignore_in_range": {"ignore_index": 2, "ignore": 2},
    "ignore_minus1_weight": {"ignore_index": -1, "ignore": -1, "weight": True},
    "ignore_5_none": {"ignore_index": 5, "ignore": 5, "reduction": "none"},
    "ignore_big_sum": {"ignore_index": 4096, "ignore": 4096, "reduction": "sum"},
    "ignore_index_3_natural": {"ignore_index": 3},  # labels drawn equal to 3 are ignored
    "smooth": {"label_smoothing": 0.1},
    "smooth_full": {"label_smoothing": 1.0},
    "smooth_weight_ignore": {"label_smoothing": 0.25, "weight": True, "ignore": -100},
    "smooth_none_ignore": {"label_smoothing": 0.2, "reduction": "none", "ignore": -100},
    "smooth_weight_sum": {"label_smoothing": 0.05, "weight": True, "reduction": "sum"},
    "base2": {"base": 2},
    "base10_sum": {"base": 10, "reduction": "sum"},
    "base_e_float": {"base": math.e, "reduction": "none"},
    "base_half": {"base": 0.5},
    "probs": {"from_logits": False},
    "probs_sum_base2": {"from_logits": False, "reduction": "sum", "base": 2},
    "probs_none": {"from_logits": False, "reduction": "none"},
    "probs_smooth": {"from_logits": False, "label_smoothing": 0.1},
    "probs_weight_ignore": {"from_logits": False, "weight": True, "ignore": -100},
    "soft": {"soft": "normalized"},
    "soft_sum": {"soft": "normalized", "reduction": "sum"},
    "soft_none": {"soft": "normalized", "reduction": "none"},
    "soft_unnormalized": {"soft": "unnormalized"},
    "soft_weight": {"soft": "normalized", "weight": True},
    "soft_smooth": {"soft": "normalized", "label_smoothing": 0.3},
    "soft_ignore_index_irrelevant": {"soft": "normalized", "ignore_index": 1},
    "soft_probs": {"soft": "normalized", "from_logits": False},
    "soft_weight_smooth_base2_none": {
        "soft": "unnormalized",
        "weight": True,
        "label_smoothing": 0.15,
        "base": 2,
        "reduction": "none",
    },
}


def build_case(rng, dtype, C, layout, spec, n=29, probs_floor=1e-3):
    """Logical (class axis last) logits, labels and keyword arguments."""
    spec = dict(spec)
    soft = spec.pop("soft", None)
    ignore = spec.pop("ignore", None)
    use_weight = spec.pop("weight", False)
    batch = batch_shape(layout, n)
    shape = batch + (C,)
    if spec.get("from_logits", True):
        logical = random_logits(rng, shape, dtype)
    else:
        logical = random_probs(rng, shape, dtype, floor=probs_floor)
    if soft:
        labels = random_soft_labels(rng, shape, dtype, normalized=(soft == "normalized"))
    else:
        labels = rng.integers(0, C, size=batch)
        if ignore is not None:
            labels.reshape(-1)[::3] = ignore
    if use_weight:
        spec["weight"] = rng.uniform(0.25, 2.0, C).astype(dtype)
    return logical, labels, spec


def layout_labels(labels, layout):
    if np.asarray(labels).dtype.kind == "f":
        return make_layout(labels, layout)[0]
    return labels


@pytest.mark.parametrize("layout", ["contiguous", "axis1_3d"])
@pytest.mark.parametrize("C", [7, 17, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_against_reference(name, dtype, C, layout, isa, rng):
    logical, labels, kw = build_case(rng, dtype, C, layout, OPTION_SETS[name])
    ct = compute_dtype(dtype)
    arr, axis = make_layout(logical, layout)
    larr = layout_labels(labels, layout)
    reduction = kw.get("reduction", "mean")

    got = fastxent.cross_entropy(arr, larr, axis=axis, **kw)
    expected = ref.cross_entropy(logical, labels, **kw)
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == ct
        assert got.shape == np.shape(labels)[: len(arr.shape) - 1]
    else:
        assert_scalar_of(got, ct, name)
    assert_close(got, expected, ct, what=f"{name} loss")

    loss, grad = fastxent.cross_entropy_with_grad(arr, larr, axis=axis, **kw)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(logical, labels, **kw)
    assert_close(loss, ref_loss, ct, what=f"{name} fused loss")
    assert_close(loss, got, ct, what=f"{name} fused loss vs loss-only")
    # With probabilities the gradient -t/p is a quotient: check it elementwise.
    check_grad(grad, arr, dtype, None, ref_grad, axis=axis, floor=1e-6,
               relative=not kw.get("from_logits", True), what=f"{name} grad")


def test_weight_as_list_and_other_dtype(rng):
    x = random_logits(rng, (20, 6), np.float32)
    y = rng.integers(0, 6, 20)
    w = [0.5, 1.0, 2.0, 0.25, 1.5, 3.0]
    expected = ref.cross_entropy(x, y, weight=np.array(w))
    for weight in (w, np.array(w), np.array(w, np.float32), np.array(w)[::-1][::-1]):
        assert_close(fastxent.cross_entropy(x, y, weight=weight), expected, np.float32)


def test_soft_labels_of_other_dtype(rng):
    x = random_logits(rng, (20, 9), np.float32)
    t64 = random_soft_labels(rng, (20, 9), np.float64)
    # Casting the targets to float32 costs half an ulp of each term: inside 8 ulp.
    assert_close(fastxent.cross_entropy(x, t64), ref.cross_entropy(x, t64), np.float32)
    x64 = x.astype(np.float64)
    t32 = t64.astype(np.float32)
    assert_close(fastxent.cross_entropy(x64, t32), ref.cross_entropy(x64, t32), np.float64)


# ------------------------------------------------------------ label dtypes


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("label_dtype", INT_DTYPES)
def test_integer_label_dtypes(label_dtype, dtype, rng):
    C = 7
    x = random_logits(rng, (41, C), dtype)
    y64 = rng.integers(0, C, 41)
    y = y64.astype(label_dtype)
    ct = compute_dtype(dtype)
    for reduction in ("mean", "sum", "none"):
        got = fastxent.cross_entropy(x, y, reduction=reduction)
        assert_bitwise_equal(got, fastxent.cross_entropy(x, y64, reduction=reduction), reduction)
        assert_close(got, ref.cross_entropy(x, y64, reduction=reduction), ct, what=reduction)
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    loss64, grad64 = fastxent.cross_entropy_with_grad(x, y64)
    assert_bitwise_equal(loss, loss64)
    assert_bitwise_equal(grad, grad64)

    # Strided, negatively strided and read-only labels.
    big = np.zeros(82, dtype=label_dtype)
    big[1::2] = y
    assert_bitwise_equal(fastxent.cross_entropy(x, big[1::2], reduction="none"),
                         fastxent.cross_entropy(x, y, reduction="none"))
    assert_bitwise_equal(fastxent.cross_entropy(x[::-1], y[::-1], reduction="none"),
                         fastxent.cross_entropy(x, y, reduction="none")[::-1])
    ro = y.copy()
    ro.setflags(write=False)
    assert_bitwise_equal(fastxent.cross_entropy(x, ro), fastxent.cross_entropy(x, y))


@pytest.mark.parametrize(
    "label_dtype,ignore_index",
    [(np.int8, -1), (np.uint8, 255), (np.int16, 1000), (np.uint16, 65535),
     (np.int32, -7), (np.uint32, 2**32 - 1), (np.int64, 2**40), (np.uint64, 2**40),
     (np.int64, 2**32 + 3)],  # 3 in its low 32 bits: a class
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ignore_index_with_label_dtypes(label_dtype, ignore_index, dtype, isa, rng):
    # 48 rows: ignored rows in the first 16-row group of the small-row
    # path only, so the other two take its plain-group path.
    C, N = 7, 48
    x = random_logits(rng, (N, C), dtype)
    y = rng.integers(0, C, N).astype(label_dtype)
    y[16:] = np.arange(N - 16) % C  # every class, 3 among them
    y[:16:4] = ignore_index
    y_obj = [int(v) for v in y]  # exact integer values
    kept = np.array([v != ignore_index for v in y_obj])
    y_ref = np.where(kept, y.astype(np.int64, casting="unsafe"), -100)
    for reduction in ("mean", "sum", "none"):
        got = fastxent.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction)
        assert_close(got, ref.cross_entropy(x, y_ref, reduction=reduction), dtype)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, ignore_index=ignore_index)
    assert np.all(grad[~kept] == 0)
    assert_close(grad, ref.cross_entropy_with_grad(x, y_ref)[1], dtype, scale=1 / N)


def test_uint8_label_equal_to_wrapped_ignore_index_is_a_class(rng):
    """uint8 156 is -100 modulo 256: it is class 156, not ignored."""
    C = 200
    x = random_logits(rng, (5, C), np.float64)
    y = np.array([156, 3, 156, 199, 0], dtype=np.uint8)
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert np.all(got > 0)
    assert_close(got, ref.cross_entropy(x, y.astype(np.int64), reduction="none"), np.float64)


# ------------------------------------------------------------ grad_output


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_scalar(dtype, reduction, isa, rng):
    x = random_logits(rng, (23, 17), dtype)
    y = rng.integers(0, 17, 23)
    y[::5] = -100
    w = rng.uniform(0.5, 2, 17).astype(dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    ct = compute_dtype(dtype)
    go = -2.5
    loss, grad = fastxent.cross_entropy_with_grad(x, y, grad_output=go, **kw)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x, y, grad_output=go, **kw)
    assert_close(loss, ref_loss, ct)
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))
    # The loss does not depend on grad_output; the gradient scales with it.
    loss1, grad1 = fastxent.cross_entropy_with_grad(x, y, **kw)
    assert_bitwise_equal(loss, loss1)
    assert_close(grad, go * grad1.astype(np.float64), ct, scale=grad_scale(ref_grad, 1e-6))
    for other in (np.float32(go), np.float64(go), np.array(go)):
        assert_bitwise_equal(fastxent.cross_entropy_with_grad(x, y, grad_output=other, **kw)[1], grad)
    # grad_output = 0 gives a zero gradient.
    assert np.all(fastxent.cross_entropy_with_grad(x, y, grad_output=0.0, **kw)[1] == 0)


@pytest.mark.parametrize("layout", ["contiguous", "class_first", "axis1_3d", "negative"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_per_row(dtype, layout, isa, rng):
    C = 17
    batch = batch_shape(layout, 23)
    logical = random_logits(rng, batch + (C,), dtype)
    y = rng.integers(0, C, batch)
    y.reshape(-1)[::4] = -100
    w = rng.uniform(0.5, 2, C).astype(dtype)
    go = rng.standard_normal(batch)
    kw = dict(weight=w, reduction="none")
    ct = compute_dtype(dtype)
    arr, axis = make_layout(logical, layout)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(logical, y, grad_output=go, **kw)
    scale = grad_scale(ref_grad, 1e-6)
    big = np.zeros(tuple(2 * s for s in batch))
    strided_go = big[(slice(None, None, 2),) * len(batch)]
    strided_go[...] = go
    for g in (go, go.astype(dtype), strided_go, go.tolist()):
        loss, grad = fastxent.cross_entropy_with_grad(arr, y, axis=axis, grad_output=g, **kw)
        assert_close(loss, ref_loss, ct)
        assert_close(to_logical(grad, axis), ref_grad, ct, scale=scale)
    # Rows with a zero grad_output have a zero gradient.
    go0 = go.copy()
    go0.reshape(-1)[1::2] = 0
    grad = to_logical(fastxent.cross_entropy_with_grad(arr, y, axis=axis, grad_output=go0, **kw)[1], axis)
    assert np.all(grad.reshape(-1, C)[1::2] == 0)
    # Soft labels too.
    soft = random_soft_labels(rng, batch + (C,), dtype)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(logical, soft, grad_output=go, reduction="none")
    loss, grad = fastxent.cross_entropy_with_grad(
        arr, make_layout(soft, layout)[0], axis=axis, grad_output=go, reduction="none"
    )
    assert_close(loss, ref_loss, ct)
    assert_close(to_logical(grad, axis), ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))


# -------------------------------------------------------- finite differences

FD_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": -100},
    "smooth_weight_ignore": {"label_smoothing": 0.3, "weight": True, "ignore": -100},
    "base2": {"base": 2},
    "soft": {"soft": "normalized"},
    "soft_unnormalized_weight_smooth": {"soft": "unnormalized", "weight": True, "label_smoothing": 0.2},
    "probs": {"from_logits": False},
    "probs_smooth_weight": {"from_logits": False, "label_smoothing": 0.2, "weight": True},
    "probs_soft_base10": {"soft": "unnormalized", "from_logits": False, "base": 10},
}


def _fourth_order(f, x, direction, h):
    return (-f(x + 2 * h * direction) + 8 * f(x + h * direction)
            - 8 * f(x - h * direction) + f(x - 2 * h * direction)) / (12 * h)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(FD_OPTIONS))
def test_gradient_finite_differences(name, reduction, rng):
    n, C = 4, 5
    spec = dict(FD_OPTIONS[name], reduction=reduction)
    x, labels, kw = build_case(rng, np.float64, C, "contiguous", spec, n=n, probs_floor=0.05)
    from_logits = kw.get("from_logits", True)
    h = 1e-3 if from_logits else 1e-5

    if reduction == "none":
        go = rng.uniform(0.5, 2.0, n)
        _, grad = fastxent.cross_entropy_with_grad(x, labels, grad_output=go, **kw)

        def f(z):
            return fastxent.cross_entropy(z, labels, **kw)

        # One class column at a time: row i's loss depends on row i only, so
        # perturbing a whole column gives every row's partial derivative.
        for c in range(C):
            e = np.zeros_like(x)
            e[:, c] = 1.0
            fd = _fourth_order(f, x, e, h)
            np.testing.assert_allclose(grad[:, c], go * fd, rtol=1e-7, atol=1e-9,
                                       err_msg=f"column {c}")
    else:
        _, grad = fastxent.cross_entropy_with_grad(x, labels, **kw)

        def f(z):
            return float(fastxent.cross_entropy(z, labels, **kw))

        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = 1.0
            fd[idx] = _fourth_order(f, x, e, h)
        np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
    # And the reference agrees with both.
    ref_grad = ref.cross_entropy_with_grad(
        x, labels, **kw, **({"grad_output": go} if reduction == "none" else {})
    )[1]
    assert_close(grad, ref_grad, np.float64, scale=grad_scale(ref_grad, 1e-6))


# ------------------------------------------------------------- accuracy clause


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("C", [7, 17, 1000, 50257])
def test_float32_rows_with_large_common_offset(C, offset, isa, rng):
    n = 3 if C > 10000 else 31
    x = (offset + rng.standard_normal((n, C))).astype(np.float32)
    y = rng.integers(0, C, n)
    expected = ref.cross_entropy(x, y, reduction="none")
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert_close(got, expected, np.float32, what="per row")

    # The test has teeth: the naive float32 lse - x_y misses by far more.
    m = x.max(axis=1)
    lse32 = (m + np.log(np.exp(x - m[:, None]).sum(axis=1, dtype=np.float32))).astype(np.float32)
    naive = (lse32 - x[np.arange(n), y]).astype(np.float64)
    assert np.max(np.abs(naive - expected) / np.maximum(np.abs(expected), 1)) > 8 * EPS32

    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x, y)
    assert_close(loss, ref_loss, np.float32, what="mean")
    assert_close(grad, ref_grad, np.float32, scale=grad_scale(ref_grad, 1 / n), what="grad")

    soft = random_soft_labels(rng, (n, C), np.float32)
    assert_close(fastxent.cross_entropy(x, soft, reduction="none"),
                 ref.cross_entropy(x, soft, reduction="none"), np.float32, what="soft")
    smooth = dict(label_smoothing=0.1, reduction="none")
    assert_close(fastxent.cross_entropy(x, y, **smooth), ref.cross_entropy(x, y, **smooth),
                 np.float32, what="smoothing")


# ---------------------------------------------------------------- the seeds


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_seed_three_doors(dtype):
    """-log(0.7) - log(0.8) - log(0.9) = 0.685."""
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]], dtype=dtype)
    labels = [0, 1, 2]
    exact = -(math.log(np.float64(dtype(0.7))) + math.log(np.float64(dtype(0.8)))
              + math.log(np.float64(dtype(0.9))))
    ct = compute_dtype(dtype)
    loss = fastxent.cross_entropy(probs, labels, from_logits=False, reduction="sum")
    assert round(float(loss), 3) == 0.685
    assert_close(loss, exact, ct)
    one_hot = np.eye(3, dtype=dtype)
    loss = fastxent.cross_entropy(probs, one_hot, from_logits=False, reduction="sum")
    assert_close(loss, exact, ct)
    # The same through logits = log(p): the rows already sum to 1.
    logits = np.log(probs.astype(np.float64)).astype(dtype)
    loss = fastxent.cross_entropy(logits, labels, reduction="sum")
    assert round(float(loss), 3) == 0.685
    assert_close(loss, ref.cross_entropy(logits, labels, reduction="sum"), ct)
    assert abs(float(loss) - 0.68517) < 1e-4
    # In bits: divided by ln 2.
    bits_loss = fastxent.cross_entropy(probs, labels, from_logits=False, reduction="sum", base=2)
    assert_close(bits_loss, exact / math.log(2), ct)


@pytest.mark.parametrize("from_logits", [False, True])
def test_seed_iris(from_logits):
    """True-class probabilities 0.57, 0.58, 0.52 give 0.56, 0.54, 0.65."""
    probs = np.array([[0.57, 0.20, 0.23], [0.12, 0.30, 0.58], [0.22, 0.52, 0.26]])
    labels = np.array([0, 2, 1])  # Setosa, Virginica, Versicolor
    x = probs if not from_logits else np.log(probs)
    got = fastxent.cross_entropy(x, labels, reduction="none", from_logits=from_logits)
    np.testing.assert_array_equal(np.round(got, 2), [0.56, 0.54, 0.65])
    assert_close(got, -np.log([0.57, 0.58, 0.52]), np.float64)
    total = fastxent.cross_entropy(x, labels, reduction="sum", from_logits=from_logits)
    assert_close(total, -np.log([0.57, 0.58, 0.52]).sum(), np.float64)


# ------------------------------------------------------------------ edge rows


@pytest.mark.parametrize("value", [1e30, -1e30, -1e4, 0.0, 3e38])
@pytest.mark.parametrize("C", [1, 7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_row_gives_log_C(dtype, C, value, isa):
    x = np.full((3, C), value, dtype=dtype)
    y = np.array([0, C - 1, C // 2])
    ct = compute_dtype(dtype)
    assert_close(fastxent.cross_entropy(x, y, reduction="none"), np.full(3, math.log(C)), ct)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="sum")
    assert_close(loss, 3 * math.log(C), ct)
    expected = np.full((3, C), 1.0 / C)
    expected[np.arange(3), y] -= 1.0
    assert_close(grad, expected, ct, scale=1.0)


@pytest.mark.parametrize("target", ["hard", "weighted", "soft", "shards"])
@pytest.mark.parametrize("C", [7, 100, 1000, 5000])
def test_smoothing_at_the_end_of_the_float32_range(C, target, isa, rng):
    """Label smoothing's sum of x - max over float32 logits of both signs near
    3e38: one difference overflows float32 (4e38) and a row's sum is C times
    that, while the loss (0.1 of the mean difference) is ~1e37."""
    x = rng.uniform(-1e38, 1e38, (6, C)).astype(np.float32)
    x[:, 1] = -2e38
    x[:, C - 1] = 2e38
    x[1] = rng.uniform(0, 3e38, C)  # one sign: no element overflows, the sum does
    x[2] = rng.uniform(-3e38, 0, C)  # and with a max that is not large
    y = np.argmax(x, axis=1)  # the target's own term stays small: the loss fits float32
    if target == "soft":
        labels = np.full((6, C), 0.05 / C, dtype=np.float32)
        labels[np.arange(6), y] += 0.95
    else:
        labels = y
    kw = dict(reduction="none", label_smoothing=0.1)
    if target == "weighted":
        kw["weight"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x, labels, **kw)
    assert np.all(np.isfinite(ref_loss)) and np.all(ref_loss > 1e36)
    scale = float(np.max(ref_loss))
    if target == "shards":
        bounds = [0, C // 2, C]
        stats = [fastxent.shard_stats(x[:, a:b], y, vocab_start=a, num_classes=C)
                 for a, b in zip(bounds, bounds[1:])]
        got = fastxent.shard_loss(fastxent.combine_shard_stats(stats), y, **kw)
        assert_close(got, ref_loss, np.float32, scale=scale, what=f"shards C={C} {isa}")
        return
    got = fastxent.cross_entropy(x, labels, **kw)
    assert_close(got, ref_loss, np.float32, scale=scale, what=f"loss C={C} {isa}")
    loss, grad = fastxent.cross_entropy_with_grad(x, labels, **kw)
    assert_close(loss, ref_loss, np.float32, scale=scale, what=f"fused loss C={C} {isa}")
    # A soft row's gradient p - t is within 1 of 0 however the target splits.
    gscale = 1.0 if target == "soft" else 1.0 / C
    assert_close(grad, ref_grad, np.float32, scale=gscale, ulps=16, what=f"grad C={C} {isa}")
    inplace = x.copy()
    loss_ip, _ = fastxent.cross_entropy_with_grad(inplace, labels, out=inplace, **kw)
    assert_bitwise_equal(loss_ip, loss, what="loss in place")
    assert_bitwise_equal(inplace, grad, what="grad in place")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_very_negative_rows(dtype, isa, rng):
    x = (-1e4 + rng.standard_normal((9, 16))).astype(dtype)
    y = rng.integers(0, 16, 9)
    ct = compute_dtype(dtype)
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x, y)
    assert_close(loss, ref_loss, ct)
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1 / 9))


@pytest.mark.parametrize("C", [7, 17, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_minus_inf_logit_on_other_class(dtype, C, isa, rng):
    x = random_logits(rng, (22, C), dtype)  # a full small-row group and more
    y = (np.arange(22) + 1) % 6
    x[0, 3] = -np.inf
    x[2, [0, C - 1]] = -np.inf
    x[4, :] = -np.inf
    x[4, y[4]] = 0.5  # every class but the target impossible: loss 0
    ct = compute_dtype(dtype)
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert np.all(np.isfinite(got))
    assert got[4] == 0
    assert_close(got, ref.cross_entropy(x, y, reduction="none"), ct)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none")
    assert np.all(np.isfinite(grad))
    assert np.all(grad[np.isneginf(x)] == 0)
    assert np.all(grad[4] == 0)
    ref_grad = ref.cross_entropy_with_grad(x, y, reduction="none")[1]
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_minus_inf_on_target_gives_inf(dtype, isa, rng):
    # 20 rows: a full group of the small-row kernel (16 rows) and a partial one.
    x = random_logits(rng, (20, 9), dtype)
    y = np.arange(20) % 9
    x[1, 1] = -np.inf
    x[17, 8] = -np.inf
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert got[1] == np.inf and got[17] == np.inf
    assert np.all(np.isfinite(np.delete(got, [1, 17])))
    assert fastxent.cross_entropy(x, y) == np.inf
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none")
    assert_bitwise_equal(loss, got, what="loss")
    # p_y = 0: the true class's gradient is -1, the others p_c.
    assert grad[1, 1] == -1 and grad[17, 8] == -1
    ref_grad = ref.cross_entropy_with_grad(x, y, reduction="none")[1]
    ct = compute_dtype(dtype)
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))
    # from_logits=False: a zero probability on the true class gives inf, no clipping.
    p = random_probs(rng, (3, 4), dtype)
    p[0, 2] = 0
    got = fastxent.cross_entropy(p, [2, 1, 0], from_logits=False, reduction="none")
    assert got[0] == np.inf and np.all(np.isfinite(got[1:]))


@pytest.mark.parametrize("C", [7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_poisons_its_row_only(dtype, C, isa, rng):
    x = random_logits(rng, (19, C), dtype)  # a full small-row group and more
    y = rng.integers(0, C, 19)
    x[2, C // 2] = np.nan
    ct = compute_dtype(dtype)
    clean = np.delete(np.arange(19), 2)
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert np.isnan(got[2])
    assert np.all(np.isfinite(got[clean]))
    assert_close(got[clean], ref.cross_entropy(x[clean], y[clean], reduction="none"), ct)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none")
    assert np.isnan(grad[2]).all()
    assert np.all(np.isfinite(grad[clean]))
    ref_grad = ref.cross_entropy_with_grad(x[clean], y[clean], reduction="none")[1]
    assert_close(grad[clean], ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))
    assert np.isnan(fastxent.cross_entropy(x, y))
    assert np.isnan(fastxent.cross_entropy(x, y, reduction="sum"))
    soft = random_soft_labels(rng, (19, C), dtype)
    got = fastxent.cross_entropy(x, soft, reduction="none")
    assert np.isnan(got[2]) and np.all(np.isfinite(got[clean]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_batch(dtype):
    ct = compute_dtype(dtype)
    x = np.zeros((0, 5), dtype=dtype)
    y = np.zeros(0, dtype=np.int64)
    mean = fastxent.cross_entropy(x, y)
    assert_scalar_of(mean, ct)
    assert np.isnan(mean)
    total = fastxent.cross_entropy(x, y, reduction="sum")
    assert_scalar_of(total, ct)
    assert total == 0
    none = fastxent.cross_entropy(x, y, reduction="none")
    assert none.shape == (0,) and none.dtype == ct
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert np.isnan(loss) and grad.shape == (0, 5) and grad.dtype == dtype
    loss, grad = fastxent.cross_entropy_with_grad(x, np.zeros((0, 5), dtype), reduction="sum")
    assert loss == 0 and grad.shape == (0, 5)
    # A batch axis of length 0 among others, class axis 1.
    x3 = np.zeros((2, 5, 0), dtype=dtype)
    assert fastxent.cross_entropy(x3, np.zeros((2, 0), np.int64), axis=1, reduction="none").shape == (2, 0)
    assert np.isnan(fastxent.cross_entropy(x3, np.zeros((2, 0), np.int64), axis=1))


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_labels_ignored(dtype, label_smoothing, weight, rng):
    x = random_logits(rng, (6, 4), dtype)
    kw = dict(ignore_index=3, label_smoothing=label_smoothing)
    if weight:
        kw["weight"] = np.array([0.5, 1, 2, 3], dtype=dtype)
    y = np.full(6, 3)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, **kw)
    assert np.isnan(loss)
    assert grad.shape == x.shape and np.all(grad == 0)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="sum", **kw)
    assert loss == 0 and np.all(grad == 0)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none", **kw)
    assert np.all(loss == 0) and np.all(grad == 0)


def test_one_dimensional_logits(rng):
    """A single row: batch shape () and a scalar label."""
    x = random_logits(rng, (9,), np.float64)
    got = fastxent.cross_entropy(x, 4, reduction="none")
    assert np.shape(got) == ()
    assert_close(float(got), ref.cross_entropy(x[None], [4], reduction="none")[0], np.float64)
    loss, grad = fastxent.cross_entropy_with_grad(x, np.int64(4))
    assert grad.shape == (9,)
    assert_close(grad, ref.cross_entropy_with_grad(x[None], [4])[1][0], np.float64, scale=1.0)


# ------------------------------------------------------------- result dtypes


@pytest.mark.parametrize(
    "dtype,compute",
    [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64),
     (np.int32, np.float64), (np.int64, np.float64), (np.uint8, np.float64), (np.bool_, np.float64)],
)
def test_result_dtypes(dtype, compute, rng):
    if np.dtype(dtype).kind == "f":
        x = (rng.standard_normal((5, 4)) * 2).astype(dtype)
    else:
        x = rng.integers(0, 5, (5, 4)).astype(dtype)
    y = rng.integers(0, 4, 5)
    assert_scalar_of(fastxent.cross_entropy(x, y), compute)
    assert_scalar_of(fastxent.cross_entropy(x, y, reduction="sum"), compute)
    none = fastxent.cross_entropy(x, y, reduction="none")
    assert isinstance(none, np.ndarray) and none.dtype == compute
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert_scalar_of(loss, compute)
    expected_grad = dtype if np.dtype(dtype).kind == "f" else np.float64
    assert grad.dtype == expected_grad
    assert_close(loss, ref.cross_entropy(x, y), compute)


def test_lists_are_accepted():
    x = [[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]]
    y = [2, 0]
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert got.dtype == np.float64
    assert_close(got, ref.cross_entropy(np.array(x), np.array(y), reduction="none"), np.float64)


@pytest.mark.parametrize("C", [17, 1000])
@pytest.mark.parametrize("layout", ["contiguous", "class_first", "negative"])
def test_float16_smoke(layout, C, rng):
    logical = random_logits(rng, (19, C), np.float16)
    y = rng.integers(0, C, 19)
    arr, axis = make_layout(logical, layout)
    got = fastxent.cross_entropy(arr, y, axis=axis, reduction="none")
    assert got.dtype == np.float32
    assert_close(got, ref.cross_entropy(logical, y, reduction="none"), np.float32)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(logical, y)
    for out_kind in ("none", "prealloc", "inplace"):
        arr, axis = make_layout(logical, layout)
        out = make_out(arr, out_kind)
        loss, grad = fastxent.cross_entropy_with_grad(arr, y, axis=axis, out=out)
        assert_scalar_of(loss, np.float32)
        assert_close(loss, ref_loss, np.float32)
        assert grad.dtype == np.float16 and grad.shape == arr.shape
        if out is not None:
            assert np.shares_memory(grad, out)
        # float16 rounding of the float32 gradient: 2**-11 relative, 2**-25 absolute.
        g = to_logical(grad, axis).astype(np.float64)
        assert np.all(np.abs(g - ref_grad) <= 2.0**-10 * np.abs(ref_grad) + 2.0**-24)


def test_bfloat16_smoke(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x = random_logits(rng, (11, 33), np.float32).astype(bf16)
    y = rng.integers(0, 33, 11)
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert_scalar_of(loss, np.float32)
    assert grad.dtype == np.dtype(bf16)
    x64 = x.astype(np.float64)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x64, y)
    assert_close(loss, ref_loss, np.float32)
    g = grad.astype(np.float64)
    assert np.all(np.abs(g - ref_grad) <= 2.0**-7 * np.abs(ref_grad) + 2.0**-126)


# -------------------------------------------------------------- out=logits


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_is_logits_in_place(dtype, rng):
    x = random_logits(rng, (64, 50), dtype)
    y = rng.integers(0, 50, 64)
    ref_loss, ref_grad = ref.cross_entropy_with_grad(x.copy(), y, label_smoothing=0.1)
    buf = x
    loss, grad = fastxent.cross_entropy_with_grad(buf, y, label_smoothing=0.1, out=buf)
    assert grad is buf or (np.shares_memory(grad, buf) and grad.shape == buf.shape)
    ct = compute_dtype(dtype)
    assert_close(loss, ref_loss, ct)
    assert_close(buf, ref_grad, ct, scale=grad_scale(ref_grad, 1 / 64))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_prealloc_strided(dtype, rng):
    """out= may be any writable array of the right shape and dtype."""
    x = random_logits(rng, (20, 33), dtype)
    y = rng.integers(0, 33, 20)
    ref_grad = ref.cross_entropy_with_grad(x, y)[1]
    ct = compute_dtype(dtype)
    for out in (np.empty((33, 20), dtype).T, np.full((20, 70), np.nan, dtype)[:, ::2][:, :33],
                np.empty((20, 33), dtype)[::-1]):
        _, grad = fastxent.cross_entropy_with_grad(x, y, out=out)
        assert np.shares_memory(grad, out)
        assert_close(out, ref_grad, ct, scale=grad_scale(ref_grad, 1 / 20))


# ------------------------------------------------------------ PyTorch oracle

TORCH_OPTIONS = [name for name, spec in OPTION_SETS.items() if spec.get("from_logits", True)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "axis1_3d"])
@pytest.mark.parametrize("name", TORCH_OPTIONS)
def test_against_torch(name, layout, dtype, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logical, labels, kw = build_case(rng, dtype, 17, layout, OPTION_SETS[name])
    arr, axis = make_layout(logical, layout)
    larr = layout_labels(labels, layout)
    reduction = kw.get("reduction", "mean")
    base = kw.get("base")
    # PyTorch puts the classes on axis 1: exactly our arr for both layouts.
    x = torch.tensor(arr.astype(np.float64), requires_grad=True)
    if np.asarray(larr).dtype.kind == "f":
        target = torch.tensor(larr.astype(np.float64))
    else:
        target = torch.tensor(larr, dtype=torch.long)
    tkw = dict(reduction=reduction, label_smoothing=kw.get("label_smoothing", 0.0))
    if target.dtype == torch.long:  # PyTorch refuses ignore_index with probability targets
        tkw["ignore_index"] = kw.get("ignore_index", -100)
    if "weight" in kw:
        tkw["weight"] = torch.tensor(kw["weight"].astype(np.float64))
    t_loss = F.cross_entropy(x, target, **tkw)
    if base is not None:
        t_loss = t_loss / math.log(base)
    if reduction == "none":
        go = rng.standard_normal(t_loss.shape)
        t_loss.backward(torch.tensor(go))
    else:
        go = 1.0
        t_loss.backward()
    ct = compute_dtype(dtype)
    loss, grad = fastxent.cross_entropy_with_grad(arr, larr, axis=axis, grad_output=go, **kw)
    assert_close(loss, t_loss.detach().numpy(), ct, what="loss vs torch")
    t_grad = x.grad.numpy()
    assert_close(grad, t_grad, ct, scale=grad_scale(t_grad, 1e-6), what="grad vs torch")


def test_torch_tensors_as_input(rng):
    torch = pytest.importorskip("torch")
    x = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(1))
    got = fastxent.cross_entropy(x, y, reduction="none")
    assert_bitwise_equal(got, fastxent.cross_entropy(x.numpy(), y.numpy(), reduction="none"))
    expected = torch.nn.functional.cross_entropy(x.double(), y, reduction="none").numpy()
    assert_close(got, expected, np.float32)
    # A non-contiguous tensor view (the classes on axis 0).
    xt = x.t()
    got = fastxent.cross_entropy(xt, y, axis=0, reduction="none")
    assert_close(got, expected, np.float32)
