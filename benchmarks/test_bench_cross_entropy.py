"""Cross entropy: forward, and fused forward + backward.

Groups: ``cross_entropy <N>x<C> <dtype> <T>thread`` and
``cross_entropy_with_grad <N>x<C> <dtype> <T>thread``. Contenders:

- ``fastxent``: ``fastxent.cross_entropy(x, y)``; for the gradient,
  ``cross_entropy_with_grad(x, y)`` allocating a fresh N x C gradient;
- ``fastxent-out``: ``cross_entropy_with_grad(x, y, out=g)`` into one
  gradient buffer reused by every round (the training-loop case);
- ``reference``: ``fastxent.reference`` (float64 NumPy), small inputs only;
- ``torch``: ``F.cross_entropy`` on tensors made once with
  ``torch.from_numpy`` from the same data (no copy); for the gradient, forward
  plus ``loss.backward()`` with ``x.grad = None`` each round, so both sides
  allocate one gradient per call;
- ``jax``: ``jax.jit`` of ``log_softmax`` + ``take_along_axis`` gather + mean
  (``_jax_cross_entropy``), and ``jax.jit(jax.value_and_grad(...))`` of it for
  the gradient, on arrays converted once with ``jnp.asarray``, compiled before
  timing, each call ending in ``block_until_ready``. JAX runs with XLA's
  default threading whatever the group's thread count (see conftest).

Labels are int64, uniform in [0, C). reduction="mean", the default of both.
"""

import numpy as np
import pytest

import fastxent
from fastxent import reference

try:
    import torch.nn.functional as F
except ImportError:  # torch contenders are not generated (see conftest)
    F = None

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # jax contenders are not generated (see conftest)
    jax = jnp = None


def _jax_cross_entropy(x, y):
    """Mean cross entropy of integer labels, as one writes it in JAX."""
    logp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


_jax_ce = _jax_ce_value_and_grad = None


def _jax_jitted():
    global _jax_ce, _jax_ce_value_and_grad
    if _jax_ce is None:
        _jax_ce = jax.jit(_jax_cross_entropy)
        _jax_ce_value_and_grad = jax.jit(jax.value_and_grad(_jax_cross_entropy))
    return _jax_ce, _jax_ce_value_and_grad


@pytest.mark.contenders("fastxent", "reference", "torch", "jax")
def test_cross_entropy(bench):
    x, y, threads = bench.logits, bench.labels, bench.threads
    if bench.contender == "fastxent":

        def fn():
            return fastxent.cross_entropy(x, y, num_threads=threads)

    elif bench.contender == "reference":

        def fn():
            return reference.cross_entropy(x, y)

    elif bench.contender == "torch":
        xt, yt = bench.torch_tensors()

        def fn():
            return F.cross_entropy(xt, yt)

    elif bench.contender == "jax":
        fn = bench.jax_fn(_jax_jitted()[0], *bench.jax_arrays())

    else:
        raise AssertionError(bench.contender)

    loss = bench.run(fn)
    assert np.isfinite(float(loss))


@pytest.mark.contenders("fastxent-out", "fastxent", "reference", "torch", "jax")
def test_cross_entropy_with_grad(bench):
    x, y, threads = bench.logits, bench.labels, bench.threads
    if bench.contender == "fastxent-out":
        g = np.empty_like(x)

        def fn():
            return fastxent.cross_entropy_with_grad(x, y, out=g, num_threads=threads)

    elif bench.contender == "fastxent":

        def fn():
            return fastxent.cross_entropy_with_grad(x, y, num_threads=threads)

    elif bench.contender == "reference":

        def fn():
            return reference.cross_entropy_with_grad(x, y)

    elif bench.contender == "torch":
        xt, yt = bench.torch_tensors(requires_grad=True)

        def fn():
            xt.grad = None
            loss = F.cross_entropy(xt, yt)
            loss.backward()
            return loss.detach(), xt.grad

    elif bench.contender == "jax":
        fn = bench.jax_fn(_jax_jitted()[1], *bench.jax_arrays())

    else:
        raise AssertionError(bench.contender)

    loss, grad = bench.run(fn, writes_result=True)
    assert np.isfinite(float(loss))
    assert tuple(grad.shape) == x.shape


# Label smoothing: its sum of x - max is a pass of its own on rows of up to
# 1 KiB and on weighted rows, a term of the one pass on longer rows.
SMOOTH_CASES = (((4096, 32000), "float32"), ((8192, 1000), "float32"), ((32768, 128), "float32"))


@pytest.mark.cases(*SMOOTH_CASES)
@pytest.mark.contenders("fastxent-out", "reference", "torch")
def test_cross_entropy_smoothed_with_grad(bench):
    x, y, threads = bench.logits, bench.labels, bench.threads
    if bench.contender == "fastxent-out":
        g = np.empty_like(x)

        def fn():
            return fastxent.cross_entropy_with_grad(x, y, label_smoothing=0.1, out=g,
                                                    num_threads=threads)

    elif bench.contender == "reference":

        def fn():
            return reference.cross_entropy_with_grad(x, y, label_smoothing=0.1)

    elif bench.contender == "torch":
        xt, yt = bench.torch_tensors(requires_grad=True)

        def fn():
            xt.grad = None
            loss = F.cross_entropy(xt, yt, label_smoothing=0.1)
            loss.backward()
            return loss.detach(), xt.grad

    else:
        raise AssertionError(bench.contender)

    loss, grad = bench.run(fn, writes_result=True)
    assert np.isfinite(float(loss))
    assert tuple(grad.shape) == x.shape
