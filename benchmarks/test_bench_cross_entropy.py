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
  allocate one gradient per call.

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


@pytest.mark.contenders("fastxent", "reference", "torch")
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

    else:
        raise AssertionError(bench.contender)

    loss = bench.run(fn)
    assert np.isfinite(float(loss))


@pytest.mark.contenders("fastxent-out", "fastxent", "reference", "torch")
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

    else:
        raise AssertionError(bench.contender)

    loss, grad = bench.run(fn, writes_result=True)
    assert np.isfinite(float(loss))
    assert tuple(grad.shape) == x.shape
