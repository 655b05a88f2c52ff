"""fastxent.jax.cross_entropy against optax under ``jax.jit``.

    flock /tmp/fx-bench.lock python -m pytest benchmarks/test_bench_jax.py \
        --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Groups: ``jax_value_and_grad <N>x<C> <dtype> <T>thread`` (the loss and its
gradient, as a training step computes them) and ``jax_forward ...`` (the loss
alone). At (8, 10) they time the per-call overhead of each way into the
kernels; the docs/jax.md "Transport" table is
``-k "8x10-float32-1thread or 4096x32000-float32-1thread"``. Contenders, each ``jax.jit`` of a mean cross entropy over integer
labels, or of ``jax.value_and_grad`` of it:

- ``fastxent_jax``: ``fastxent.jax.cross_entropy(x, y, num_threads=T)``
  through the XLA FFI handler compiled into the extension
  (``csrc/xla_ffi.c``; ``transport = "ffi"``, the default);
- ``fastxent_jax-callback``: the same through ``jax.pure_callback``
  (``transport = "callback"``), which copies the operands and results and
  runs Python on every call;
- ``optax``: ``optax.softmax_cross_entropy_with_integer_labels(x, y).mean()``.

Threads: fastxent follows the group's ``T``. XLA's own pool (optax, and the
gradient scaling of the backward pass) is sized once per process and ignores
``T``: run with ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1"`` to pin it to one thread (recorded in
``extra_info["jax_threading"]``). Inputs of 2^24 elements and more are timed
over ``JAX_ROUNDS`` pedantic rounds (default 3).
"""

from __future__ import annotations

import os

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import fastxent.jax as fxj  # noqa: E402
from conftest import JAX_THREADING  # noqa: E402

JAX_ROUNDS = int(os.environ.get("FASTXENT_BENCH_JAX_ROUNDS", 3))

SHAPES = ((8, 10), (8192, 1000), (4096, 32000), (512, 128256))
CASES = tuple((shape, dtype) for dtype in ("float32", "bfloat16") for shape in SHAPES)
CONTENDERS = ("fastxent_jax", "fastxent_jax-callback", "optax")


def _loss(contender, threads):
    if contender == "optax":
        return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
    transport = "callback" if contender.endswith("-callback") else "ffi"

    def loss(x, y):
        previous, fxj.transport = fxj.transport, transport  # read when traced
        try:
            return fxj.cross_entropy(x, y, num_threads=threads)
        finally:
            fxj.transport = previous

    return loss


def _run(bench, transform):
    x, y = bench.jax_arrays()
    fn = bench.jax_fn(jax.jit(transform(_loss(bench.contender, bench.threads))), x, y)
    bench.benchmark.extra_info["jax_threading"] = JAX_THREADING
    bench.benchmark.extra_info["transport"] = (
        None if bench.contender == "optax" else bench.contender.partition("-")[2] or "ffi")
    return bench.run(fn, writes_result=transform is jax.value_and_grad,
                     rounds=JAX_ROUNDS, warmup_rounds=0)


@pytest.mark.cases(*CASES, threads=(1, 2))
@pytest.mark.contenders(*CONTENDERS)
def test_jax_value_and_grad(bench):
    loss, grad = _run(bench, jax.value_and_grad)
    assert grad.shape == bench.logits.shape
    assert float(loss) == pytest.approx(float(fxj.cross_entropy(*bench.jax_arrays())), rel=1e-2)


@pytest.mark.cases(((8, 10), "float32"), ((4096, 32000), "float32"), threads=(1,))
@pytest.mark.contenders(*CONTENDERS)
def test_jax_forward(bench):
    loss = _run(bench, lambda f: f)
    assert loss.shape == ()
