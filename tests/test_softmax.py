"""logsumexp, log_softmax, softmax and entropy against fastxent.reference,
SciPy and PyTorch, over the layout/threads/ISA matrix and the edge rows of
the contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent
from fastxent import reference as ref

from conftest import (
    EDGE_WIDTHS,
    FLOAT_DTYPES,
    LAYOUTS,
    OUT_KINDS,
    SMALL_WIDTHS,
    THREADS,
    assert_close,
    assert_softmax_close,
    batch_shape,
    call_with_out,
    compute_dtype,
    each_isa,
    make_layout,
    make_out,
    random_logits,
    random_probs,
    to_logical,
    wide_cases,
)

FUNCTIONS_WITH_OUT = ("log_softmax", "softmax")


class FamilyCase:
    """Random logits and probabilities with their reference results, computed
    once and checked against any layout / out= / threads / ISA."""

    def __init__(self, rng, dtype, C, layout, n):
        self.dtype, self.C, self.layout = dtype, C, layout
        self.ct = compute_dtype(dtype)
        self.batch = batch_shape(layout, n)
        self.logical = random_logits(rng, self.batch + (C,), dtype)
        probs = random_probs(rng, self.batch + (C,), dtype)
        probs.reshape(-1)[::5] = 0  # 0 log 0 counts as 0
        self.probs = probs
        x = self.logical
        self.lse = ref.logsumexp(x)
        self.ent = ref.entropy(x)
        self.ent_probs = ref.entropy(probs, from_logits=False, base=2)
        self.expected = {"log_softmax": ref.log_softmax(x), "softmax": ref.softmax(x)}

    def check(self, out_kind, threads, where=""):
        dtype, ct, batch, layout, C = self.dtype, self.ct, self.batch, self.layout, self.C
        arr, axis = make_layout(self.logical, layout)
        kw = {"axis": axis, "num_threads": threads}

        got = fastxent.logsumexp(arr, **kw)
        assert isinstance(got, np.ndarray) and got.shape == batch and got.dtype == ct, where
        assert_close(got, self.lse, ct, what=f"logsumexp {where}")

        got = fastxent.entropy(arr, **kw)
        assert isinstance(got, np.ndarray) and got.shape == batch and got.dtype == ct, where
        assert_close(got, self.ent, ct, what=f"entropy {where}")
        eps = np.finfo(ct).eps
        assert np.all(got >= -8 * eps) and np.all(got <= math.log(C) * (1 + 8 * eps) + 8 * eps), where

        parr, _ = make_layout(self.probs, layout)
        got = fastxent.entropy(parr, from_logits=False, base=2, **kw)
        assert got.shape == batch and got.dtype == ct, where
        assert_close(got, self.ent_probs, ct, what=f"entropy(probs) {where}")

        assert np.array_equal(to_logical(arr, axis), self.logical), f"input modified {where}"

        for name in FUNCTIONS_WITH_OUT:
            fn = getattr(fastxent, name)
            expected = self.expected[name]
            arr, axis = make_layout(self.logical, layout)
            step = call_with_out(lambda out: fn(arr, axis=axis, out=out, num_threads=threads),
                                 arr, self.logical, axis, layout, out_kind, what=f"{name} {where}")
            if step is None:
                continue
            res, out = step
            assert isinstance(res, np.ndarray), name
            assert res.shape == arr.shape and res.dtype == np.dtype(dtype), f"{name} {where}"
            if out is not None:
                assert np.shares_memory(res, out), f"{name}: not written into out= {where}"
                assert np.array_equal(res, out)
            if name == "softmax":
                assert_softmax_close(to_logical(res, axis), expected, ct, what=f"{name} {where}")
            else:
                assert_close(to_logical(res, axis), expected, ct, what=f"{name} {where}")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", SMALL_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_widths_full_product(dtype, C, layout, out_kind, threads, isa, rng):
    FamilyCase(rng, dtype, C, layout, n=37).check(out_kind, threads)


# With an odd row count.
@pytest.mark.parametrize("C", EDGE_WIDTHS)
@pytest.mark.parametrize("layout", ("contiguous", "strided"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_small_path_edge_widths(dtype, C, layout, isa, rng):
    case = FamilyCase(rng, dtype, C, layout, n=53)
    for out_kind in OUT_KINDS:
        case.check(out_kind, 1)


WIDE_CASES = wide_cases([
    ("contiguous", "prealloc"),
    ("contiguous", "inplace"),
    ("class_first", "inplace"),
    ("strided", "prealloc"),
    ("fortran", "inplace"),
    ("axis1_3d", "prealloc"),
])


@pytest.mark.parametrize("C,layout,out_kind", WIDE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_wide_widths(dtype, C, layout, out_kind, rng):
    """Every ISA and thread count on one set of data (the reference is the slow part)."""
    case = FamilyCase(rng, dtype, C, layout, n=3 if C > 10000 else 24)
    for isa_name in each_isa():
        for threads in THREADS:
            case.check(out_kind, threads, where=f"[isa={isa_name} threads={threads}]")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_huge_row(dtype, threads, isa, rng):
    C = 200_003
    x = random_logits(rng, (1, C), dtype)
    ct = compute_dtype(dtype)
    assert_close(fastxent.logsumexp(x, num_threads=threads), ref.logsumexp(x), ct)
    assert_close(fastxent.entropy(x, num_threads=threads), ref.entropy(x), ct)
    assert_close(fastxent.log_softmax(x, num_threads=threads), ref.log_softmax(x), ct)
    assert_softmax_close(fastxent.softmax(x, num_threads=threads), ref.softmax(x), ct)


# ------------------------------------------------------------ entropy options


@pytest.mark.parametrize("base", [None, 2, 10, 0.5, math.e])
@pytest.mark.parametrize("C", [1, 7, 17, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_entropy_base_and_probabilities(dtype, C, base, isa, rng):
    scipy_special = pytest.importorskip("scipy.special")
    ct = compute_dtype(dtype)
    div = 1.0 if base is None else math.log(base)
    x = random_logits(rng, (13, C), dtype)
    got = fastxent.entropy(x, base=base)
    assert_close(got, ref.entropy(x, base=base), ct)
    p64 = ref.softmax(x)
    assert_close(got, scipy_special.entr(p64).sum(axis=-1) / div, ct, what="vs scipy entr")

    p = random_probs(rng, (13, C), dtype)
    if C > 1:
        p[::2, 0] = 0
    got = fastxent.entropy(p, from_logits=False, base=base)
    assert got.dtype == ct and got.shape == (13,)
    expected = scipy_special.entr(p.astype(np.float64)).sum(axis=-1) / div
    assert_close(got, expected, ct, what="probs vs scipy entr")
    assert_close(got, ref.entropy(p, from_logits=False, base=base), ct, what="probs vs reference")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entropy_of_probabilities_vector_and_library_blocks(dtype, isa, rng):
    """Probabilities are taken 8 at a time with the project's log; zeros stay
    in the vector path, a block holding a subnormal (or NaN) goes through the
    C library, and a 37-wide row has a tail."""
    scipy_special = pytest.importorskip("scipy.special")
    p = random_probs(rng, (5, 37), dtype)
    p[0, [0, 9, 36]] = 0
    p[1, 17] = np.finfo(dtype).smallest_subnormal * 8
    p[2, :] = 0
    p[2, 20] = 1  # one-hot: entropy 0
    ct = compute_dtype(dtype)
    got = fastxent.entropy(p, from_logits=False)
    expected = scipy_special.entr(p.astype(np.float64)).sum(axis=-1)
    assert_close(got, expected, ct, what="vs scipy entr")
    assert got[2] == 0
    p[3, 5] = np.nan
    got = fastxent.entropy(p, from_logits=False)
    assert np.isnan(got[3]) and np.all(np.isfinite(np.delete(got, 3)))


def test_entropy_of_uniform_and_one_hot():
    for C in (1, 2, 7, 1000):
        np.testing.assert_allclose(fastxent.entropy(np.zeros((2, C))), math.log(C), rtol=1e-14, atol=0)
        np.testing.assert_allclose(
            fastxent.entropy(np.full((2, C), 1.0 / C), from_logits=False), math.log(C), rtol=1e-12
        )
        assert np.all(fastxent.entropy(np.eye(C), from_logits=False) == 0)
        np.testing.assert_allclose(fastxent.entropy(np.zeros((2, C)), base=2), math.log2(C), rtol=1e-14)


# --------------------------------------------------------------- other oracles


@pytest.mark.parametrize("C", [1, 9, 1000])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_against_scipy(axis, C, rng):
    special = pytest.importorskip("scipy.special")
    x = random_logits(rng, (11, C) if axis != 0 else (C, 11), np.float64)
    assert_close(fastxent.logsumexp(x, axis=axis), special.logsumexp(x, axis=axis), np.float64)
    assert_close(fastxent.log_softmax(x, axis=axis), special.log_softmax(x, axis=axis), np.float64)
    assert_softmax_close(fastxent.softmax(x, axis=axis), special.softmax(x, axis=axis), np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((13, 17), 1), ((17, 13), 0), ((3, 17, 5), 1), ((2, 3, 1000), -1)])
def test_against_torch(shape, dim, dtype, rng):
    torch = pytest.importorskip("torch")
    x = random_logits(rng, shape, dtype)
    ct = compute_dtype(dtype)
    t = torch.tensor(x.astype(np.float64))
    assert_close(fastxent.logsumexp(x, axis=dim), torch.logsumexp(t, dim=dim).numpy(), ct)
    assert_close(fastxent.log_softmax(x, axis=dim), torch.nn.functional.log_softmax(t, dim=dim).numpy(), ct)
    assert_softmax_close(fastxent.softmax(x, axis=dim), torch.nn.functional.softmax(t, dim=dim).numpy(), ct)
    categorical = torch.distributions.Categorical(logits=torch.movedim(t, dim, -1))
    assert_close(fastxent.entropy(x, axis=dim), categorical.entropy().numpy(), ct)
    # torch tensors are array-likes.
    got = fastxent.logsumexp(torch.tensor(x), axis=dim)
    np.testing.assert_array_equal(got, fastxent.logsumexp(x, axis=dim))


# ----------------------------------------------------------------- accuracy


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("C", [7, 17, 1000, 50257])
def test_float32_rows_with_large_common_offset(C, offset, isa, rng):
    n = 3 if C > 10000 else 31
    x = (offset + rng.standard_normal((n, C))).astype(np.float32)
    assert_close(fastxent.logsumexp(x), ref.logsumexp(x), np.float32, what="logsumexp")
    # log_softmax keeps x - max - log(sum): no digit is lost to the offset.
    assert_close(fastxent.log_softmax(x), ref.log_softmax(x), np.float32, what="log_softmax")
    assert_softmax_close(fastxent.softmax(x), ref.softmax(x), np.float32, what="softmax")
    # entropy = lse - sum p x would cancel catastrophically here.
    assert_close(fastxent.entropy(x), ref.entropy(x), np.float32, what="entropy")


# ---------------------------------------------------------------- edge rows


@pytest.mark.parametrize("value", [1e30, -1e30, -1e4, 0.0, 3e38, -3e38])
@pytest.mark.parametrize("C", [1, 7, 16, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_rows(dtype, C, value, isa):
    ct = compute_dtype(dtype)
    x = np.full((3, C), value, dtype=dtype)
    stored = float(np.asarray(value, dtype=dtype))
    lse = fastxent.logsumexp(x)
    assert np.all(np.isfinite(lse))
    assert_close(lse, np.full(3, stored + math.log(C)), ct, what="logsumexp")
    assert_close(fastxent.entropy(x), np.full(3, math.log(C)), ct, what="entropy (ln C, not 0)")
    assert_close(fastxent.log_softmax(x), np.full((3, C), -math.log(C)), ct, what="log_softmax")
    assert_softmax_close(fastxent.softmax(x), np.full((3, C), 1.0 / C), ct, what="softmax")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mixed_extreme_row(dtype, isa):
    x = np.array([[1e30, 0.0, -1e30, 5.0], [-1e30, -1e30, 1e30, -1e30]], dtype=dtype)
    np.testing.assert_array_equal(fastxent.softmax(x), [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(fastxent.entropy(x), [0, 0])
    ls = fastxent.log_softmax(x)
    assert ls[0, 0] == 0 and ls[1, 2] == 0
    assert_close(ls[0, 1:], [-1e30, -2e30, -1e30], compute_dtype(dtype), scale=1e30)
    assert_close(fastxent.logsumexp(x), [1e30, 1e30], compute_dtype(dtype), scale=1e30)


@pytest.mark.parametrize("C", [7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_very_negative_rows(dtype, C, isa, rng):
    x = (-1e4 + rng.standard_normal((5, C))).astype(dtype)
    ct = compute_dtype(dtype)
    for name in ("logsumexp", "entropy", "log_softmax"):
        got = getattr(fastxent, name)(x)
        assert np.all(np.isfinite(got)), name
        assert_close(got, getattr(ref, name)(x), ct, what=name)
    got = fastxent.softmax(x)
    assert not np.isnan(got).any()
    assert_softmax_close(got, ref.softmax(x), ct)
    np.testing.assert_allclose(got.sum(axis=-1, dtype=np.float64), 1, rtol=1e-5)


@pytest.mark.parametrize("C", [7, 17, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_minus_inf_logits(dtype, C, isa, rng):
    ct = compute_dtype(dtype)
    x = random_logits(rng, (5, C), dtype)
    x[0, 2] = -np.inf
    x[1, ::2] = -np.inf
    x[3, :] = -np.inf
    x[3, 1] = 4.0  # a single possible class
    ent = fastxent.entropy(x)
    assert np.all(np.isfinite(ent))
    assert ent[3] == 0
    assert_close(ent, ref.entropy(x), ct, what="entropy")
    lse = fastxent.logsumexp(x)
    assert np.all(np.isfinite(lse)) and lse[3] == 4.0
    assert_close(lse, ref.logsumexp(x), ct, what="logsumexp")
    ls = fastxent.log_softmax(x)
    assert np.array_equal(np.isneginf(ls), np.isneginf(x))
    assert ls[3, 1] == 0
    assert_close(ls, ref.log_softmax(x), ct, what="log_softmax")
    sm = fastxent.softmax(x)
    assert np.all(sm[np.isneginf(x)] == 0) and sm[3, 1] == 1
    assert_softmax_close(sm, ref.softmax(x), ct)
    # The same rows given as probabilities: exact zeros count 0 log 0 = 0.
    p = ref.softmax(x).astype(dtype)
    got = fastxent.entropy(p, from_logits=False)
    assert np.all(np.isfinite(got))
    assert_close(got, ref.entropy(p, from_logits=False), ct)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_plus_inf_logit(dtype, isa):
    """log(sum(exp(x))) with a +inf term is +inf (IEEE; SciPy and PyTorch agree)."""
    x = np.array([[0.0, np.inf, 1.0], [0.0, 1.0, 2.0]], dtype=dtype)
    lse = fastxent.logsumexp(x)
    assert lse[0] == np.inf
    assert np.isfinite(lse[1])


@pytest.mark.parametrize("C", [7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_poisons_its_row_only(dtype, C, isa, rng):
    ct = compute_dtype(dtype)
    x = random_logits(rng, (6, C), dtype)
    x[4, C - 1] = np.nan
    clean = [0, 1, 2, 3, 5]
    for name in ("logsumexp", "entropy"):
        got = getattr(fastxent, name)(x)
        assert np.isnan(got[4]), name
        assert_close(got[clean], getattr(ref, name)(x[clean]), ct, what=name)
    for name in FUNCTIONS_WITH_OUT:
        got = getattr(fastxent, name)(x)
        assert np.isnan(got[4]).all(), name
        assert not np.isnan(got[clean]).any(), name
    assert_close(fastxent.log_softmax(x)[clean], ref.log_softmax(x[clean]), ct)
    assert_softmax_close(fastxent.softmax(x)[clean], ref.softmax(x[clean]), ct)
    p = random_probs(rng, (6, C), dtype)
    p[2, 0] = np.nan
    got = fastxent.entropy(p, from_logits=False)
    assert np.isnan(got[2]) and not np.isnan(np.delete(got, 2)).any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_batch(dtype):
    ct = compute_dtype(dtype)
    x = np.zeros((0, 6), dtype=dtype)
    for name in ("logsumexp", "entropy"):
        got = getattr(fastxent, name)(x)
        assert got.shape == (0,) and got.dtype == ct, name
    for name in FUNCTIONS_WITH_OUT:
        got = getattr(fastxent, name)(x)
        assert got.shape == (0, 6) and got.dtype == dtype, name
    x3 = np.zeros((3, 6, 0), dtype=dtype)
    assert fastxent.logsumexp(x3, axis=1).shape == (3, 0)
    assert fastxent.softmax(x3, axis=1).shape == (3, 6, 0)


def test_one_dimensional_input(rng):
    x = random_logits(rng, (10,), np.float64)
    lse = fastxent.logsumexp(x)
    assert np.shape(lse) == ()
    assert_close(float(lse), ref.logsumexp(x[None])[0], np.float64)
    assert np.shape(fastxent.entropy(x)) == ()
    ls = fastxent.log_softmax(x)
    assert ls.shape == (10,)
    assert_close(ls, ref.log_softmax(x[None])[0], np.float64)


# ------------------------------------------------------------- result dtypes


@pytest.mark.parametrize(
    "dtype,compute,same",
    [(np.float16, np.float32, np.float16), (np.float32, np.float32, np.float32),
     (np.float64, np.float64, np.float64), (np.int32, np.float64, np.float64),
     (np.int8, np.float64, np.float64), (np.bool_, np.float64, np.float64)],
)
def test_result_dtypes(dtype, compute, same, rng):
    if np.dtype(dtype).kind == "f":
        x = random_logits(rng, (4, 9), dtype)
    else:
        x = rng.integers(0, 2, (4, 9)).astype(dtype)
    assert fastxent.logsumexp(x).dtype == compute
    assert fastxent.entropy(x).dtype == compute
    assert fastxent.log_softmax(x).dtype == same
    assert fastxent.softmax(x).dtype == same
    assert_close(fastxent.logsumexp(x), ref.logsumexp(x), compute)


@pytest.mark.parametrize("C", [17, 1000])
@pytest.mark.parametrize("layout", ["contiguous", "class_first", "strided"])
def test_float16_smoke(layout, C, rng):
    logical = random_logits(rng, (19, C), np.float16)
    arr, axis = make_layout(logical, layout)
    assert_close(fastxent.logsumexp(arr, axis=axis), ref.logsumexp(logical), np.float32)
    assert_close(fastxent.entropy(arr, axis=axis), ref.entropy(logical), np.float32)
    for name in FUNCTIONS_WITH_OUT:
        expected = getattr(ref, name)(logical)
        for out_kind in OUT_KINDS:
            arr, axis = make_layout(logical, layout)
            out = make_out(arr, out_kind)
            got = getattr(fastxent, name)(arr, axis=axis, out=out)
            assert got.dtype == np.float16
            g = to_logical(got, axis).astype(np.float64)
            # float16 rounding of a float32 result: 2**-11 relative, 2**-25 absolute.
            bad = np.abs(g - expected) > 2.0**-10 * np.abs(expected) + 2.0**-24
            assert not bad.any(), f"{name} {out_kind}: {g[bad][:3]} vs {expected[bad][:3]}"


def test_bfloat16_smoke(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x = random_logits(rng, (7, 40), np.float32).astype(bf16)
    x64 = x.astype(np.float64)
    assert_close(fastxent.logsumexp(x), ref.logsumexp(x64), np.float32)
    got = fastxent.softmax(x)
    assert got.dtype == np.dtype(bf16)
    expected = ref.softmax(x64)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= 2.0**-7 * expected + 2.0**-126)
