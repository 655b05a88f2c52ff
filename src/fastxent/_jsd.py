"""Liger-Kernel's generalised Jensen-Shannon divergence (``LigerJSD``).

The definition, its limits at beta = 0 and 1 and the gradient are written in
``fastxent.reference`` above ``_jsd``.  Rows are computed a block at a time
in float64 (student and teacher rows read together; the softmaxes exist only
for the rows of the block), and the gradient is written per block into the
output.
"""
from __future__ import annotations

import math

import numpy as np

from . import _api
from ._options import block_rows, resolve_threads

__all__ = ["jsd", "jsd_with_grad"]

_JSD_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_TARGET_KINDS = ("probs", "log_probs", "logits")


def _xlogy(a, log_b):
    return np.where(a != 0, a * log_b, 0.0)


def _jsd_rows(x, t, beta, T, target_kind):
    """(per-row divergence, d(row)/d(student logits)) of float64 blocks."""
    log_q = _api.log_softmax(x / T, num_threads=1)
    q = np.exp(log_q)
    if target_kind == "probs":
        p, log_p = t, np.log(t)
    elif target_kind == "log_probs":
        p, log_p = np.exp(t), t
    else:
        log_p = _api.log_softmax(t / T, num_threads=1)
        p = np.exp(log_p)
    if beta == 0.0:  # KL(P || Q)
        terms = _xlogy(p, log_p) - _xlogy(p, log_q)
        d_logq = -p
    elif beta == 1.0:  # KL(Q || P)
        terms = _xlogy(q, log_q) - _xlogy(q, log_p)
        d_logq = q * (log_q - log_p) + q
    else:
        m = beta * q + (1.0 - beta) * p
        log_m = np.log(m)
        terms = beta * _xlogy(q, log_q) + (1.0 - beta) * _xlogy(p, log_p) - _xlogy(m, log_m)
        d_logq = beta * np.where(q != 0, q * (log_q - log_m), 0.0)
    row = T * T * np.sum(terms, axis=1)
    grad = T * (d_logq - q * np.sum(d_logq, axis=1, keepdims=True))
    return row, grad


def _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels, ignore_index,
         reduction, axis, base, num_threads, want_grad, grad_output, out):
    _api._refuse_autograd("jsd_with_grad" if want_grad else "jsd", student_logits,
                          teacher_logits)
    inp = _api._Input(student_logits, axis, "student_logits")
    reduction = _api._check_reduction(reduction, _JSD_REDUCTIONS)
    if not isinstance(target_kind, str) or target_kind not in _TARGET_KINDS:
        raise ValueError(f"target_kind must be one of 'probs', 'log_probs', 'logits'; "
                         f"got {target_kind!r}")
    b = _api._real(beta, "beta", "a number in [0, 1]")
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    T = _api._check_temperature(temperature)
    scale = _api._log_base_scale(base)
    resolve_threads(num_threads)  # checked; the blocks run on the calling thread
    tgt = np.asarray(teacher_logits)
    if tgt.dtype.kind in "iub":
        tgt = tgt.astype(inp.dtype)
    t_rows = inp.same_layout(tgt, "teacher_logits")
    if labels is None:
        counted = np.ones(inp.n, dtype=bool)
    else:
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels (the ignore mask) must be integers, got dtype {lab.dtype}")
        if lab.shape != inp.batch_shape:
            raise ValueError(f"labels must have the batch shape {inp.batch_shape}, got {lab.shape}")
        counted = lab.reshape(-1) != _api._check_ignore_index(ignore_index)
    den = int(np.count_nonzero(counted))
    mean = reduction in ("batchmean", "mean")
    factor = scale / den if (mean and den) else (0.0 if mean else scale)
    rows_out = grad_rows = None
    if want_grad:
        g = np.asarray(grad_output)
        if g.dtype.kind not in "biuf" and g.dtype not in _api._UPCAST_16:
            raise TypeError(f"grad_output must be a real number or array, got dtype {g.dtype}")
        if g.ndim and reduction != "none":
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {g.shape}")
        if g.ndim and g.shape != inp.batch_shape:
            raise ValueError(f"grad_output must be a scalar or have the batch shape "
                             f"{inp.batch_shape}, got {g.shape}")
        gscale = np.broadcast_to(g.astype(np.float64).reshape(-1) * factor, (inp.n,))
        if out is not None:
            rows_out = _api._check_out(out, inp, inp.out_dtype)
            _api._check_overlap(out, [("logits", inp.array), ("teacher_logits", tgt)], inp.array)
        grad_rows = rows_out if rows_out is not None else np.empty((inp.n, inp.c), inp.dtype)

    row_loss = np.zeros(inp.n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rows = block_rows(inp.c)
        for r0 in range(0, inp.n, rows):
            r1 = min(inp.n, r0 + rows)
            row, grad = _jsd_rows(inp.rows[r0:r1].astype(np.float64),
                                  t_rows[r0:r1].astype(np.float64), b, T, target_kind)
            keep = counted[r0:r1]
            row_loss[r0:r1] = np.where(keep, row, 0.0)
            if want_grad:
                grad *= np.where(keep, gscale[r0:r1], 0.0)[:, None]
                grad[~keep] = 0.0
                grad_rows[r0:r1] = grad
    if reduction == "none":
        loss = inp.batch_result(row_loss * scale)
    else:
        total = float(np.sum(row_loss))
        if mean:
            total = total / den if den else math.nan
        loss = inp.dtype.type(total * scale)
    if not want_grad:
        return loss
    if out is not None:
        if rows_out is None:
            _api._write_out(out, grad_rows, inp)
        return loss, out
    return loss, _api._fresh_like(grad_rows, inp, inp.out_dtype)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, target_kind="logits",
        labels=None, ignore_index=-100, reduction="batchmean", axis=-1, base=None,
        num_threads=None):
    """Liger's generalised JSD between ``softmax(student_logits / T)`` and the
    teacher's distribution (``target_kind``: "logits", "log_probs" or
    "probs"), times ``T**2``: ``beta * KL(Q || M) + (1 - beta) * KL(P || M)``
    with ``M = beta * Q + (1 - beta) * P``; beta = 0 gives KL(teacher ||
    student), beta = 1 KL(student || teacher).  Rows whose ``labels`` equal
    ``ignore_index`` are left out; "batchmean"/"mean" divide by the counted
    rows, "none" gives one value per row."""
    return _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels,
                ignore_index, reduction, axis, base, num_threads, False, None, None)


def jsd_with_grad(student_logits, teacher_logits, *, beta=0.5, temperature=1.0,
                  target_kind="logits", labels=None, ignore_index=-100, reduction="batchmean",
                  axis=-1, base=None, num_threads=None, grad_output=1.0, out=None):
    """``(loss, d(loss)/d(student_logits) * grad_output)`` of ``jsd``."""
    return _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels,
                ignore_index, reduction, axis, base, num_threads, True, grad_output, out)
