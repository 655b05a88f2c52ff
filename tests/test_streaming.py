"""Outputs larger than the cache: log_softmax writes them with streaming
stores, and every big call must give the bits of the same rows computed a
few at a time (small calls, cached stores), including outputs that start
off a 64-byte boundary (the streaming loop's scalar head and tail).
Gradients and softmax of the same size stay on cached stores (streaming
them was slower), and are held to the same bits."""
import numpy as np
import pytest

import fastxent

N, C = 300, 32011  # > 32 MiB of float32 output; C odd so rows drift in alignment


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((N, C)) * 4).astype(np.float32)
    y = rng.integers(0, C, N)
    return x, y


def _by_parts(fn, x, *args, **kw):
    return np.concatenate([fn(x[i:i + 7], *[a[i:i + 7] for a in args], **kw) for i in range(0, len(x), 7)])


@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_of_a_big_call_matches_small_calls(data, offset, threads, isa):
    """Gradients (cached stores at every size) of a call larger than the
    cache, into an out= at every alignment, give the bits of small calls."""
    x, y = data
    buf = np.empty(N * C + 16, np.float32)
    out = buf[offset:offset + N * C].reshape(N, C)
    loss, g = fastxent.cross_entropy_with_grad(x, y, out=out, reduction="none", num_threads=threads)
    ref_loss = _by_parts(lambda a, b: fastxent.cross_entropy(a, b, reduction="none"), x, y)
    ref_g = _by_parts(lambda a, b: fastxent.cross_entropy_with_grad(a, b, reduction="none")[1], x, y)
    assert g is out
    assert np.array_equal(loss, ref_loss)
    assert np.array_equal(g.view(np.uint32), ref_g.view(np.uint32))


@pytest.mark.parametrize("fn", [fastxent.softmax, fastxent.log_softmax])
@pytest.mark.parametrize("offset", [0, 3])
def test_normalised_streamed_matches_cached(data, fn, offset, isa):
    x, _ = data
    buf = np.empty(N * C + 16, np.float32)
    out = buf[offset:offset + N * C].reshape(N, C)
    got = fn(x, out=out)
    ref = _by_parts(fn, x)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_gradient_in_place_when_streaming(data):
    x, y = data
    ref_loss, ref_g = fastxent.cross_entropy_with_grad(x, y)
    z = x.copy()
    loss, g = fastxent.cross_entropy_with_grad(z, y, out=z)
    assert g is z
    assert loss == ref_loss
    assert np.array_equal(z.view(np.uint32), ref_g.view(np.uint32))
