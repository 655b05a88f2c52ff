"""Shared fixtures and helpers of the fastxent test suite.

The oracle is ``fastxent.reference`` (float64 NumPy).  Tolerances follow the
contract in API.md:

* float32 compute: within ``ulps`` float32 ulp (2**-23) of ``max(|ref|, scale)``
  elementwise, ``scale`` being 1 for losses and the size of the gradient for
  gradients (gradients of a mean are O(1/N), so 1 would be meaningless);
* float64 compute: ``1e-12`` relative to ``max(|ref|, scale)``.

NaN and infinities must sit at exactly the same places as in the reference.

Test modules import the helpers below with ``from conftest import ...``
(pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest

import fastxent
from fastxent import _core

AVAILABLE_ISAS = list(_core.available_isas())

SMALL_WIDTHS = (1, 7, 8, 9, 15, 16, 17)
WIDE_WIDTHS = (1000, 50257)
FLOAT_DTYPES = (np.float32, np.float64)
THREADS = (1, 2, None)
OUT_KINDS = ("none", "prealloc", "inplace")
# The small-row path's edges (48: float64 and log_softmax; 63: float32),
# its 8-column tiles and the gathers of a row's last 1-4 columns (4-20);
# the row kernels' row pairs (up to 1 KiB a row).
EDGE_WIDTHS = (4, 10, 12, 20, 23, 24, 31, 32, 47, 48, 49, 56, 63, 64, 129, 256)

# Memory layouts of the logits.  All but "class_first" and "axis1_3d" keep the
# class axis last (axis=-1) and differ in their strides.
LAYOUTS = (
    "contiguous",  # C order, axis=-1
    "strided",  # a view with a step on both axes (gaps hold NaN)
    "fortran",  # F order: the class axis is last but strided
    "class_first",  # (C, N) C order, axis=0
    "negative",  # negative strides on both axes
    "readonly",  # contiguous, setflags(write=False)
    "axis1_3d",  # (B, C, T) C order, axis=1 (the PyTorch layout)
)


def wide_cases(extra):
    """(C, layout, out_kind) of the wide-row tests: every layout without
    out=, and the ``extra`` (layout, out_kind) pairs, for each wide C."""
    return ([(C, layout, "none") for C in WIDE_WIDTHS for layout in LAYOUTS]
            + [(C, layout, out_kind) for C in WIDE_WIDTHS for layout, out_kind in extra])

EPS32 = 2.0**-23
RTOL64 = 1e-12


# ----------------------------------------------------------------- fixtures


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Run the test once per instruction set this machine can execute."""
    previous = _core.get_isa()
    _core.set_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_isa(previous)


def each_isa():
    """Iterate over the available ISAs, switched on in turn, then restored."""
    previous = _core.get_isa()
    try:
        for name in AVAILABLE_ISAS:
            _core.set_isa(name)
            yield name
    finally:
        _core.set_isa(previous)


@pytest.fixture
def restore_num_threads():
    """Put the library's thread count back as it was after the test.

    ``set_num_threads(None)`` goes back to following OpenMP (OMP_NUM_THREADS,
    threadpoolctl); only when that gives another count than before was an
    explicit count in force, and it is set again.
    """
    before = fastxent.get_num_threads()
    yield before
    fastxent.set_num_threads(None)
    if fastxent.get_num_threads() != before:
        fastxent.set_num_threads(before)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: reproducible, different per case."""
    seed = zlib.crc32(request.node.nodeid.encode())  # hash() is salted per process
    return np.random.default_rng(seed)


# ------------------------------------------------------------ data helpers


def compute_dtype(dtype) -> type:
    """The dtype fastxent computes in for inputs of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype == np.float64 or dtype.kind in "iub":
        return np.float64
    return np.float32


def batch_shape(layout: str, n: int) -> tuple:
    """Batch shape used for ``layout`` with about ``n`` rows."""
    if layout == "axis1_3d":
        return (2, (n + 1) // 2)
    return (n,)


def make_layout(logical, layout: str):
    """Lay out ``logical`` (batch..., C), C-contiguous, in memory as ``layout``.

    Returns ``(arr, axis)``: ``np.moveaxis(arr, axis, -1)`` equals ``logical``
    elementwise, whatever the strides of ``arr``.
    """
    # Always a fresh copy: a layout that happens to match the input's (C == 1
    # is already Fortran-ordered) must not hand back the caller's array,
    # which an out=logits test would then overwrite.
    logical = np.array(logical, order="C", copy=True)
    if layout == "contiguous":
        return logical.copy(), -1
    if layout == "readonly":
        arr = logical.copy()
        arr.setflags(write=False)
        return arr, -1
    if layout == "fortran":
        return np.asfortranarray(logical).copy(order="F"), -1
    if layout == "strided":
        shape = list(logical.shape)
        shape[0] = 2 * shape[0] + 1
        shape[-1] = 3 * shape[-1] + 2
        buf = np.empty(shape, dtype=logical.dtype)
        if buf.dtype.kind == "f" or buf.dtype.name == "bfloat16":
            buf[...] = np.nan  # reading a gap poisons the result
        else:
            buf[...] = 0
        view = buf[_strided_index(logical.ndim)]
        view[...] = logical
        return view, -1
    if layout == "negative":
        rev = (slice(None, None, -1),) * logical.ndim
        buf = logical[rev].copy()
        return buf[rev], -1
    if layout == "class_first":
        return np.moveaxis(logical, -1, 0).copy(), 0
    if layout == "axis1_3d":
        assert logical.ndim == 3
        return np.moveaxis(logical, -1, 1).copy(), 1
    raise AssertionError(f"unknown layout {layout!r}")


def _strided_index(ndim):
    return tuple([slice(1, None, 2)] + [slice(None)] * (ndim - 2) + [slice(2, None, 3)])


def strided_gaps(view):
    """The elements of a "strided" layout's buffer that are not in the view."""
    buf = view.base
    while buf.base is not None:
        buf = buf.base
    mask = np.ones(buf.shape, dtype=bool)
    mask[_strided_index(buf.ndim)] = False
    return buf[mask]


def to_logical(arr, axis):
    """Inverse of :func:`make_layout`: the class axis moved last."""
    return np.moveaxis(np.asarray(arr), axis, -1)


def make_out(arr, kind: str, dtype=None):
    """An ``out=`` argument for an output shaped like ``arr``."""
    if kind == "none":
        return None
    if kind == "prealloc":
        out = np.empty(arr.shape, dtype=dtype or arr.dtype)
        out[...] = 12345  # garbage that must be overwritten
        return out
    if kind == "inplace":
        return arr
    raise AssertionError(kind)


def call_with_out(fn, arr, logical, axis, layout, out_kind, *, gaps=None, what=""):
    """One step of the out= matrix: ``fn(out)`` with an out= of ``out_kind``
    (make_out) for ``arr``, which is ``logical`` laid out as ``layout``.

    out=arr on a read-only input must raise ValueError and leave the input
    as it was: returns None. Otherwise returns ``(result, out)`` once the
    input is checked unchanged (unless overwritten in place) and, for a
    strided layout, nothing was written between the elements of the view
    (``gaps(arr)``, strided_gaps by default, all NaN)."""
    out = make_out(arr, out_kind)
    if out_kind == "inplace" and layout == "readonly":
        with pytest.raises(ValueError):
            fn(out)
        assert np.array_equal(to_logical(arr, axis), logical), f"read-only input modified {what}"
        return None
    result = fn(out)
    if out_kind != "inplace":
        assert np.array_equal(to_logical(arr, axis), logical), f"input modified {what}"
    if gaps is not None or layout == "strided":
        assert np.isnan((gaps or strided_gaps)(arr)).all(), f"wrote outside the view {what}"
    return result, out


def random_logits(rng, shape, dtype, scale=3.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def random_probs(rng, shape, dtype, floor=0.0):
    """Rows of probabilities (softmax of random logits), normalised in float64."""
    x = 2.0 * rng.standard_normal(shape)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if floor:
        p = np.maximum(p, floor)
        p /= p.sum(axis=-1, keepdims=True)
    return p.astype(dtype)


def random_soft_labels(rng, shape, dtype, normalized=True):
    t = rng.random(shape)
    if normalized:
        t /= t.sum(axis=-1, keepdims=True)
    else:
        t *= 2.0  # rows sum to about C, used as given
    return t.astype(dtype)


# ------------------------------------------------------------- assertions


def bits(a) -> np.ndarray:
    """The bytes of ``a`` (so NaN == NaN and -0.0 != 0.0)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.reshape(-1).view(np.uint8)


def assert_bitwise_equal(a, b, what=""):
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if not np.array_equal(bits(a), bits(b)):
        diff = np.flatnonzero(np.asarray(a != b).reshape(-1) | (np.isnan(a) != np.isnan(b)).reshape(-1))
        i = diff[0] if diff.size else 0
        raise AssertionError(
            f"{what}: not bitwise identical; {diff.size} elements differ, first at flat "
            f"index {i}: {a.reshape(-1)[i]!r} vs {b.reshape(-1)[i]!r}"
        )


def assert_close(got, ref, compute, *, ulps=8, scale=1.0, rtol64=RTOL64, what=""):
    """``got`` within ``ulps`` float32 ulp (or ``rtol64``) of ``max(|ref|, scale)``.

    ``compute`` is the compute dtype (np.float32 or np.float64).  NaN and inf
    must match the reference exactly.
    """
    got_arr = np.asarray(got)
    ref_arr = np.asarray(ref, dtype=np.float64)
    assert got_arr.shape == ref_arr.shape, f"{what}: shape {got_arr.shape} != {ref_arr.shape}"
    g = got_arr.astype(np.float64)
    r = ref_arr
    nan_g, nan_r = np.isnan(g), np.isnan(r)
    if not np.array_equal(nan_g, nan_r):
        i = np.flatnonzero((nan_g != nan_r).reshape(-1))[0]
        raise AssertionError(
            f"{what}: NaN mismatch at flat index {i}: got {g.reshape(-1)[i]!r}, ref {r.reshape(-1)[i]!r}"
        )
    inf_r = np.isinf(r)
    if not np.array_equal(np.isinf(g), inf_r) or not np.array_equal(g[inf_r], r[inf_r]):
        i = np.flatnonzero((np.isinf(g) != inf_r).reshape(-1) | ((g != r) & inf_r).reshape(-1))[0]
        raise AssertionError(
            f"{what}: inf mismatch at flat index {i}: got {g.reshape(-1)[i]!r}, ref {r.reshape(-1)[i]!r}"
        )
    finite = np.isfinite(r)
    single = np.dtype(compute) == np.float32
    tol = ulps * EPS32 if single else rtol64
    bound = tol * np.maximum(np.abs(r), scale)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if np.any(bad):
        worst = np.argmax(np.where(finite, err / np.where(bound > 0, bound, 1e-300), 0.0))
        gi, ri = g.reshape(-1)[worst], r.reshape(-1)[worst]
        unit = EPS32 if single else 2.0**-52
        allowed = f"{ulps} ulp" if single else f"{rtol64:g} relative"
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements out of tolerance ({allowed} of "
            f"max(|ref|, {scale:.3g})); worst at flat index {worst}: got {gi!r}, ref {ri!r}, "
            f"error {abs(gi - ri) / (unit * max(abs(ri), scale)):.1f} ulp"
        )


def grad_scale(ref_grad, floor):
    """Scale for gradient tolerances: the largest |gradient|, at least ``floor``."""
    r = np.asarray(ref_grad, dtype=np.float64)
    finite = r[np.isfinite(r)]
    biggest = float(np.max(np.abs(finite))) if finite.size else 0.0
    return max(biggest, floor)


def check_grad(grad, arr, dtype, out, expected, *, axis=-1, floor=0.0, relative=False,
               close=None, what="grad"):
    """``grad`` has the shape of ``arr`` (the logits) and ``dtype``, lives in
    ``out`` when given, and matches ``expected`` (class axis last): within
    assert_close's tolerance of the largest |gradient| (at least ``floor``),
    or of each element's own size with ``relative``. A family with its own
    tolerance model passes ``close(got, expected, scale, what)`` instead."""
    assert isinstance(grad, np.ndarray), what
    assert grad.shape == arr.shape, f"{what}: shape {grad.shape} != {arr.shape}"
    assert grad.dtype == np.dtype(dtype), f"{what}: dtype {grad.dtype} != {np.dtype(dtype)}"
    if out is not None:
        assert np.shares_memory(grad, out), f"{what}: not written into out="
        assert_bitwise_equal(grad, out, what=f"{what} vs out")
    scale = 1e-300 if relative else grad_scale(expected, floor)
    got = grad if axis == -1 else to_logical(grad, axis)
    if close is not None:
        close(got, expected, scale, what)
    else:
        assert_close(got, expected, compute_dtype(dtype), scale=scale, what=what)


def assert_softmax_close(got, ref, compute, *, what=""):
    """Per-element relative check for probabilities.

    A probability is exp(x - lse); an argument of size |log p| carries a
    rounding error of |log p| ulp, so float32 gets 32 ulp relative (|log p|
    stays under ~25 for our data), plus an absolute floor at the bottom of the
    normal range where an exp may flush to zero.
    """
    got_arr = np.asarray(got)
    r = np.asarray(ref, dtype=np.float64)
    assert got_arr.shape == r.shape, f"{what}: shape {got_arr.shape} != {r.shape}"
    g = got_arr.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(r)), f"{what}: NaN mismatch"
    finite = np.isfinite(r)
    if np.dtype(compute) == np.float32:
        bound = 32 * EPS32 * np.abs(r) + 2.0**-125
    else:
        bound = RTOL64 * np.abs(r) + 1e-300
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(g - r), 0.0)
    bad = err > bound
    if np.any(bad):
        worst = np.argmax(np.where(finite, err / bound, 0.0))
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of tolerance; worst at flat index {worst}: "
            f"got {g.reshape(-1)[worst]!r}, ref {r.reshape(-1)[worst]!r}"
        )


def assert_scalar_of(value, dtype, what=""):
    """A reduction result: a NumPy scalar (not an array) of ``dtype``."""
    assert isinstance(value, np.generic), f"{what}: {type(value)} is not a NumPy scalar"
    assert value.dtype == np.dtype(dtype), f"{what}: dtype {value.dtype}, expected {np.dtype(dtype)}"



def compile_c_driver(tmp_path_factory, name, source):
    """``source`` (which includes headers of csrc/) built as a shared library
    and loaded with ctypes; skips when there is no C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp(name)
    src, lib = d / "driver.c", d / f"{name}.so"
    src.write_text(source)
    csrc = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")
    subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Werror", "-shared", "-fPIC", "-I", csrc,
                    str(src), "-o", str(lib), "-lm"], check=True)
    return ctypes.CDLL(str(lib))
