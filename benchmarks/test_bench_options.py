"""The language-model options of cross entropy and the generalised JSD,
against the plain loss and KL divergence on the same inputs.

Groups (float32 logits, int64 labels, one or two threads):

- ``ce_options <N>x<C> float32 <T>thread``: ``cross_entropy`` plain and with
  ``label_smoothing=0.1``, ``z_loss=1e-4``, ``softcap=30``,
  ``return_stats=True``, and the last three together;
- ``ce_options_with_grad ...``: ``cross_entropy_with_grad`` of the same,
  the gradient into one reused ``out=`` buffer;
- ``jsd <N>x<C> float32 <T>thread`` and ``jsd_with_grad ...``: ``jsd`` with
  teacher logits (beta 0.5) against ``kl_div`` with ``target_kind="logits"``
  on the same student and teacher (``out=`` reused for the gradients).

Shapes (4096, 32000) and (8192, 1000); logits ``3 * standard_normal``. Every
call is timed with ``benchmark.pedantic`` in ``FASTXENT_BENCH_OPTIONS_ROUNDS``
rounds (default 3) after one warm-up round. ``extra_info``: shape, threads,
variant, the ISA in use.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastxent
from fastxent import _core

ROUNDS = int(os.environ.get("FASTXENT_BENCH_OPTIONS_ROUNDS", "3"))
SHAPES = [(4096, 32000), (8192, 1000)]
THREADS = [1, 2]
VARIANTS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "return_stats": {"return_stats": True},
    "all": {"z_loss": 1e-4, "softcap": 30.0, "return_stats": True},
}

_cache: dict = {}


def _inputs(shape):
    if shape not in _cache:
        _cache.clear()
        rng = np.random.default_rng(0)
        x = (3 * rng.standard_normal(shape)).astype(np.float32)
        t = (3 * rng.standard_normal(shape)).astype(np.float32)
        y = rng.integers(0, shape[1], shape[0])
        _cache[shape] = (x, t, y, np.empty_like(x))
    return _cache[shape]


def _run(benchmark, group, fn, shape, threads, variant):
    benchmark.group = f"{group} {shape[0]}x{shape[1]} float32 {threads}thread"
    benchmark.extra_info.update(shape=list(shape), threads=threads, variant=variant,
                                isa=_core.get_isa())
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ce_options(benchmark, variant, shape, threads):
    x, _, y, _ = _inputs(shape)
    kw = dict(VARIANTS[variant], num_threads=threads)
    _run(benchmark, "ce_options", lambda: fastxent.cross_entropy(x, y, **kw), shape, threads,
         variant)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ce_options_with_grad(benchmark, variant, shape, threads):
    x, _, y, g = _inputs(shape)
    kw = dict(VARIANTS[variant], num_threads=threads, out=g)
    _run(benchmark, "ce_options_with_grad",
         lambda: fastxent.cross_entropy_with_grad(x, y, **kw), shape, threads, variant)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["jsd", "kl_div"])
@pytest.mark.parametrize("grad", [False, True], ids=["loss", "grad"])
def test_jsd(benchmark, grad, variant, shape, threads):
    x, t, _, g = _inputs(shape)
    kw = dict(num_threads=threads, **({"out": g} if grad else {}))
    if variant == "jsd":
        fn, kw = (fastxent.jsd_with_grad if grad else fastxent.jsd), dict(kw, beta=0.5)
    else:
        fn = fastxent.kl_div_with_grad if grad else fastxent.kl_div
        kw = dict(kw, target_kind="logits")
    _run(benchmark, "jsd_with_grad" if grad else "jsd", lambda: fn(x, t, **kw), shape,
         threads, variant)
