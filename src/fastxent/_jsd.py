"""Liger-Kernel's generalised Jensen-Shannon divergence (``LigerJSD``).

The definition, its limits at beta = 0 and 1 and the gradient are written in
``fastxent.reference`` above ``_jsd``.  The rows are computed by the fused
row kernel (csrc/rows/jsd.h): student and teacher rows read together,
nothing materialised but the gradient, threads over rows, every dtype; the
per-row values are summed by the binding in a fixed order.
"""
from __future__ import annotations

import numpy as np

from . import _api, _core

__all__ = ["jsd", "jsd_with_grad"]

_JSD_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_TARGET_KINDS = ("probs", "log_probs", "logits")


# The kernel of each kind of teacher.
_JSD_OPS = {"probs": _core.JSD_PROBS, "log_probs": _core.JSD_LOG_PROBS,
            "logits": _core.JSD_LOGITS}


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
    nt = _api._check_threads(num_threads)
    tgt = np.asarray(teacher_logits)
    if tgt.dtype.kind in "iub":
        tgt = tgt.astype(inp.dtype)
    t_rows = inp.same_layout(tgt, "teacher_logits")
    mask = None
    if labels is None:
        den = inp.n
    else:
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels (the ignore mask) must be integers, got dtype {lab.dtype}")
        if lab.shape != inp.batch_shape:
            raise ValueError(f"labels must have the batch shape {inp.batch_shape}, got {lab.shape}")
        counted = lab.reshape(-1) != _api._check_ignore_index(ignore_index)
        den = int(np.count_nonzero(counted))
        # The mask as the kernel's labels: -1 marks an ignored row.
        mask = np.where(counted, 0, -1).astype(np.int64)
    # "batchmean" and "mean" both divide by the counted rows.
    red = "mean" if reduction in ("batchmean", "mean") else reduction
    g = rows_out = grad_rows = None
    if want_grad:
        g = np.asarray(grad_output)
        if g.dtype.kind not in "biuf" and not _api._is_bfloat16(g.dtype):
            raise TypeError(f"grad_output must be a real number or array, got dtype {g.dtype}")
        if g.ndim and reduction != "none":
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {g.shape}")
        if g.ndim and g.shape != inp.batch_shape:
            raise ValueError(f"grad_output must be a scalar or have the batch shape "
                             f"{inp.batch_shape}, got {g.shape}")
        g = float(g) if g.ndim == 0 else np.ascontiguousarray(g.reshape(-1), dtype=np.float64)
        rows_out, grad_rows = _api._out_rows(out, inp, [("logits", inp.array),
                                                        ("teacher_logits", tgt)])
    res = _core.run(_JSD_OPS[target_kind], inp.rows, num_threads=nt, xdtype=inp.code,
                    target=t_rows, labels=mask, ignore_index=-1, beta=b, temperature=T,
                    out=grad_rows, grad_output=g, reduction=red, denom=float(den),
                    scale=scale)
    loss = _api._row_loss(res, red, inp, scale)
    if not want_grad:
        return loss
    return loss, _api._result_rows(out, rows_out, grad_rows, inp)


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
