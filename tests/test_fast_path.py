"""The common-call fast paths of cross_entropy and cross_entropy_with_grad
(2-D contiguous float logits, int64 labels, default options) against the
general path, which the same call with axis=1 takes: same bits, same types,
same aliasing of out=, and every case the fast path declines still right."""
import numpy as np
import pytest

import fastxent

from conftest import assert_close
from fastxent import reference as ref

SHAPES = [(1, 1), (8, 10), (7, 33), (64, 1000), (3, 50257)]


def _data(shape, dtype, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    y = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    if ignore and shape[0] > 1:
        y[0] = -100
    return x, y


def _same(a, b):
    assert type(a) is type(b)
    assert a.dtype == b.dtype
    assert np.array_equal(a, b, equal_nan=True), (a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threads", [1, 2, None])
def test_forward_matches_general_path(shape, dtype, threads):
    x, y = _data(shape, dtype)
    fast = fastxent.cross_entropy(x, y, num_threads=threads)
    general = fastxent.cross_entropy(x, y, axis=1, num_threads=threads)
    _same(fast, general)
    assert_close(fast, ref.cross_entropy(x, y), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threads", [1, 2, None])
@pytest.mark.parametrize("grad_output", [1.0, 2.5, -0.125])
def test_with_grad_matches_general_path(shape, dtype, threads, grad_output):
    x, y = _data(shape, dtype, ignore=shape[0] > 1)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, num_threads=threads, grad_output=grad_output)
    gl, gg = fastxent.cross_entropy_with_grad(x, y, axis=1, num_threads=threads,
                                              grad_output=grad_output)
    _same(loss, gl)
    _same(grad, gg)
    assert grad.shape == x.shape and grad.flags.c_contiguous
    rl, rg = ref.cross_entropy_with_grad(x, y, grad_output=grad_output)
    assert_close(loss, rl, dtype)
    assert_close(grad, rg, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_with_grad_out_buffer_and_in_place(dtype):
    x, y = _data((16, 100), dtype)
    _, expected = fastxent.cross_entropy_with_grad(x, y, axis=1)
    out = np.full_like(x, np.nan)
    loss, got = fastxent.cross_entropy_with_grad(x, y, out=out)
    assert got is out
    _same(out, expected)
    xc = x.copy()
    loss2, got2 = fastxent.cross_entropy_with_grad(xc, y, out=xc)
    assert got2 is xc
    _same(xc, expected)
    _same(loss, loss2)


def test_with_grad_all_labels_ignored_takes_the_general_rule():
    x, _ = _data((4, 6), np.float32)
    y = np.full(4, -100, np.int64)
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert np.isnan(loss)
    assert np.array_equal(grad, np.zeros_like(x))


@pytest.mark.parametrize("case", ["wrong_dtype", "fortran", "readonly", "shape"])
def test_with_grad_out_the_fast_path_declines(case):
    """Unusual out= buffers go to the general path: written (or refused) the
    same way as there."""
    x, y = _data((8, 12), np.float64)
    _, expected = fastxent.cross_entropy_with_grad(x, y, axis=1)
    if case == "fortran":
        out = np.asfortranarray(np.zeros_like(x))
        _, got = fastxent.cross_entropy_with_grad(x, y, out=out)
        assert got is out
        _same(np.ascontiguousarray(out), expected)
        return
    if case == "wrong_dtype":
        out = np.zeros(x.shape, np.float32)
    elif case == "readonly":
        out = np.zeros_like(x)
        out.flags.writeable = False
    else:
        out = np.zeros((8, 13))
    with pytest.raises((ValueError, TypeError), match="out"):
        fastxent.cross_entropy_with_grad(x, y, out=out)


def test_with_grad_bad_label_still_named():
    x, y = _data((5, 7), np.float32, ignore=False)
    y[3] = 7
    with pytest.raises(ValueError, match="7"):
        fastxent.cross_entropy_with_grad(x, y)


# ------------------------------------------------------------ building blocks

BLOCKS = ["logsumexp", "entropy", "log_softmax", "softmax"]


def _special(shape, dtype):
    """Rows that exercise the kernels' non-finite branches."""
    x, _ = _data(shape, dtype, ignore=False)
    if shape[0] >= 4:
        x[1] = -np.inf
        x[2, 0] = np.nan
        x[3, -1] = np.inf
    return x


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + [(6, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threads", [1, 2, None])
def test_blocks_match_general_path(name, shape, dtype, threads):
    fn = getattr(fastxent, name)
    for x in (_data(shape, dtype)[0], _special(shape, dtype)):
        fast = fn(x, num_threads=threads)
        general = fn(x, axis=1, num_threads=threads)
        assert fast.shape == general.shape
        _same(fast, general)
        if name in ("logsumexp", "entropy"):
            assert fast.shape == (shape[0],)
    x = _data(shape, dtype)[0]
    assert_close(fn(x), getattr(ref, name)(x), dtype, ulps=16)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_out_buffer_and_in_place(name, dtype):
    fn = getattr(fastxent, name)
    x = _data((9, 40), dtype)[0]
    expected = fn(x, axis=1)
    out = np.full_like(x, np.nan)
    assert fn(x, out=out) is out
    _same(out, expected)
    xc = x.copy()
    assert fn(xc, out=xc) is xc
    _same(xc, expected)
    # Declined by the fast path, refused by the general one.
    with pytest.raises(ValueError, match="overlaps"):
        buf = np.zeros((10, 40), dtype)
        buf[:9] = x
        fn(buf[:9], out=buf[1:])
    with pytest.raises(ValueError, match="dtype"):
        fn(x, out=np.zeros(x.shape, np.float16))
