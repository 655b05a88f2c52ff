"""The language-model options of cross entropy: checks, denominators, and the
row kernel that applies them.

The semantics (and the reasons for them) are written once, in
``fastxent.reference`` above ``_cross_entropy_options``: soft-capping before
the softmax, the z-loss ``z_loss * lse**2`` (not class-weighted, 0 on
ignored rows), a per-row ``sample_weight`` on the whole row loss, and for
"mean" two denominators (class-weighted for the cross entropy, unweighted for
the z-loss) that ``n_valid`` replaces.

``option_rows`` computes loss terms, statistics and the gradient of rows of
logits in one fused row kernel (csrc/rows/ce_opts.h: soft-capping, z-loss,
lse and argmax in the visits of plain cross entropy), for every dtype; the
per-row float64 values are reduced here.  Without z-loss, soft-capping and
statistics (sample_weight and n_valid alone), and for the statistics of
probabilities (from_logits=False), the plain cross entropy kernels run with
per-row factors as their grad_output.
"""
from __future__ import annotations

import math
import numpy as np

from . import _api, _core

from .reference import CrossEntropyStats  # one class for the oracle and the library

def _number(value, name, positive=False):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__") or \
            isinstance(value, complex):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def resolve_threads(num_threads):
    """The thread count a call uses (num_threads checked; None: the default)."""
    if num_threads is None:
        return _api.get_num_threads()
    return _api._check_threads(num_threads)


def check_options(z_loss, softcap, n_valid, reduction, from_logits=True):
    """(z_loss, softcap or None, n_valid or None) as floats, every value checked."""
    z = _number(z_loss, "z_loss")
    s = None if softcap is None else _number(softcap, "softcap", positive=True)
    nv = None
    if n_valid is not None:
        nv = _number(n_valid, "n_valid", positive=True)
        if reduction != "mean":
            raise ValueError(f"n_valid is the denominator of reduction='mean'; got "
                             f"reduction={reduction!r}")
    if not from_logits and (z != 0 or s is not None):
        raise ValueError(f"z_loss={z_loss!r} and softcap={softcap!r} apply to logits; they need "
                         "from_logits=True")
    return z, s, nv


def check_sample_weight(sample_weight, batch_shape):
    """sample_weight as contiguous float64 of length prod(batch_shape), or None."""
    if sample_weight is None:
        return None
    sw = np.asarray(sample_weight)
    if sw.dtype.kind not in "biuf" and not _api._is_bfloat16(sw.dtype):
        raise TypeError(f"sample_weight must have a real numeric dtype, got {sw.dtype}")
    if sw.shape != tuple(batch_shape):
        raise ValueError(f"sample_weight must have the batch shape {tuple(batch_shape)} "
                         f"(one weight per row), got {sw.shape}")
    sw = np.ascontiguousarray(sw, dtype=np.float64).reshape(-1)
    bad = ~(np.isfinite(sw) & (sw >= 0))
    if bad.any():
        i = int(np.argmax(bad))
        pos = tuple(int(p) for p in np.unravel_index(i, batch_shape)) if batch_shape else ()
        raise ValueError(f"sample_weight must be finite and non-negative; sample_weight at "
                         f"position {pos} is {float(sw[i])!r}")
    return sw


def denominators(counted, class_of_row, weight, sw, n_valid):
    """(cross entropy denominator, z-loss denominator) of "mean".

    counted: bool per row; class_of_row: the label of each row (any value at
    uncounted rows) or None for soft labels; weight: class weights or None."""
    rw = counted.astype(np.float64) if sw is None else np.where(counted, sw, 0.0)
    z_den = float(np.sum(rw))
    if n_valid is not None:
        return n_valid, n_valid
    if weight is None or class_of_row is None:
        return z_den, z_den
    wy = np.asarray(weight, dtype=np.float64)[np.where(counted, class_of_row, 0)]
    return float(np.sum(rw * wy)), z_den


def row_factors(reduction, grad_output, n, sw, ce_den, z_den, batch_shape):
    """Per-row factors (ce, z) of d(loss)/d(row part), float64 arrays of length n."""
    g = np.asarray(grad_output)
    if g.dtype.kind not in "biuf" and not _api._is_bfloat16(g.dtype):
        raise TypeError(f"grad_output must be a real number or array, got dtype {g.dtype}")
    g = g.astype(np.float64)
    if g.ndim != 0:
        if reduction != "none":
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {g.shape}")
        if g.shape != tuple(batch_shape):
            raise ValueError(f"grad_output must be a scalar or have the batch shape "
                             f"{tuple(batch_shape)}, got {g.shape}")
        g = g.reshape(-1)
    base = np.broadcast_to(g, (n,)).astype(np.float64)
    if sw is not None:
        base = base * sw
    if reduction != "mean":
        return base, base
    # A mean over nothing is NaN; its gradient is 0.
    ce = base / ce_den if ce_den else np.zeros(n)
    z = base / z_den if z_den else np.zeros(n)
    return ce, z


def reduce_loss(ce_rows, z_rows, sw, reduction, ce_den, z_den, scale, dtype):
    """The loss and its z-loss part from per-row float64 parts (both
    unweighted by sample_weight, ce_rows class-weighted)."""
    if sw is not None:
        ce_rows = ce_rows * sw
        z_rows = z_rows * sw
    if reduction == "none":
        return (ce_rows + z_rows) * scale, z_rows * scale
    ce_sum, z_sum = float(np.sum(ce_rows)), float(np.sum(z_rows))
    if reduction == "sum":
        return dtype.type((ce_sum + z_sum) * scale), dtype.type(z_sum * scale)
    ce_mean = ce_sum / ce_den if ce_den else math.nan
    z_mean = 0.0 if not np.any(z_rows) else (z_sum / z_den if z_den else math.nan)
    return dtype.type((ce_mean + z_mean) * scale), dtype.type(z_mean * scale)


def batch_stats(lse, z_part, argmax, correct, counted, sw, reduction, batch_shape, dtype):
    """The CrossEntropyStats of a call from per-row values."""
    shape = tuple(batch_shape)
    if reduction == "none":
        acc = np.where(counted, correct.astype(np.float64), np.nan)
        return CrossEntropyStats(lse.astype(dtype).reshape(shape), z_part,
                                 argmax.reshape(shape), acc.astype(dtype).reshape(shape))
    rw = counted.astype(np.float64) if sw is None else np.where(counted, sw, 0.0)
    total = float(np.sum(rw))
    if total:
        acc = float(np.sum(rw * correct)) / total
        mean_lse = float(np.sum(np.where(counted, rw * lse, 0.0))) / total
    else:
        acc = mean_lse = math.nan
    return CrossEntropyStats(dtype.type(mean_lse), z_part, argmax.reshape(shape), dtype.type(acc))


def option_rows(x, labels, target, weight, ignore_index, eps, z_loss, softcap,
                ce_factor, z_factor, want_grad, num_threads=None, xdtype=-1, out=None,
                argmax=True):
    """Loss parts, statistics and gradient of the rows of ``x`` (n, C) of
    logits, by the fused row kernel (csrc/rows/ce_opts.h).

    x: float32/float64 rows, or 16-bit rows with ``xdtype`` (_api's storage
    code). labels: int64 (n,) or None; target: soft labels (n, C) in the
    compute dtype, or None. weight: class weights (C,) in the compute dtype,
    or None.  Returns per-row float64 ``(ce, lse, argmax)``: ce
    class-weighted and 0 at ignored rows, argmax None unless asked for.
    With want_grad, the gradient (the cross entropy part times ce_factor
    plus the z-loss part times z_factor) is written into ``out`` (rows like
    x), by default x itself."""
    n, c = x.shape
    lse = np.empty(n)
    am = np.empty(n, np.int64) if argmax else None
    w_sum = float(c) if weight is None else float(np.sum(weight, dtype=np.float64))
    kw = {}
    if want_grad:
        kw = dict(out=x if out is None else out,
                  grad_output=np.ascontiguousarray(ce_factor, dtype=np.float64),
                  zscale=np.ascontiguousarray(z_factor, dtype=np.float64))
    op = _core.CE_OPTS_HARD if target is None else _core.CE_OPTS_SOFT
    ce = _core.run(op, x, num_threads=num_threads, xdtype=xdtype, labels=labels,
                   ignore_index=ignore_index, target=target, weight=weight, w_sum=w_sum,
                   smoothing=eps, softcap=0.0 if softcap is None else softcap, z_loss=z_loss,
                   lse_out=lse, argmax_out=am, reduction="none", **kw)
    return ce, lse, am


def cross_entropy_options(logits, labels, axis, weight, ignore_index, reduction,
                          label_smoothing, from_logits, base, num_threads, z_loss, softcap,
                          sample_weight, n_valid, return_stats, want_grad, grad_output, out):
    """cross_entropy(_with_grad) with the language-model options.

    sample_weight and n_valid are per-row factors and a denominator around
    the row kernels (``reduction="none"`` with a per-row ``grad_output``);
    z_loss, soft-capping and the statistics of logits go through
    ``option_rows``; those of probabilities come from their rows."""
    _api._refuse_autograd("cross_entropy_with_grad" if want_grad else "cross_entropy",
                          logits, labels, weight, sample_weight)
    reduction = _api._check_reduction(reduction)
    z, s, nv = check_options(z_loss, softcap, n_valid, reduction, from_logits)
    inp = _api._Input(logits, axis, "logits")
    scale = _api._log_base_scale(base)
    ii = _api._check_ignore_index(ignore_index)
    eps = _api._check_smoothing(label_smoothing)
    w, _ = _api._check_weight(weight, inp)
    lab = np.asarray(labels)
    if lab.dtype.kind in "iu":
        labels64, target = _api._check_labels(lab, inp, ii), None
        counted = labels64 != ii
    else:
        labels64, target = None, None
        if lab.dtype.kind == "f" or _api._is_bfloat16(lab.dtype):
            if lab.shape != inp.array.shape:
                raise ValueError(f"floating labels are class probabilities and must have the "
                                 f"shape of logits {inp.array.shape}, got {lab.shape}")
            target = inp.same_layout(lab, "labels")
        counted = np.ones(inp.n, dtype=bool)
    sw = check_sample_weight(sample_weight, inp.batch_shape)
    ce_den, z_den = denominators(counted, labels64, w, sw, nv)
    ce_f, z_f = row_factors(reduction, grad_output if want_grad else 1.0, inp.n, sw, ce_den,
                            z_den, inp.batch_shape)
    ce_f, z_f = ce_f * scale, z_f * scale
    lse = argmax = None
    if not from_logits or (z == 0 and s is None and not return_stats):
        # The row kernels, with the per-row factors as grad_output.
        kw = dict(axis=axis, weight=weight, ignore_index=ii, reduction="none",
                  label_smoothing=eps, from_logits=from_logits, num_threads=num_threads)
        if want_grad:
            row_loss, grad = _api.cross_entropy_with_grad(
                logits, labels, grad_output=ce_f.reshape(inp.batch_shape), out=out, **kw)
        else:
            row_loss = _api.cross_entropy(logits, labels, **kw)
        ce = np.asarray(row_loss, dtype=np.float64).reshape(-1)
        if return_stats:
            with np.errstate(divide="ignore"):  # probabilities: log of their sum
                lse = np.log(np.sum(inp.rows, axis=1, dtype=np.float64))
            argmax = np.argmax(inp.rows, axis=1) if inp.n else np.zeros(0, np.int64)
    else:
        rows_out = grad_rows = None
        if want_grad:
            rows_out, grad_rows = _api._out_rows(out, inp, [("logits", inp.array),
                                                            ("labels", lab),
                                                            ("weight", weight)])
        ce, lse, argmax = option_rows(inp.rows, labels64, target, w, ii, eps, z, s, ce_f, z_f,
                                      want_grad, _api._check_threads(num_threads), inp.code,
                                      grad_rows, return_stats)
        if want_grad:
            grad = _api._result_rows(out, rows_out, grad_rows, inp)
    z_rows = np.zeros(inp.n) if not z else np.where(counted, z * lse**2, 0.0)
    loss, z_part = reduce_loss(ce, z_rows, sw, reduction, ce_den, z_den, scale, inp.dtype)
    if reduction == "none":
        loss, z_part = inp.batch_result(loss), inp.batch_result(z_part)
    res = (loss, grad) if want_grad else (loss,)
    if return_stats:
        truth = labels64 if target is None else np.argmax(target, axis=1)
        res += (batch_stats(lse, z_part, argmax, argmax == truth, counted, sw, reduction,
                            inp.batch_shape, inp.dtype),)
    return res if len(res) > 1 else res[0]
