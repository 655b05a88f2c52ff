"""The language-model head: cross entropy of ``hidden @ weight.T + bias``
without the (N, V) logits.

Design
------
Rows are taken in chunks of a fixed number of rows.  For each chunk, in
this order:

1. ``logits = h_c @ W.T (+ bias)`` by one GEMM into a reusable (chunk, V)
   buffer;
2. the fused row kernel (``cross_entropy_with_grad(..., out=buffer,
   reduction="none", grad_output=per-row factor)``) turns the logits into the
   per-row losses and, in place, into ``G = d(loss)/d(logits)``;
3. ``d_hidden[c] = G @ W`` by a second GEMM, and ``d_weight += G.T @ h_c``
   by a third one that accumulates into the output (BLAS ``beta = 1``).

Extra memory is the buffer, ``chunk * V`` elements (plus, for 16-bit inputs,
float32 copies of ``hidden`` and ``weight`` and the float32 ``d_weight``
accumulator), independent of N.

GEMMs: NumPy's ``matmul`` (the optimised BLAS NumPy ships: OpenBLAS in the
wheels, Accelerate on macOS), on fixed blocks: the forward GEMM and the
``d_weight`` update by blocks of ``_VOCAB_BLOCK`` classes, ``d_hidden`` by
blocks of ``_FEATURE_BLOCK`` features.  The blocks are spread over
``num_threads`` Python threads (``matmul`` releases the GIL) while the BLAS
itself is held to one thread (threadpoolctl).  This is what makes the
results the same bits for any thread count: a multi-threaded OpenBLAS GEMM
rounds differently with 1 and with 2 threads (measured: 0.3.30-0.3.31 on
Zen), but a single-threaded call on the same block is always the same
computation, whichever thread runs it.  The chunk size depends only on V and
the dtype (or ``chunk_size``), never on the thread count, and the chunks are
added into ``d_weight`` in row order.

``d_weight += G.T @ h_c``: ``matmul`` has no ``beta``, so each block goes
through a per-thread (block, D) temporary that stays in cache, then one add
into ``d_weight``; measured 5% slower than a ``beta = 1`` SciPy ``sgemm`` on
the update alone, but SciPy's wrappers hold the GIL (no threading by blocks)
and would add a dependency.

Threads: the steps run one after the other, never side by side: the GEMM
blocks on ``num_threads`` Python threads, each in a one-thread BLAS, then the
row kernel on fastxent's OpenMP pool with ``num_threads`` threads.  At no
time are more than ``num_threads`` threads busy, and the BLAS pool is back at
its previous size when the call returns.
"""
from __future__ import annotations

import math
import operator
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _api
from ._options import (
    batch_stats,
    check_options,
    check_sample_weight,
    denominators,
    option_rows,
    reduce_loss,
    resolve_threads,
    row_factors,
)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]

# The logits buffer of a chunk: 128 MiB rounded down to a power of two of
# rows, so that its GEMMs stay large (256 rows of a 128256-class vocabulary
# in float32) and the extra memory stays far below the logits'.
_CHUNK_BYTES = 128 << 20
_MIN_CHUNK = 16
# GEMM blocks: classes per block of the forward GEMM and of the d_weight
# update (a 512 x 2048 float32 temporary is 4 MiB: it stays in cache), and
# features per block of d_hidden.  Fixed numbers: the results depend on them.
_VOCAB_BLOCK = 512
_FEATURE_BLOCK = 256

_local = threading.local()


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        raise ImportError("fastxent.linear_cross_entropy needs threadpoolctl to run its BLAS blocks "
                          "one thread each: pip install fastxent[head] (or threadpoolctl)") from None
    return threadpoolctl


def _release_openblas_control():
    # threadpoolctl >= 3.6 lets only one "controlling" thread change a
    # process-wide OpenBLAS pool and silently ignores the others; the head
    # changes it from whichever thread enters first or leaves last, under
    # its own lock, so it hands control back after each change.
    ctl = getattr(_threadpoolctl(), "OpenBLASController", None)
    clear = getattr(ctl, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def _one_thread_blas_here():
    """Limit the BLAS to one thread in this thread (per-thread pools: OpenMP
    builds of OpenBLAS); a pool worker's initializer."""
    _threadpoolctl().threadpool_limits(1, user_api="blas")


class _OneThreadBlas:
    """Holds the BLAS pools to one thread while any call of the head runs.

    The limit is process-wide, so concurrent calls share it: the first one
    in sets it, the last one out restores the previous sizes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._controller = self._limit = None

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                if self._controller is None:
                    self._controller = _threadpoolctl().ThreadpoolController()
                _release_openblas_control()
                self._limit = self._controller.limit(limits=1, user_api="blas")
                _release_openblas_control()
            self._users += 1
        return self

    def per_thread_initializer(self):
        """What a pool worker must run first: with OpenMP builds of OpenBLAS
        the limit is per thread, so each worker sets its own."""
        libs = self._controller.lib_controllers if self._controller is not None else []
        if any(getattr(lib, "threading_layer", None) == "openmp" for lib in libs):
            return _one_thread_blas_here
        return None

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                _release_openblas_control()
                self._limit.restore_original_limits()
                _release_openblas_control()
                self._limit = None


_one_thread_blas = _OneThreadBlas()


def _temporary(rows, cols, dtype):
    """A per-thread (rows, cols) scratch array, reused across blocks and calls."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < rows * cols:
        buf = _local.buf = np.empty(rows * cols, dtype)
    return buf[:rows * cols].reshape(rows, cols)


def _forward_block(hc, w2, b2, logits, v0, v1):
    np.matmul(hc, w2[v0:v1].T, out=logits[:, v0:v1])
    if b2 is not None:
        logits[:, v0:v1] += b2[v0:v1]


def _d_hidden_block(g, w2, dh, d0, d1):
    np.matmul(g, w2[:, d0:d1], out=dh[:, d0:d1])


def _d_weight_block(g, hc, dw, db, first, v0, v1):
    if first:
        np.matmul(g[:, v0:v1].T, hc, out=dw[v0:v1])
    else:
        tmp = _temporary(v1 - v0, hc.shape[1], dw.dtype)
        np.matmul(g[:, v0:v1].T, hc, out=tmp)
        dw[v0:v1] += tmp
    if db is not None:
        db[v0:v1] += np.sum(g[:, v0:v1], axis=0, dtype=np.float64)


def _blocks(total, size):
    return [(i, min(total, i + size)) for i in range(0, total, size)]


def _run(pool, fn, *args_list):
    """fn over the argument tuples, on the pool's threads (or this one)."""
    if pool is None:
        for args in args_list:
            fn(*args)
    else:
        for f in [pool.submit(fn, *args) for args in args_list]:
            f.result()


def chunk_rows(n, v, dtype, chunk_size=None):
    """The number of rows per chunk: a function of V and the dtype only."""
    if chunk_size is not None:
        try:
            rows = operator.index(chunk_size)
        except TypeError:
            raise TypeError(f"chunk_size must be an integer or None, got {chunk_size!r}") from None
        if rows < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    else:
        fit = _CHUNK_BYTES // max(1, v * np.dtype(dtype).itemsize)
        rows = max(_MIN_CHUNK, 1 << max(0, int(fit).bit_length() - 1))
    return max(1, min(rows, n))


class _Rows:
    """What _api's label and weight checks need to know of the logits."""

    def __init__(self, batch_shape, v, dtype):
        self.batch_shape, self.c, self.dtype, self.axis = batch_shape, v, dtype, -1


def _checked_float(a, name):
    a = np.asarray(a)
    cdt, _ = _api._compute_dtype(a.dtype, name)
    if a.dtype.kind in "iub":
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    return a, cdt


def _linear_cross_entropy(hidden, weight, labels, bias, class_weight, ignore_index, reduction,
                          label_smoothing, z_loss, softcap, sample_weight, n_valid, base,
                          return_stats, num_threads, chunk_size, want_grad, grad_output):
    _api._refuse_autograd("linear_cross_entropy", hidden, weight, bias)
    h, h_cdt = _checked_float(hidden, "hidden")
    w, w_cdt = _checked_float(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, D), the nn.Linear layout; got shape {w.shape}")
    if h.ndim < 1:
        raise ValueError(f"hidden must have at least one dimension (..., D); got shape {h.shape}")
    v, d = w.shape
    if h.shape[-1] != d:
        raise ValueError(f"hidden has D = {h.shape[-1]} features (shape {h.shape}) but weight "
                         f"has D = {d} (shape {w.shape}, the nn.Linear (V, D) layout)")
    if v == 0:
        raise ValueError(f"weight has no classes: V == 0 (shape {w.shape})")
    cdt = np.dtype(np.float64) if np.float64 in (h_cdt, w_cdt) else np.dtype(np.float32)
    b = None
    if bias is not None:
        b, _ = _checked_float(bias, "bias")
        if b.shape != (v,):
            raise ValueError(f"bias must have shape ({v},) (one per class of weight), "
                             f"got {b.shape}")
    reduction = _api._check_reduction(reduction)
    eps = _api._check_smoothing(label_smoothing)
    scale = _api._log_base_scale(base)
    ii = _api._check_ignore_index(ignore_index)
    z, s, nv = check_options(z_loss, softcap, n_valid, reduction)
    nt = resolve_threads(num_threads)
    batch_shape = h.shape[:-1]
    n = math.prod(batch_shape)
    rows = _Rows(batch_shape, v, cdt)
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {lab.dtype}")
    lab = _api._check_labels(lab, rows, ii)
    cw, _ = _api._check_weight(class_weight, rows)
    sw = check_sample_weight(sample_weight, batch_shape)
    counted = lab != ii
    ce_den, z_den = denominators(counted, lab, cw, sw, nv)
    ce_f = z_f = None
    if want_grad:
        ce_f, z_f = row_factors(reduction, grad_output, n, sw, ce_den, z_den, batch_shape)
        ce_f, z_f = ce_f * scale, z_f * scale

    # Every check has passed: from here on, only allocations and arithmetic.
    h2 = np.ascontiguousarray(h.reshape(n, d), dtype=cdt)
    w2 = np.ascontiguousarray(w, dtype=cdt)
    b2 = None if b is None else np.ascontiguousarray(b, dtype=cdt)
    chunk = chunk_rows(n, v, cdt, chunk_size)
    buf = np.empty((chunk, v), cdt)
    ce_rows = np.empty(n)
    lse_rows = np.empty(n) if (z or return_stats) else None
    argmax_rows = np.empty(n, np.int64) if return_stats else None
    fused = z == 0 and s is None and not return_stats
    d_hidden = d_weight = d_bias = None
    if want_grad:
        d_hidden = np.empty((n, d), cdt)
        d_weight = np.zeros((v, d), cdt) if n == 0 else np.empty((v, d), cdt)
        d_bias = np.zeros(v) if b is not None else None

    vblocks = _blocks(v, _VOCAB_BLOCK)
    dblocks = _blocks(d, _FEATURE_BLOCK)
    with _one_thread_blas:
        pool = None
        if nt > 1:
            pool = ThreadPoolExecutor(nt, thread_name_prefix="fastxent-head",
                                      initializer=_one_thread_blas.per_thread_initializer())
        try:
            for r0 in range(0, n, chunk):
                r1 = min(n, r0 + chunk)
                hc, logits = h2[r0:r1], buf[:r1 - r0]
                _run(pool, _forward_block, *[(hc, w2, b2, logits, a, e) for a, e in vblocks])
                lab_c = lab[r0:r1]
                if fused:
                    if want_grad:
                        loss_c, _ = _api.cross_entropy_with_grad(
                            logits, lab_c, weight=cw, ignore_index=ii, label_smoothing=eps,
                            reduction="none", grad_output=ce_f[r0:r1], out=logits,
                            num_threads=nt)
                    else:
                        loss_c = _api.cross_entropy(logits, lab_c, weight=cw, ignore_index=ii,
                                                    label_smoothing=eps, reduction="none",
                                                    num_threads=nt)
                    ce_rows[r0:r1] = loss_c
                else:
                    ce_c, lse_c, am_c = option_rows(
                        logits, lab_c, None, cw, ii, eps, z, s,
                        None if ce_f is None else ce_f[r0:r1],
                        None if z_f is None else z_f[r0:r1], want_grad, num_threads=nt)
                    ce_rows[r0:r1] = ce_c
                    lse_rows[r0:r1] = lse_c
                    if argmax_rows is not None:
                        argmax_rows[r0:r1] = am_c
                if not want_grad:
                    continue
                _run(pool, _d_hidden_block, *[(logits, w2, d_hidden[r0:r1], a, e)
                                              for a, e in dblocks])
                _run(pool, _d_weight_block, *[(logits, hc, d_weight, d_bias, r0 == 0, a, e)
                                              for a, e in vblocks])
        finally:
            if pool is not None:
                pool.shutdown()

    z_rows = np.zeros(n) if not z else np.where(counted, z * lse_rows**2, 0.0)
    out_dtype = cdt
    loss, z_part = reduce_loss(ce_rows, z_rows, sw, reduction, ce_den, z_den, scale, out_dtype)
    if reduction == "none":
        loss = loss.astype(out_dtype).reshape(batch_shape)
        z_part = z_part.astype(out_dtype).reshape(batch_shape)
    stats = None
    if return_stats:
        stats = batch_stats(lse_rows, z_part, argmax_rows, argmax_rows == lab, counted, sw,
                            reduction, batch_shape, out_dtype)
    if not want_grad:
        return (loss, stats) if return_stats else loss
    res = [loss, d_hidden.reshape(h.shape).astype(h.dtype, copy=False),
           d_weight.astype(w.dtype, copy=False)]
    if d_bias is not None:
        res.append(d_bias.astype(b.dtype))
    if return_stats:
        res.append(stats)
    return tuple(res)


def linear_cross_entropy(hidden, weight, labels, *, bias=None, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                         base=None, return_stats=False, num_threads=None, chunk_size=None):
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits.

    hidden: (..., D); weight: (V, D), the ``nn.Linear`` layout; bias: (V,);
    labels: integer class indices of hidden's shape without D.  The class
    weights are ``class_weight`` (``weight`` is the layer's).  Every other
    option is cross_entropy's.  float16/bfloat16 are computed in float32.
    Extra memory is ``chunk_size * V`` elements (``chunk_size=None``: about
    128 MiB), whatever the number of rows.
    """
    return _linear_cross_entropy(hidden, weight, labels, bias, class_weight, ignore_index,
                                 reduction, label_smoothing, z_loss, softcap, sample_weight,
                                 n_valid, base, return_stats, num_threads, chunk_size, False, 1.0)


def linear_cross_entropy_with_grad(hidden, weight, labels, *, bias=None, class_weight=None,
                                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                                   base=None, return_stats=False, num_threads=None,
                                   chunk_size=None, grad_output=1.0):
    """``(loss, d_hidden, d_weight[, d_bias][, stats])`` of ``linear_cross_entropy``,
    times ``grad_output`` (a scalar, or one value per row for reduction="none").

    ``d_bias`` comes when ``bias`` is given, ``stats`` with ``return_stats``.
    Gradients have the dtypes of their inputs; ``d_weight`` of 16-bit weights
    is accumulated in float32 and rounded once.
    """
    return _linear_cross_entropy(hidden, weight, labels, bias, class_weight, ignore_index,
                                 reduction, label_smoothing, z_loss, softcap, sample_weight,
                                 n_valid, base, return_stats, num_threads, chunk_size, True,
                                 grad_output)
