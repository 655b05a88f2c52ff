"""The rest of the loss family: KL divergence, binary cross entropy, and cross
entropy on 16-bit (float16, bfloat16) logits.

Each benchmark has its own matrix (``@pytest.mark.cases``), not the suite's
``CASES``; threads 1 and 2 everywhere. Large inputs (2^24 elements and more)
are timed with ``benchmark.pedantic`` in ``FAMILY_ROUNDS`` rounds (default 2,
``FASTXENT_BENCH_FAMILY_ROUNDS`` to change it) and no warm-up round, far
fewer than the suite's 7 + 1: a torch or JAX KL call on (4096, 32000) takes
a second or more on a small machine, and this file has 140 such benchmarks.
Nothing is cold in the first round all the same: every ``out=`` buffer is
written once before timing (no round pays its page faults), JAX compiles and
runs once in an untimed call as everywhere in the suite, and the allocating
contenders (torch, fresh gradients) fault in new memory on every call anyway.
Smaller inputs use the suite's calibrated mode (0.5 s per benchmark).

KL divergence
-------------
Groups ``kl_div[<kind>] <N>x<C> float32 <T>thread`` and
``kl_div_with_grad[<kind>] ...``, ``<kind>`` the ``target_kind``: ``probs``
and ``log_probs`` on (4096, 32000) and (8192, 1000), ``logits`` on those and
(512, 128256). The target is its own ``3 * standard_normal`` logits, given as
they are (``logits``), as ``fastxent.log_softmax`` of them (``log_probs``) or
``fastxent.softmax`` of them (``probs``). ``reduction="batchmean"``,
temperature 1. Contenders:

- ``fastxent``: ``kl_div(x, t, target_kind=kind)``; for the gradient,
  ``kl_div_with_grad`` allocating a fresh N x C gradient;
- ``fastxent-out``: ``kl_div_with_grad(..., out=g)`` into one reused buffer;
- ``torch``: ``F.kl_div(F.log_softmax(z, -1), p, reduction="batchmean")`` for
  ``probs``, the same with ``log_target=True`` for ``log_probs``, and
  ``F.kl_div(F.log_softmax(z, -1), F.log_softmax(t, -1), log_target=True,
  reduction="batchmean")`` for ``logits``; the gradient by autograd
  (``x.grad = None`` each round, forward + ``loss.backward()``);
- ``jax``: ``jax.jit`` of the same sum over ``log_softmax(z)``
  (``xlogy(p, p) - p * logq`` for probabilities, ``exp(logp) * (logp - logq)``
  for log-probabilities and logits) divided by N, and
  ``jax.jit(jax.value_and_grad(...))`` of it for the gradient.

``bytes``: logits plus target read.

Binary cross entropy
--------------------
Groups ``binary_cross_entropy[<variant>] <N>x<C> float32 <T>thread`` and
``binary_cross_entropy_with_grad[<variant>] ...`` on (4096, 32000) and
(65536, 128): ``logits`` (``from_logits=True``), ``logits,pos_weight`` (the
same with a ``pos_weight`` of shape (C,), uniform in [0.5, 2)), ``probs``
(``from_logits=False``; the input is ``sigmoid(logits / 3)``, in about
(0.002, 0.998)). Targets are uniform in [0, 1), float32; ``reduction="mean"``.
Contenders: ``fastxent`` (forward), ``fastxent-out`` (the gradient into
one reused buffer; there is no allocating ``fastxent`` in the gradient
groups, so compare.py's "vs fastxent" column is empty there), ``torch``
(``F.binary_cross_entropy_with_logits``, with ``pos_weight`` where the
variant has one, or ``F.binary_cross_entropy``; gradient by autograd as
above) and ``jax`` (``jax.jit`` of ``-mean(w * t * log_sigmoid(x) + (1 - t) *
log_sigmoid(-x))`` with ``w`` the ``pos_weight`` or 1, and of ``-mean(t *
max(log p, -100) + (1 - t) * max(log1p(-p), -100))`` for probabilities).
``bytes``: input plus target read (the (C,) ``pos_weight`` is not counted).

16-bit cross entropy
--------------------
Groups ``cross_entropy <N>x<C> <dtype> <T>thread`` and
``cross_entropy_with_grad ...`` with ``<dtype>`` ``float16`` or ``bfloat16``
(``ml_dtypes``; those cases are absent without it), on (4096, 32000) and
(512, 128256), int64 labels, ``reduction="mean"``. Contenders:

- ``fastxent`` (forward): the 16-bit logits as they are (read natively by
  the kernel);
- ``fastxent-out`` (gradient): the gradient into one reused buffer of the
  input's dtype (no allocating ``fastxent`` in these groups);
- ``fastxent-float32``: the same values as float32 logits (for the gradient,
  into one reused float32 buffer, like ``fastxent-out``): the 16-bit speed-up
  is ``fastxent-float32 / fastxent`` in the forward groups (compare.py's
  "vs fastxent" column) and ``fastxent-float32 / fastxent-out`` in the
  gradient groups. Its ``bytes`` are those of the float32 logits it reads;
- ``torch``: ``F.cross_entropy`` on ``torch.float16`` / ``torch.bfloat16``
  tensors sharing the NumPy memory (absent for a dtype that this torch
  refuses on CPU), gradient by autograd as above.

``extra_info`` adds ``target_kind`` (KL), ``variant`` (BCE) and
``input_dtype`` (16-bit cross entropy: the dtype the contender actually reads).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest

import fastxent

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases are not generated
    ml_dtypes = None

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch contenders are not generated (see conftest)
    torch = F = None

try:
    import jax
    import jax.numpy as jnp
    import jax.scipy.special as jsp
except ImportError:  # jax contenders are not generated (see conftest)
    jax = jnp = jsp = None

# Inputs of 2^24 elements and more: pedantic rounds and no warm-up round (the
# out= buffers are pre-faulted, JAX functions are called once to compile
# before timing). See the module docstring.
FAMILY_ROUNDS = int(os.environ.get("FASTXENT_BENCH_FAMILY_ROUNDS", 2))
FAMILY_WARMUP_ROUNDS = 0

# Inputs of this many elements and more are cached one at a time (as in conftest).
_LARGE = 1 << 24

# The forward and the gradient test of a family take the large shapes in
# opposite orders, so that the one large input kept in the caches (here and
# in conftest) is the one the next test starts with.
KL_CASES = (((4096, 32000), "float32"), ((8192, 1000), "float32"))
KL_LOGITS_CASES = KL_CASES + (((512, 128256), "float32"),)
KL_LOGITS_CASES_REVERSED = KL_LOGITS_CASES[::-1]
BCE_CASES = (((4096, 32000), "float32"), ((65536, 128), "float32"))
HALF_DTYPES = ("float16",) + (("bfloat16",) if ml_dtypes is not None else ())
HALF_CASES = tuple((shape, dtype) for shape in ((4096, 32000), (512, 128256)) for dtype in HALF_DTYPES)
HALF_CASES_REVERSED = HALF_CASES[::-1]


# --------------------------------------------------------------------------
# Data (seeded; the logits themselves come from conftest's make_inputs)
# --------------------------------------------------------------------------


_small: dict = {}
_large: dict = {}  # name -> (key, value): only the last large one of each name


def _cached(name, key, shape, make):
    """``make()``, cached under (name, key) like conftest's inputs: every small
    one for the session, only the last large one of each name. Everything
    derives from seeded data, so (shape, dtype) identifies it."""
    if math.prod(shape) < _LARGE:
        if (name, key) not in _small:
            _small[(name, key)] = make()
        return _small[(name, key)]
    last = _large.get(name)
    if last is None or last[0] != key:
        _large.pop(name, None)  # free the previous one before making the next
        last = _large[name] = (key, make())
    return last[1]


def kl_target(shape, kind):
    """The KL target as ``target_kind`` gives it, from one set of logits."""

    def make_logits():
        t = np.random.default_rng(20240917 + sum(shape)).standard_normal(shape, dtype=np.float32)
        t *= 3.0
        return t

    t = _cached("kl_target_logits", shape, shape, make_logits)
    if kind == "logits":
        return t
    make = {"log_probs": fastxent.log_softmax, "probs": fastxent.softmax}[kind]
    return _cached("kl_target", (shape, kind), shape, lambda: make(t))


def bce_target(shape):
    return _cached("bce_target", shape, shape,
                   lambda: np.random.default_rng(20240918 + sum(shape)).random(shape, dtype=np.float32))


def bce_probs(x):
    """``sigmoid(x / 3)`` of the benchmark's (seeded) logits."""

    def make():
        p = np.exp(x / np.float32(-3.0))
        p += np.float32(1.0)
        return np.reciprocal(p, out=p)

    return _cached("bce_probs", (x.shape, str(x.dtype)), x.shape, make)


def bce_pos_weight(c):
    return _cached("bce_pos_weight", c, (c,),
                   lambda: np.random.default_rng(20240919 + c).uniform(0.5, 2.0, size=c).astype(np.float32))


def as_float32(x):
    """The benchmark's (seeded) 16-bit logits as float32: the same values."""
    return _cached("float32_copy", (x.shape, str(x.dtype)), x.shape, lambda: x.astype(np.float32))


def _prefaulted_like(a):
    """An ``out=`` buffer like ``a``, written once so that no timed round pays
    for its first touch."""
    g = np.empty_like(a)
    g.fill(0)
    return g


def _torch_tensor(a, requires_grad=False):
    """A torch tensor sharing ``a``'s memory (bfloat16 through a uint16 view)."""
    if ml_dtypes is not None and a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _jax_put(*arrays):
    """NumPy arrays as JAX arrays, converted once, outside the timing."""
    out = tuple(jnp.asarray(a) for a in arrays)
    jax.block_until_ready(out)
    return out


# --------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------


def _torch_kl(kind, zt, tt):
    logq = F.log_softmax(zt, dim=-1)
    if kind == "probs":
        return F.kl_div(logq, tt, reduction="batchmean")
    if kind == "log_probs":
        return F.kl_div(logq, tt, reduction="batchmean", log_target=True)
    return F.kl_div(logq, F.log_softmax(tt, dim=-1), reduction="batchmean", log_target=True)


def _jax_kl_loss(kind):
    def loss(z, t):
        logq = jax.nn.log_softmax(z, axis=-1)
        if kind == "probs":
            pointwise = jsp.xlogy(t, t) - t * logq
        else:
            logp = t if kind == "log_probs" else jax.nn.log_softmax(t, axis=-1)
            pointwise = jnp.exp(logp) * (logp - logq)
        return jnp.sum(pointwise) / z.shape[0]

    return loss


_jax_jitted: dict = {}


def _jax_jit(key, make, grad):
    """One ``jax.jit`` (of ``value_and_grad`` with ``grad``) per key, kept."""
    full = (key, grad)
    if full not in _jax_jitted:
        f = make()
        _jax_jitted[full] = jax.jit(jax.value_and_grad(f) if grad else f)
    return _jax_jitted[full]


def _kl_bench(bench, kind, grad):
    x, threads = bench.logits, bench.threads
    target = kl_target(bench.case.shape, kind)
    bench.function = f"kl_div_with_grad[{kind}]" if grad else f"kl_div[{kind}]"
    bench.benchmark.extra_info["target_kind"] = kind
    contender = bench.contender

    if contender == "fastxent-out":
        g = _prefaulted_like(x)

        def fn():
            return fastxent.kl_div_with_grad(x, target, target_kind=kind, out=g, num_threads=threads)

    elif contender == "fastxent" and grad:

        def fn():
            return fastxent.kl_div_with_grad(x, target, target_kind=kind, num_threads=threads)

    elif contender == "fastxent":

        def fn():
            return fastxent.kl_div(x, target, target_kind=kind, num_threads=threads)

    elif contender == "torch" and grad:
        zt, tt = _torch_tensor(x, requires_grad=True), _torch_tensor(target)

        def fn():
            zt.grad = None
            loss = _torch_kl(kind, zt, tt)
            loss.backward()
            return loss.detach(), zt.grad

    elif contender == "torch":
        zt, tt = _torch_tensor(x), _torch_tensor(target)

        def fn():
            return _torch_kl(kind, zt, tt)

    elif contender == "jax":
        jitted = _jax_jit(("kl", kind), lambda: _jax_kl_loss(kind), grad)
        fn = bench.jax_fn(jitted, *_jax_put(x, target))

    else:
        raise AssertionError(contender)

    result = bench.run(fn, writes_result=grad, nbytes=x.nbytes + target.nbytes,
                       result_nbytes=x.nbytes, rounds=FAMILY_ROUNDS,
                       warmup_rounds=FAMILY_WARMUP_ROUNDS)
    loss, g_out = result if grad else (result, None)
    assert np.isfinite(float(loss))
    if grad:
        assert tuple(g_out.shape) == x.shape


@pytest.mark.cases(*KL_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_kl_div_probs(bench):
    _kl_bench(bench, "probs", grad=False)


@pytest.mark.cases(*KL_CASES)
@pytest.mark.contenders("fastxent-out", "fastxent", "torch", "jax")
def test_kl_div_with_grad_probs(bench):
    _kl_bench(bench, "probs", grad=True)


@pytest.mark.cases(*KL_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_kl_div_log_probs(bench):
    _kl_bench(bench, "log_probs", grad=False)


@pytest.mark.cases(*KL_CASES)
@pytest.mark.contenders("fastxent-out", "fastxent", "torch", "jax")
def test_kl_div_with_grad_log_probs(bench):
    _kl_bench(bench, "log_probs", grad=True)


@pytest.mark.cases(*KL_LOGITS_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_kl_div_logits(bench):
    _kl_bench(bench, "logits", grad=False)


@pytest.mark.cases(*KL_LOGITS_CASES_REVERSED)
@pytest.mark.contenders("fastxent-out", "fastxent", "torch", "jax")
def test_kl_div_with_grad_logits(bench):
    _kl_bench(bench, "logits", grad=True)


# --------------------------------------------------------------------------
# Binary cross entropy
# --------------------------------------------------------------------------


def _jax_bce_loss(from_logits):
    if from_logits:

        def loss(x, t, w):
            return -jnp.mean(w * t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))

    else:

        def loss(p, t, w):  # w unused: pos_weight is for logits only
            return -jnp.mean(t * jnp.maximum(jnp.log(p), -100.0)
                             + (1.0 - t) * jnp.maximum(jnp.log1p(-p), -100.0))

    return loss


def _bce_bench(bench, variant, grad):
    x, threads, shape = bench.logits, bench.threads, bench.case.shape
    from_logits = variant != "probs"
    inp = x if from_logits else bce_probs(x)
    target = bce_target(shape)
    pos_weight = bce_pos_weight(shape[-1]) if "pos_weight" in variant else None
    bench.function = f"binary_cross_entropy_with_grad[{variant}]" if grad else f"binary_cross_entropy[{variant}]"
    bench.benchmark.extra_info["variant"] = variant
    contender = bench.contender
    kw = dict(from_logits=from_logits, pos_weight=pos_weight, num_threads=threads)

    if contender == "fastxent-out":
        g = _prefaulted_like(inp)

        def fn():
            return fastxent.binary_cross_entropy_with_grad(inp, target, out=g, **kw)

    elif contender == "fastxent" and grad:

        def fn():
            return fastxent.binary_cross_entropy_with_grad(inp, target, **kw)

    elif contender == "fastxent":

        def fn():
            return fastxent.binary_cross_entropy(inp, target, **kw)

    elif contender == "torch":
        it, tt = _torch_tensor(inp, requires_grad=grad), _torch_tensor(target)
        pwt = None if pos_weight is None else _torch_tensor(pos_weight)

        def loss_of():
            if from_logits:
                return F.binary_cross_entropy_with_logits(it, tt, pos_weight=pwt)
            return F.binary_cross_entropy(it, tt)

        if grad:

            def fn():
                it.grad = None
                loss = loss_of()
                loss.backward()
                return loss.detach(), it.grad

        else:
            fn = loss_of

    elif contender == "jax":
        jitted = _jax_jit(("bce", from_logits), lambda: _jax_bce_loss(from_logits), grad)
        w = pos_weight if pos_weight is not None else np.ones(1, np.float32)
        fn = bench.jax_fn(jitted, *_jax_put(inp, target, w))

    else:
        raise AssertionError(contender)

    result = bench.run(fn, writes_result=grad, nbytes=inp.nbytes + target.nbytes,
                       result_nbytes=inp.nbytes, rounds=FAMILY_ROUNDS,
                       warmup_rounds=FAMILY_WARMUP_ROUNDS)
    loss, g_out = result if grad else (result, None)
    assert np.isfinite(float(loss))
    if grad:
        assert tuple(g_out.shape) == x.shape


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_binary_cross_entropy_logits(bench):
    _bce_bench(bench, "logits", grad=False)


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent-out", "torch", "jax")
def test_binary_cross_entropy_with_grad_logits(bench):
    _bce_bench(bench, "logits", grad=True)


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_binary_cross_entropy_logits_pos_weight(bench):
    _bce_bench(bench, "logits,pos_weight", grad=False)


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent-out", "torch", "jax")
def test_binary_cross_entropy_with_grad_logits_pos_weight(bench):
    _bce_bench(bench, "logits,pos_weight", grad=True)


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent", "torch", "jax")
def test_binary_cross_entropy_probs(bench):
    _bce_bench(bench, "probs", grad=False)


@pytest.mark.cases(*BCE_CASES)
@pytest.mark.contenders("fastxent-out", "torch", "jax")
def test_binary_cross_entropy_with_grad_probs(bench):
    _bce_bench(bench, "probs", grad=True)


# --------------------------------------------------------------------------
# Cross entropy on 16-bit logits
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _torch_takes(dtype: str) -> bool:
    """Whether this torch runs F.cross_entropy forward + backward on CPU in ``dtype``."""
    try:
        x = torch.zeros((2, 3), dtype=getattr(torch, dtype), requires_grad=True)
        F.cross_entropy(x, torch.zeros(2, dtype=torch.long)).backward()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _half_available(contender, shape, dtype):
    if contender == "torch":
        return torch is not None and _torch_takes(dtype)
    return True


def _half_bench(bench, grad):
    x, y, threads = bench.logits, bench.labels, bench.threads
    bench.function = "cross_entropy_with_grad" if grad else "cross_entropy"
    contender = bench.contender
    nbytes = None  # the 16-bit logits'

    if contender == "fastxent-float32":
        x = as_float32(x)
        nbytes = x.nbytes
    bench.benchmark.extra_info["input_dtype"] = str(x.dtype)

    if contender in ("fastxent-out", "fastxent-float32") and grad:
        g = _prefaulted_like(x)

        def fn():
            return fastxent.cross_entropy_with_grad(x, y, out=g, num_threads=threads)

    elif contender in ("fastxent", "fastxent-float32") and not grad:

        def fn():
            return fastxent.cross_entropy(x, y, num_threads=threads)

    elif contender == "torch":
        xt, yt = _torch_tensor(x, requires_grad=grad), torch.from_numpy(y)

        if grad:

            def fn():
                xt.grad = None
                loss = F.cross_entropy(xt, yt)
                loss.backward()
                return loss.detach(), xt.grad

        else:

            def fn():
                return F.cross_entropy(xt, yt)

    else:
        raise AssertionError(contender)

    result = bench.run(fn, writes_result=grad, nbytes=nbytes, rounds=FAMILY_ROUNDS,
                       warmup_rounds=FAMILY_WARMUP_ROUNDS)
    loss, g_out = result if grad else (result, None)
    assert np.isfinite(float(loss))
    if grad:
        assert tuple(g_out.shape) == x.shape
        if contender != "torch":
            assert g_out.dtype == x.dtype


@pytest.mark.cases(*HALF_CASES)
@pytest.mark.contenders("fastxent", "fastxent-float32", "torch", available=_half_available)
def test_cross_entropy_16bit(bench):
    _half_bench(bench, grad=False)


@pytest.mark.cases(*HALF_CASES_REVERSED)
@pytest.mark.contenders("fastxent-out", "fastxent-float32", "torch", available=_half_available)
def test_cross_entropy_with_grad_16bit(bench):
    _half_bench(bench, grad=True)
