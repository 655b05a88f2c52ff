"""Building blocks: logsumexp, log_softmax, softmax, entropy (all over axis -1).

Groups: ``<function> <N>x<C> <dtype> <T>thread``. Contenders:

- ``fastxent``: the fastxent function (allocating its result);
- ``fastxent-out``: log_softmax / softmax into one reused ``out=`` buffer;
- ``reference``: ``fastxent.reference`` (float64 NumPy), small inputs only;
- ``scipy``: ``scipy.special.logsumexp`` / ``log_softmax`` / ``softmax``, and
  ``entr(softmax(x)).sum(-1)`` for the entropy; small inputs only;
- ``torch``: ``torch.logsumexp`` / ``F.log_softmax`` / ``F.softmax``, and
  ``-(p * logp).sum(-1)`` with ``logp = F.log_softmax(x)``, ``p = logp.exp()``
  for the entropy (what one writes without torch.distributions);
- ``jax``: ``jax.jit`` of ``jax.nn.logsumexp`` / ``jax.nn.log_softmax`` /
  ``jax.nn.softmax``, and of ``-(p * logp).sum(-1)`` with
  ``logp = jax.nn.log_softmax(x)``, ``p = exp(logp)`` for the entropy, on an
  array converted once with ``jnp.asarray``, compiled before timing, each call
  ending in ``block_until_ready``; XLA's default threading whatever the
  group's thread count (see conftest).
"""

import numpy as np
import pytest

import fastxent
from fastxent import reference

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch contenders are not generated (see conftest)
    torch = F = None

try:
    import scipy.special as sps
except ImportError:  # scipy contenders are not generated (see conftest)
    sps = None

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # jax contenders are not generated (see conftest)
    jax = jnp = None


def _jax_entropy(x):
    logp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


_JAX_FUNCTIONS = {
    "logsumexp": lambda: (lambda x: jax.nn.logsumexp(x, axis=-1)),
    "log_softmax": lambda: (lambda x: jax.nn.log_softmax(x, axis=-1)),
    "softmax": lambda: (lambda x: jax.nn.softmax(x, axis=-1)),
    "entropy": lambda: _jax_entropy,
}
_jax_jitted = {}


def _jax_fn(bench, name):
    """The timed call of the jitted JAX version of `name` (compiled already)."""
    if name not in _jax_jitted:
        _jax_jitted[name] = jax.jit(_JAX_FUNCTIONS[name]())
    x, _ = bench.jax_arrays()
    return bench.jax_fn(_jax_jitted[name], x)


def _torch_entropy(xt):
    logp = F.log_softmax(xt, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _scipy_entropy(x):
    return sps.entr(sps.softmax(x, axis=-1)).sum(axis=-1)


@pytest.mark.contenders("fastxent", "reference", "torch", "jax", "scipy")
def test_logsumexp(bench):
    x, threads = bench.logits, bench.threads
    if bench.contender == "fastxent":

        def fn():
            return fastxent.logsumexp(x, num_threads=threads)

    elif bench.contender == "reference":

        def fn():
            return reference.logsumexp(x)

    elif bench.contender == "torch":
        xt, _ = bench.torch_tensors()

        def fn():
            return torch.logsumexp(xt, dim=-1)

    elif bench.contender == "jax":
        fn = _jax_fn(bench, "logsumexp")

    elif bench.contender == "scipy":

        def fn():
            return sps.logsumexp(x, axis=-1)

    else:
        raise AssertionError(bench.contender)

    result = bench.run(fn)
    assert tuple(result.shape) == x.shape[:-1]


def _normaliser_test(bench, name):
    """log_softmax and softmax share everything but the name."""
    x, threads = bench.logits, bench.threads
    fastxent_fn = getattr(fastxent, name)
    if bench.contender == "fastxent-out":
        out = np.empty_like(x)

        def fn():
            return fastxent_fn(x, out=out, num_threads=threads)

    elif bench.contender == "fastxent":

        def fn():
            return fastxent_fn(x, num_threads=threads)

    elif bench.contender == "reference":
        reference_fn = getattr(reference, name)

        def fn():
            return reference_fn(x)

    elif bench.contender == "torch":
        xt, _ = bench.torch_tensors()
        torch_fn = getattr(F, name)

        def fn():
            return torch_fn(xt, dim=-1)

    elif bench.contender == "jax":
        fn = _jax_fn(bench, name)

    elif bench.contender == "scipy":
        scipy_fn = getattr(sps, name)

        def fn():
            return scipy_fn(x, axis=-1)

    else:
        raise AssertionError(bench.contender)

    result = bench.run(fn, writes_result=True)
    assert tuple(result.shape) == x.shape


@pytest.mark.contenders("fastxent-out", "fastxent", "reference", "torch", "jax", "scipy")
def test_log_softmax(bench):
    _normaliser_test(bench, "log_softmax")


@pytest.mark.contenders("fastxent-out", "fastxent", "reference", "torch", "jax", "scipy")
def test_softmax(bench):
    _normaliser_test(bench, "softmax")


@pytest.mark.contenders("fastxent", "reference", "torch", "jax", "scipy")
def test_entropy(bench):
    x, threads = bench.logits, bench.threads
    if bench.contender == "fastxent":

        def fn():
            return fastxent.entropy(x, num_threads=threads)

    elif bench.contender == "reference":

        def fn():
            return reference.entropy(x)

    elif bench.contender == "torch":
        xt, _ = bench.torch_tensors()

        def fn():
            return _torch_entropy(xt)

    elif bench.contender == "jax":
        fn = _jax_fn(bench, "entropy")

    elif bench.contender == "scipy":

        def fn():
            return _scipy_entropy(x)

    else:
        raise AssertionError(bench.contender)

    result = bench.run(fn)
    assert tuple(result.shape) == x.shape[:-1]
