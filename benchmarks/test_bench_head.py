"""The language-model head: linear cross entropy forward + backward.

Groups ``linear_cross_entropy_with_grad <N>x<D>x<V> float32 <T>thread`` on
(8192, 2048, 32000), (4096, 4096, 128256) and (512, 2048, 256000), 1 and 2
threads.  Hidden states are ``standard_normal``, the weight
``0.02 * standard_normal`` (V, D), labels uniform, ``reduction="mean"``.
Contenders:

- ``fastxent``: ``linear_cross_entropy_with_grad(h, W, y, num_threads=T)``
  (loss, d_hidden, d_weight; nothing of size N x V);
- ``gemm``: the bound: the three GEMMs of the head alone, full size, with
  NumPy's ``matmul`` (the same BLAS fastxent uses) and the BLAS at T threads:
  ``L = h @ W.T``, ``L @ W``, ``L.T @ h`` into preallocated outputs;
- ``torch-chunked``: ``F.linear_cross_entropy(h, W, y,
  options=LinearCrossEntropyOptions())`` + ``backward()`` (torch 2.13's
  chunked path), ``torch.set_num_threads(T)``;
- ``torch``: ``F.cross_entropy(h @ W.T, y)`` + ``backward()`` (the
  materialising path).

These are big (the (4096, 4096, 128256) group is 13 TFLOP per call), so
every benchmark runs ``FASTXENT_BENCH_HEAD_ROUNDS`` rounds (default 1) after
no warm-up: select groups with ``-k``.  ``extra_info``: ``seconds``
(the median), ``tflops`` (6 N D V / seconds), ``peak_rss_extra`` (the peak
resident memory during the call above the resident memory before it, in
bytes, sampled every 2 ms from /proc/self/statm), ``logits_bytes`` (N V 4,
what materialising costs) and, for fastxent, ``chunk_rows``.

``FASTXENT_BENCH_HEAD_SHAPES="512x256x1000"`` replaces the shapes (a smoke
run).  ``test_head_peak_memory`` measures the extra memory of fastxent alone at
N = 8192, V = 128256, D = 2048 (logits: 4.2 GB) with both RSS and
``tracemalloc`` (NumPy's allocations), one call.

Run (under the shared benchmark lock)::

    flock /tmp/fx-bench.lock python -m pytest benchmarks/test_bench_head.py \\
        --benchmark-only --benchmark-group-by=group -k "8192x2048x32000"
"""
from __future__ import annotations

import os
import threading
import time
import tracemalloc

import numpy as np
import pytest

import fastxent
from fastxent._head import chunk_rows

try:
    import torch
except ImportError:  # torch contenders are simply absent
    torch = None

threadpoolctl = pytest.importorskip("threadpoolctl")

SHAPES = [(8192, 2048, 32000), (4096, 4096, 128256), (512, 2048, 256000)]
if os.environ.get("FASTXENT_BENCH_HEAD_SHAPES"):  # e.g. "512x256x1000,64x32x500" for a smoke run
    SHAPES = [tuple(int(k) for k in s.split("x"))
              for s in os.environ["FASTXENT_BENCH_HEAD_SHAPES"].split(",")]
THREADS = [1, 2]
CONTENDERS = ["fastxent", "gemm"] + (["torch-chunked", "torch"] if torch is not None else [])
ROUNDS = int(os.environ.get("FASTXENT_BENCH_HEAD_ROUNDS", "1"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """The peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _inputs(n, d, v):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = 0.02 * rng.standard_normal((v, d), dtype=np.float32)
    y = rng.integers(0, v, n)
    return h, w, y


def _contender(name, h, w, y, nt):
    """(a call, cleanup) for one contender."""
    if name == "fastxent":
        return lambda: fastxent.linear_cross_entropy_with_grad(h, w, y, num_threads=nt)
    if name == "gemm":
        n, v = h.shape[0], w.shape[0]
        logits = np.empty((n, v), np.float32)
        dh, dw = np.empty_like(h), np.empty_like(w)
        logits.fill(0.0)  # the page faults are paid here, not in a timed round

        def gemm():
            with threadpoolctl.threadpool_limits(nt, user_api="blas"):
                np.matmul(h, w.T, out=logits)
                np.matmul(logits, w, out=dh)
                np.matmul(logits.T, h, out=dw)
        return gemm
    torch.set_num_threads(nt)
    th, tw, ty = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(y)
    F = torch.nn.functional

    def run():
        hh = th.detach().requires_grad_()
        ww = tw.detach().requires_grad_()
        if name == "torch-chunked":
            loss = F.linear_cross_entropy(hh, ww, ty,
                                          options=torch.nn.LinearCrossEntropyOptions())
        else:
            loss = F.cross_entropy(hh @ ww.T, ty)
        loss.backward()
        return loss.item(), hh.grad, ww.grad
    return run


def pytest_generate_tests(metafunc):
    if "head_case" in metafunc.fixturenames:
        cases, ids = [], []
        for n, d, v in SHAPES:
            for nt in THREADS:
                for name in CONTENDERS:
                    cases.append((n, d, v, nt, name))
                    ids.append(f"{n}x{d}x{v}-float32-{nt}thread-{name}")
        metafunc.parametrize("head_case", cases, ids=ids)


def test_linear_cross_entropy_with_grad(benchmark, head_case):
    n, d, v, nt, name = head_case
    benchmark.group = f"linear_cross_entropy_with_grad {n}x{d}x{v} float32 {nt}thread"
    h, w, y = _inputs(n, d, v)
    call = _contender(name, h, w, y, nt)
    peaks = []

    def measured():
        with PeakRSS() as m:
            call()
        peaks.append(m.extra)

    benchmark.pedantic(measured, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        function="linear_cross_entropy_with_grad", contender=name, shape=[n, d, v],
        dtype="float32", threads=nt, seconds=seconds, tflops=6 * n * d * v / seconds / 1e12,
        peak_rss_extra=int(max(peaks)), logits_bytes=4 * n * v, isa=fastxent.show_config(False)["isa"])
    if name == "fastxent":
        benchmark.extra_info["chunk_rows"] = chunk_rows(n, v, np.float32)


def test_head_peak_memory(benchmark):
    """Extra memory of fastxent at N = 8192, V = 128256, D = 2048 float32."""
    n, d, v = 8192, 2048, 128256
    benchmark.group = f"linear_cross_entropy_with_grad memory {n}x{d}x{v} float32"
    h, w, y = _inputs(n, d, v)
    nt = fastxent.get_num_threads()
    # The outputs are part of the result, not extra: count them out.
    outputs = h.nbytes + w.nbytes
    result = {}

    def measured():
        tracemalloc.start()
        try:
            with PeakRSS() as m:
                t0 = time.perf_counter()
                res = fastxent.linear_cross_entropy_with_grad(h, w, y, num_threads=nt)
                result["seconds"] = time.perf_counter() - t0
            _, traced_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del res
        result["rss"] = m.extra - outputs
        result["traced"] = traced_peak - outputs

    benchmark.pedantic(measured, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        function="linear_cross_entropy_with_grad", contender="fastxent", shape=[n, d, v],
        dtype="float32", threads=nt, seconds=result["seconds"], logits_bytes=4 * n * v,
        peak_rss_extra=int(result["rss"]), peak_traced_extra=int(result["traced"]),
        chunk_rows=chunk_rows(n, v, np.float32))
    assert result["traced"] <= 256 * 2**20
    assert result["rss"] <= 256 * 2**20
