"""Cross entropy on small rows (the small-row kernels, rows/small.h): groups
of 16 rows taken two at a time, with pairs that are not plain (an ignored
row, a row without a softmax, a NaN) between plain ones, and a last group
that is partial. Values against the float64 reference; the same bits on
every ISA and thread count."""

import numpy as np
import pytest
from conftest import assert_close, each_isa, grad_scale

import fastxent
from fastxent import reference


def _case(n_classes, n_rows=16 * 7 + 5, seed=0):
    rng = np.random.default_rng(seed + n_classes)
    x = (rng.standard_normal((n_rows, n_classes)) * 4).astype(np.float32)
    y = rng.integers(0, n_classes, n_rows)
    y[16 * 2 + 3] = -100           # group 2 (first of the second pair)
    x[16 * 5 + 1, :] = -np.inf     # group 5 (second of the third pair)
    x[16 * 6 + 2, 0] = np.nan      # group 6 (the last full group, unpaired)
    # labels at the first and last class, where a wrong column shows
    y[0], y[1] = 0, n_classes - 1
    return x, y


@pytest.mark.parametrize("n_classes", [1, 2, 10, 16, 17, 32, 63])
def test_small_rows_against_reference(n_classes, isa):
    x, y = _case(n_classes)
    loss = fastxent.cross_entropy(x, y, reduction="none")
    loss2, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none")
    ref_loss = reference.cross_entropy(x, y, reduction="none")
    _, ref_grad = reference.cross_entropy_with_grad(x, y, reduction="none")
    assert_close(loss, ref_loss, np.float32, what="loss")
    np.testing.assert_array_equal(loss, loss2)
    assert_close(grad, ref_grad, np.float32, scale=grad_scale(ref_grad, 1.0), what="grad")
    # an ignored row: loss 0, gradient 0
    assert loss[16 * 2 + 3] == 0 and not np.any(grad[16 * 2 + 3])


@pytest.mark.parametrize("n_classes", [10, 16, 17, 48])
def test_small_rows_same_bits_everywhere(n_classes):
    x, y = _case(n_classes, seed=1)
    seen = None
    for _ in each_isa():
        for threads in (1, 2, 3):
            loss = fastxent.cross_entropy(x, y, reduction="none", num_threads=threads)
            _, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none",
                                                       num_threads=threads)
            got = (loss.tobytes(), grad.tobytes())
            seen = seen or got
            assert got == seen
