"""The public functions: validation, layout and dtype handling around the C kernels.

Everything the C layer indexes by is decided and checked here:

* the class axis is moved last and the input viewed as ``(N, C)`` rows with
  contiguous, aligned, native-endian elements (copied only when no such
  view exists);
* labels are checked to lie in ``[0, C)`` or equal ``ignore_index`` and
  handed over as contiguous int64;
* weights, targets and ``out=`` are checked for shape, dtype and overlap.

The kernels return one float64 value per row; batch reductions sum those
in NumPy, in a fixed order that does not depend on the thread count.

dtypes: float32 and float64 are computed natively. float16 and bfloat16
(ml_dtypes) are upcast to float32 here (computed in float32; results
float32, gradients and (log-)softmax outputs rounded back to the input
dtype). Integer and bool inputs are computed in float64.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from . import _core

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "logsumexp",
    "log_softmax",
    "softmax",
    "entropy",
    "kl_div",
    "kl_div_with_grad",
    "binary_cross_entropy",
    "binary_cross_entropy_with_grad",
    "set_num_threads",
    "get_num_threads",
]

_REDUCTIONS = ("mean", "sum", "none")
# C-contiguous and aligned: np.ascontiguousarray keeps a misaligned view,
# which the C kernels must never see.
_CA = ("C", "A")
_MAX_THREADS = 1024
_thread_override = None  # set by set_num_threads; None: follow OpenMP


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------

def _check_threads(n, name="num_threads"):
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an integer or None, got {n!r}") from None
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"{name} must be between 1 and {_MAX_THREADS}, got {n}")
    return n


def set_num_threads(n):
    """Set the default thread count of every later call (``None``: follow OpenMP).

    ``None`` restores the default, which reads ``omp_get_max_threads()`` at
    each call and so honours ``OMP_NUM_THREADS`` and ``threadpoolctl``. An
    explicit count takes precedence over both.
    """
    global _thread_override
    _thread_override = None if n is None else _check_threads(n, "n")


def get_num_threads():
    """The thread count a call with ``num_threads=None`` uses now."""
    if _thread_override is not None:
        return _thread_override
    return max(1, _core.max_threads())


def _threads(num_threads):
    if num_threads is None:
        return get_num_threads()
    return _check_threads(num_threads)


# --------------------------------------------------------------------------
# dtypes and layout
# --------------------------------------------------------------------------

_UPCAST_16 = {np.dtype(np.float16)}
try:  # bfloat16 is optional
    import ml_dtypes as _ml_dtypes

    _UPCAST_16.add(np.dtype(_ml_dtypes.bfloat16))
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None


def _compute_dtype(dt, name):
    """(compute dtype, result dtype for arrays shaped like the input)."""
    if dt in _UPCAST_16:
        return np.dtype(np.float32), dt
    if dt.kind == "f":
        if dt.itemsize == 2:
            return np.dtype(np.float32), np.dtype(np.float16)
        if dt.itemsize == 4:
            return np.dtype(np.float32), np.dtype(np.float32)
        return np.dtype(np.float64), np.dtype(np.float64)
    if dt.kind in "iub":
        return np.dtype(np.float64), np.dtype(np.float64)
    raise TypeError(f"{name} must have a real numeric dtype, got {dt}")


def _normalize_axis(axis, ndim, name):
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim, f"{name} has {ndim} dimension(s)")
    return axis % ndim


def _as_rows(a, n, c, dtype):
    """``a`` (class axis last) as an (n, c) array of ``dtype`` whose rows are
    contiguous, aligned and native-endian: a view when one exists."""
    if a.dtype != dtype:
        return np.require(a, dtype, _CA).reshape(n, c)
    if a.flags.aligned and (c <= 1 or a.strides[-1] == a.itemsize):
        try:
            return np.reshape(a, (n, c), copy=False)
        except (ValueError, TypeError):
            pass
    return np.require(a, None, _CA).reshape(n, c)


_CODE_F16, _CODE_BF16 = 2, 3  # fastxent.h's FX_F16, FX_BF16


def _storage_code(dt):
    """The kernels' 16-bit storage code for dt, or -1."""
    if dt == np.float16:
        return _CODE_F16
    if _ml_dtypes is not None and dt == np.dtype(_ml_dtypes.bfloat16):
        return _CODE_BF16
    return -1


class _Input:
    """An input with a class axis, seen as ``(N, C)`` rows.

    keep16: an op whose kernels read 16-bit rows directly; float16 and
    bfloat16 rows then stay 16-bit (``code`` says which) instead of being
    widened to float32 here."""

    __slots__ = ("array", "moved", "rows", "batch_shape", "n", "c", "dtype", "out_dtype", "axis",
                 "code")

    def __init__(self, data, axis, name, keep16=False):
        a = np.asarray(data)
        if a.ndim == 0:
            raise ValueError(f"{name} must have at least one dimension (the class axis)")
        self.dtype, self.out_dtype = _compute_dtype(a.dtype, name)
        self.code = _storage_code(a.dtype) if keep16 else -1
        self.axis = _normalize_axis(axis, a.ndim, name)
        self.array = a
        self.moved = a if self.axis == a.ndim - 1 else np.moveaxis(a, self.axis, -1)
        self.batch_shape = self.moved.shape[:-1]
        self.c = self.moved.shape[-1]
        if self.c == 0:
            raise ValueError(f"{name} has no classes: axis {axis} has length 0 (C == 0)")
        self.n = math.prod(self.batch_shape)
        store = self.dtype if self.code < 0 else np.dtype(a.dtype.newbyteorder("="))
        self.rows = _as_rows(self.moved, self.n, self.c, store)

    def same_layout(self, other, name):
        """``other`` (shaped like the input) as rows of the compute dtype."""
        b = np.asarray(other)
        if b.shape != self.array.shape:
            raise ValueError(f"{name} must have the shape of logits {self.array.shape}, got {b.shape}")
        _compute_dtype(b.dtype, name)
        if self.axis != b.ndim - 1:
            b = np.moveaxis(b, self.axis, -1)
        return _as_rows(b, self.n, self.c, self.dtype)

    def batch_result(self, row_values, dtype=None):
        """Per-row float64 values as an array of the batch shape (a scalar for one row)."""
        res = row_values.astype(dtype or self.dtype, copy=False).reshape(self.batch_shape)
        return res[()] if res.ndim == 0 else res


def _check_out(out, inp, dtype, name="out"):
    """Validate ``out=`` (shaped like the input, of ``dtype``); returns the rows
    the kernel may write directly, or None when a temporary is needed."""
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name} must be a writable NumPy array, got {type(out).__name__}")
    if out.shape != inp.array.shape:
        raise ValueError(f"{name} must have shape {inp.array.shape}, got {out.shape}")
    if out.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    moved = out if inp.axis == out.ndim - 1 else np.moveaxis(out, inp.axis, -1)
    if out.dtype != inp.rows.dtype or not out.dtype.isnative or not out.flags.aligned:
        return None
    if inp.c > 1 and moved.strides[-1] != out.itemsize:
        return None
    try:
        return np.reshape(moved, (inp.n, inp.c), copy=False)
    except (ValueError, TypeError):
        return None


def _same_memory(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape and a.dtype == b.dtype)


def _check_overlap(out, inputs, logits):
    """out may be logits itself (in place); any other overlap is an error."""
    for name, arr in inputs:
        if arr is None or not isinstance(arr, np.ndarray):
            continue
        if name == "logits" and _same_memory(out, arr):
            continue
        if np.may_share_memory(out, arr):
            raise ValueError(f"out overlaps {name}; only out=logits (the very same array) "
                             "may share memory with an input")


def _write_out(out, rows_tmp, inp):
    """Copy an (N, C) result into out (shaped like the input)."""
    moved = out if inp.axis == out.ndim - 1 else np.moveaxis(out, inp.axis, -1)
    np.copyto(moved, rows_tmp.reshape(moved.shape), casting="unsafe")
    return out


def _fresh_like(rows, inp, dtype):
    """An (N, C) result as an array shaped like the input, of ``dtype``."""
    res = rows.reshape(inp.moved.shape)
    if inp.axis != inp.array.ndim - 1:
        res = np.moveaxis(res, -1, inp.axis)
    return res.astype(dtype, copy=False)


# --------------------------------------------------------------------------
# Scalar options
# --------------------------------------------------------------------------

def _check_reduction(reduction, allowed=_REDUCTIONS):
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}; got {reduction!r}")
    return reduction


def _real(value, name, what="a real number"):
    """A real scalar option as a float; TypeError for strings, complex,
    sequences and anything else that is not a number."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}")
    return float(value)


def _log_base_scale(base):
    """1 / ln(base); 1 for base=None (nats)."""
    if base is None:
        return 1.0
    b = _real(base, "base", "a positive number or None")
    if not (b > 0 and math.isfinite(b)) or b == 1:
        raise ValueError(f"base must be a positive finite number other than 1, got {base!r}")
    return 1.0 / math.log(b)


def _check_smoothing(label_smoothing):
    eps = _real(label_smoothing, "label_smoothing", "a number in [0, 1]")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return eps


def _check_weight(weight, inp):
    if weight is None:
        return None, float(inp.c)
    w = np.asarray(weight)
    _compute_dtype(w.dtype, "weight")
    if w.shape != (inp.c,):
        raise ValueError(f"weight must have shape ({inp.c},) (one per class), got {w.shape}")
    w64 = w.astype(np.float64)
    bad = ~((w64 >= 0) & np.isfinite(w64))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"weight must be finite and non-negative; weight[{i}] = {w64[i]!r}")
    with np.errstate(over="ignore"):
        w = np.require(w, inp.dtype, _CA)
    if not np.isfinite(w).all():
        i = int(np.argmax(~np.isfinite(w)))
        raise ValueError(f"weight[{i}] = {w64[i]!r} overflows the compute dtype {inp.dtype}")
    return w, float(np.sum(w, dtype=np.float64))


def _check_labels(labels, inp, ignore_index):
    """Integer labels as contiguous int64 of length N, every value checked."""
    lab = np.asarray(labels)
    if lab.shape != inp.batch_shape:
        raise ValueError(f"integer labels must have the batch shape {inp.batch_shape} "
                         f"(logits' shape without axis {inp.axis}), got {lab.shape}")
    flat = lab.reshape(-1)
    bad = (flat < 0) | (flat >= inp.c)
    if ignore_index is not None:
        bad &= flat != ignore_index
    if bad.any():
        i = int(np.argmax(bad))
        pos = np.unravel_index(i, inp.batch_shape) if inp.batch_shape else ()
        pos = tuple(int(p) for p in pos)
        raise ValueError(f"label {flat[i]} at position {pos} is out of range [0, {inp.c})"
                         + (f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""))
    return np.require(flat, np.int64, _CA)


def _check_ignore_index(ignore_index):
    try:
        ii = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None
    if not -(2**63) <= ii < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ii}")
    return ii


def _grad_output_array(grad_output):
    """grad_output as float64; TypeError naming it for anything not real."""
    if isinstance(grad_output, float):
        return np.float64(grad_output)
    try:
        g = np.asarray(grad_output)
    except Exception as exc:  # ragged sequences and the like
        raise TypeError(f"grad_output must be a real number or array, got {grad_output!r}") from exc
    if g.dtype.kind not in "biuf" and g.dtype not in _UPCAST_16:
        raise TypeError(f"grad_output must be a real number or array, got dtype {g.dtype} "
                        f"({'complex' if g.dtype.kind == 'c' else 'not numeric'})")
    return g.astype(np.float64, copy=False)


def _gscale(grad_output, reduction, inp, factor):
    """grad_output times the reduction's factor, as contiguous float64 (1 or N)."""
    g = _grad_output_array(grad_output)
    if g.ndim == 0:
        val = float(grad_output) * factor
        return np.array([val], dtype=np.float64)
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
    if g.shape != inp.batch_shape:
        raise ValueError(f"grad_output must be a scalar or have the batch shape {inp.batch_shape}, got {g.shape}")
    return np.require(g.reshape(-1) * factor, np.float64, _CA)


def _grad_buffers(grad_output, reduction, inp, factor, out, inputs):
    """(gscale, rows_out, grad_rows): the per-row gradient scale, the rows of
    out= the kernel may write directly (or None) and the rows it writes."""
    gscale = _gscale(grad_output, reduction, inp, factor)
    rows_out = None
    if out is not None:
        rows_out = _check_out(out, inp, inp.out_dtype)
        _check_overlap(out, inputs, inp.array)
    grad_rows = rows_out if rows_out is not None else np.empty((inp.n, inp.c), inp.rows.dtype)
    return gscale, rows_out, grad_rows


def _reduce(row_loss, reduction, inp, scale, denom):
    """Per-row float64 losses as the result: batch-shaped for "none", else
    their fixed-order sum (over denom, if given; NaN when denom is 0) as a
    scalar of the compute dtype."""
    if reduction == "none":
        if scale != 1.0:
            row_loss *= scale
        return inp.batch_result(row_loss)
    total = _core.sum_f64(row_loss)
    if denom is not None:
        total = total / denom if denom != 0 else np.float64(np.nan)
    return inp.dtype.type(total * scale)


def _with_grad(loss, out, rows_out, grad_rows, inp):
    """(loss, gradient shaped like the logits): out= itself when given."""
    if out is not None:
        if rows_out is None:
            _write_out(out, grad_rows, inp)
        return loss, out
    return loss, _fresh_like(grad_rows, inp, inp.out_dtype)


# --------------------------------------------------------------------------
# Fast paths: the common call goes straight to _core (which returns None for
# anything it does not take); the general path gives the same bits.
# --------------------------------------------------------------------------

def _fast_ok(axis, num_threads):
    """The last axis and a valid num_threads (or None)."""
    return (type(axis) is int and axis == -1
            and (num_threads is None or (type(num_threads) is int and 1 <= num_threads <= _MAX_THREADS)))


def _ce_fast_ok(axis, weight, ignore_index, reduction, label_smoothing, from_logits, base,
                num_threads):
    """cross_entropy's default options (any ignore_index that fits in int64)."""
    return (type(reduction) is str and reduction == "mean" and weight is None
            and from_logits is True and base is None
            and type(label_smoothing) in (int, float) and label_smoothing == 0
            and type(ignore_index) is int and -2**63 <= ignore_index < 2**63
            and _fast_ok(axis, num_threads))


def _fast_threads(num_threads):
    """The thread count a fast path passes to _core (0: OpenMP's maximum)."""
    return num_threads or _thread_override or 0


# --------------------------------------------------------------------------
# Cross entropy
# --------------------------------------------------------------------------

def _cross_entropy(logits, labels, axis, weight, ignore_index, reduction, label_smoothing,
                   from_logits, base, num_threads, want_grad, grad_output, out):
    lab = np.asarray(labels)
    inp = _Input(logits, axis, "logits", keep16=True)
    reduction = _check_reduction(reduction)
    eps = _check_smoothing(label_smoothing)
    scale = _log_base_scale(base)
    ignore_index = _check_ignore_index(ignore_index)
    nt = _threads(num_threads)
    w, w_sum = _check_weight(weight, inp)

    if lab.dtype.kind in "iu":
        soft = False
        labels64 = _check_labels(lab, inp, ignore_index)
        target = None
        if reduction == "mean":
            counted = labels64 != ignore_index
            if w is None:
                denom = float(np.count_nonzero(counted))
            else:
                denom = float(np.sum(w[labels64[counted]], dtype=np.float64))
    elif lab.dtype.kind == "f" or lab.dtype in _UPCAST_16:
        soft = True
        if lab.shape != inp.array.shape:
            raise ValueError(f"floating labels are class probabilities and must have the shape "
                             f"of logits {inp.array.shape}, got {lab.shape}; pass integer class "
                             "indices for hard labels")
        target = inp.same_layout(lab, "labels")
        labels64 = None
        denom = float(inp.n)
    else:
        raise TypeError(f"labels must be integer class indices or floating probabilities, got dtype {lab.dtype}")

    if from_logits:
        op = _core.CE_SOFT if soft else _core.CE_HARD
    else:
        op = _core.CE_PROBS_SOFT if soft else _core.CE_PROBS_HARD

    factor = scale
    if reduction == "mean":
        factor = scale / denom if denom != 0 else 0.0

    gscale = rows_out = grad_rows = None
    if want_grad:
        gscale, rows_out, grad_rows = _grad_buffers(
            grad_output, reduction, inp, factor, out,
            [("logits", inp.array), ("labels", lab), ("weight", weight)])

    row_loss = np.empty(inp.n, np.float64)
    _core.run(op, inp.rows, labels64, target, w, w_sum, ignore_index, eps,
              grad_rows, row_loss, gscale, nt, xdtype=inp.code)
    # A mean over no counted label (or counted weights summing to 0) is NaN.
    loss = _reduce(row_loss, reduction, inp, scale, denom if reduction == "mean" else None)
    if not want_grad:
        return loss
    return _with_grad(loss, out, rows_out, grad_rows, inp)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, from_logits=True,
                  base=None, num_threads=None):
    """Cross entropy between ``softmax(logits)`` along ``axis`` and ``labels``.

    ``labels`` are integer class indices (the logits' shape without ``axis``)
    or floating class probabilities (the logits' shape). Semantics follow
    ``torch.nn.functional.cross_entropy`` (pass ``axis=1`` for its layout).
    """
    # The common call (2-D float logits, int64 labels, default options) skips
    # the general checks; it gives the same bits as the general path.
    if _ce_fast_ok(axis, weight, ignore_index, reduction, label_smoothing, from_logits, base,
                   num_threads):
        res = _core.cross_entropy_fast(logits, labels, ignore_index, _fast_threads(num_threads))
        if res is not None:
            return res
    return _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                          label_smoothing, from_logits, base, num_threads, False, None, None)


def cross_entropy_with_grad(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, from_logits=True,
                            base=None, num_threads=None, grad_output=1.0, out=None):
    """``(loss, d(loss)/d(logits) * grad_output)`` from one fused pass.

    ``out=`` takes an array shaped like ``logits`` (of its dtype) for the
    gradient; ``out=logits`` overwrites the logits in place.
    """
    # The common call, as in cross_entropy: same bits as the general path.
    if type(grad_output) is float and _ce_fast_ok(axis, weight, ignore_index, reduction,
                                                   label_smoothing, from_logits, base, num_threads):
        res = _core.cross_entropy_fast(logits, labels, ignore_index, _fast_threads(num_threads),
                                       True, grad_output, out)
        if res is not None:
            return res
    return _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                          label_smoothing, from_logits, base, num_threads, True, grad_output, out)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

def _row_values(op, x, axis, num_threads, name="x"):
    inp = _Input(x, axis, name, keep16=True)
    nt = _threads(num_threads)
    row = np.empty(inp.n, np.float64)
    _core.run(op, inp.rows, None, None, None, 0.0, 0, 0.0, None, row, None, nt, xdtype=inp.code)
    return inp, row


def logsumexp(x, *, axis=-1, num_threads=None):
    """``log(sum(exp(x)))`` along ``axis``: an array of the batch shape."""
    if _fast_ok(axis, num_threads):
        res = _core.blocks_fast(_core.LOGSUMEXP, x, None, _fast_threads(num_threads))
        if res is not None:
            return res
    inp, row = _row_values(_core.LOGSUMEXP, x, axis, num_threads)
    return inp.batch_result(row)


def entropy(logits, *, axis=-1, from_logits=True, base=None, num_threads=None):
    """Entropy of ``softmax(logits)`` (or of the probabilities themselves with
    ``from_logits=False``) along ``axis``: an array of the batch shape."""
    if from_logits is True and base is None and _fast_ok(axis, num_threads):
        res = _core.blocks_fast(_core.ENTROPY, logits, None, _fast_threads(num_threads))
        if res is not None:
            return res
    scale = _log_base_scale(base)
    op = _core.ENTROPY if from_logits else _core.ENTROPY_PROBS
    inp, row = _row_values(op, logits, axis, num_threads, "logits")
    if scale != 1.0:
        row *= scale
    return inp.batch_result(row)


def _normalise(op, x, axis, out, num_threads):
    if _fast_ok(axis, num_threads):
        res = _core.blocks_fast(op, x, out, _fast_threads(num_threads))
        if res is not None:
            return res
    inp = _Input(x, axis, "x", keep16=True)
    nt = _threads(num_threads)
    rows_out = None
    if out is not None:
        rows_out = _check_out(out, inp, inp.out_dtype)
        _check_overlap(out, [("logits", inp.array)], inp.array)
    res = rows_out if rows_out is not None else np.empty((inp.n, inp.c), inp.rows.dtype)
    _core.run(op, inp.rows, None, None, None, 0.0, 0, 0.0, res, None, None, nt, xdtype=inp.code)
    if out is not None:
        if rows_out is None:
            _write_out(out, res, inp)
        return out
    return _fresh_like(res, inp, inp.out_dtype)


def log_softmax(x, *, axis=-1, out=None, num_threads=None):
    """``x - max - log(sum(exp(x - max)))`` along ``axis``, in x's dtype."""
    return _normalise(_core.LOG_SOFTMAX, x, axis, out, num_threads)


def softmax(x, *, axis=-1, out=None, num_threads=None):
    """``exp(x - logsumexp(x))`` along ``axis``, in x's dtype."""
    return _normalise(_core.SOFTMAX, x, axis, out, num_threads)


# --------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------

_KL_OPS = {"probs": "KL_PROBS", "log_probs": "KL_LOG_PROBS", "logits": "KL_LOGITS"}
_KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _check_temperature(temperature):
    T = _real(temperature, "temperature", "a positive number")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return T


def _kl_div(logits, target, axis, target_kind, reduction, temperature, base, num_threads,
            want_grad, grad_output, out):
    inp = _Input(logits, axis, "logits", keep16=True)
    reduction = _check_reduction(reduction, _KL_REDUCTIONS)
    if not isinstance(target_kind, str) or target_kind not in _KL_OPS:
        raise ValueError(f"target_kind must be one of 'probs', 'log_probs', 'logits'; got {target_kind!r}")
    T = _check_temperature(temperature)
    scale = _log_base_scale(base)
    nt = _threads(num_threads)
    tgt = np.asarray(target)
    if tgt.dtype.kind not in "f" and tgt.dtype not in _UPCAST_16:
        if tgt.dtype.kind in "iub":
            tgt = tgt.astype(inp.dtype)
        else:
            raise TypeError(f"target must have a real floating dtype, got {tgt.dtype}")
    target_rows = inp.same_layout(tgt, "target")
    op = getattr(_core, _KL_OPS[target_kind])
    mean = reduction in ("batchmean", "mean")
    factor = scale / inp.n if (mean and inp.n) else scale

    gscale = rows_out = grad_rows = None
    if want_grad:
        gscale, rows_out, grad_rows = _grad_buffers(
            grad_output, reduction, inp, factor, out, [("logits", inp.array), ("target", tgt)])

    row_loss = np.empty(inp.n, np.float64)
    _core.run(op, inp.rows, None, target_rows, None, 0.0, 0, 0.0, grad_rows, row_loss,
              gscale, nt, T, xdtype=inp.code)
    loss = _reduce(row_loss, reduction, inp, scale, inp.n if mean else None)
    if not want_grad:
        return loss
    return _with_grad(loss, out, rows_out, grad_rows, inp)


def kl_div(logits, target, *, axis=-1, target_kind="probs", reduction="batchmean",
           temperature=1.0, base=None, num_threads=None):
    """KL(P || Q) with ``Q = softmax(logits / T)`` along ``axis`` and P the target
    (``target_kind``: "probs", "log_probs", or "logits", softened by T too),
    times ``T**2``. "batchmean" and "mean" divide the sum by the number of rows;
    "none" gives one value per row. ``0 * log 0`` counts as 0."""
    return _kl_div(logits, target, axis, target_kind, reduction, temperature, base,
                   num_threads, False, None, None)


def kl_div_with_grad(logits, target, *, axis=-1, target_kind="probs", reduction="batchmean",
                     temperature=1.0, base=None, num_threads=None, grad_output=1.0, out=None):
    """``(loss, d(loss)/d(logits) * grad_output)`` of ``kl_div``."""
    return _kl_div(logits, target, axis, target_kind, reduction, temperature, base,
                   num_threads, True, grad_output, out)


# --------------------------------------------------------------------------
# Binary cross entropy
# --------------------------------------------------------------------------

class _Elementwise:
    """An elementwise input seen as (N, D) rows, D its last axis."""

    __slots__ = ("array", "rows", "n", "d", "dtype", "out_dtype", "shape", "code")

    def __init__(self, data, name):
        a = np.asarray(data)
        self.dtype, self.out_dtype = _compute_dtype(a.dtype, name)
        self.code = _storage_code(a.dtype)  # 16-bit rows stay 16-bit
        self.array = a
        self.shape = a.shape
        self.d = a.shape[-1] if a.ndim else 1
        self.n = a.size // self.d if self.d else 0
        store = self.dtype if self.code < 0 else np.dtype(a.dtype.newbyteorder("="))
        self.rows = self.as_rows(a, store)

    def as_rows(self, b, dtype=None):
        moved = b.reshape(1) if b.ndim == 0 else b
        return _as_rows(moved, self.n, self.d, dtype or self.dtype)

    def broadcast_rows(self, b, name):
        b = np.asarray(b)
        _compute_dtype(b.dtype, name)
        b64 = b.astype(np.float64).reshape(-1)
        bad = ~((b64 >= 0) & np.isfinite(b64))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite and non-negative; {name} holds {b64[i]!r} "
                             f"at flat index {i}")
        try:
            b = np.broadcast_to(b.astype(self.dtype, copy=False), self.shape)
        except ValueError:
            raise ValueError(f"{name} of shape {b.shape} does not broadcast to the input shape "
                             f"{self.shape}") from None
        return self.as_rows(b)


def _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits, base,
                          num_threads, want_grad, grad_output, out):
    inp = _Elementwise(logits, "logits")
    reduction = _check_reduction(reduction)
    scale = _log_base_scale(base)
    nt = _threads(num_threads)
    tgt = np.asarray(target)
    if tgt.shape != inp.shape:
        raise ValueError(f"target must have the shape of logits {inp.shape}, got {tgt.shape}")
    _compute_dtype(tgt.dtype, "target")
    t_rows = inp.as_rows(tgt)
    w_rows = None if weight is None else inp.broadcast_rows(weight, "weight")
    pw_rows = None if pos_weight is None else inp.broadcast_rows(pos_weight, "pos_weight")
    if not from_logits:
        for name, arr in (("logits", inp.rows), ("target", t_rows)):
            bad = (arr < 0) | (arr > 1)
            if bad.any():
                i = int(np.argmax(bad.reshape(-1)))
                raise ValueError(f"with from_logits=False, {name} must hold probabilities in "
                                 f"[0, 1]; found {arr.reshape(-1)[i]} at flat index {i}")
    op = _core.BCE_LOGITS if from_logits else _core.BCE_PROBS
    size = inp.n * inp.d
    factor = scale / size if (reduction == "mean" and size) else scale

    grad_rows = rows_out = gscale = gout = None
    if want_grad:
        g = _grad_output_array(grad_output)
        if g.ndim == 0:
            gscale = np.array([float(g) * factor])
        elif reduction != "none":
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
        elif g.shape != inp.shape:
            raise ValueError(f"grad_output must be a scalar or have the input shape {inp.shape}, got {g.shape}")
        else:
            gscale = np.array([factor])
            gout = inp.as_rows(g.astype(inp.dtype))
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise ValueError(f"out must be a writable NumPy array, got {type(out).__name__}")
            if out.shape != inp.shape:
                raise ValueError(f"out must have shape {inp.shape}, got {out.shape}")
            if out.dtype != inp.out_dtype:
                raise ValueError(f"out must have dtype {inp.out_dtype}, got {out.dtype}")
            if not out.flags.writeable:
                raise ValueError("out is read-only")
            _check_overlap(out, [("logits", inp.array), ("target", tgt), ("weight", weight),
                                 ("pos_weight", pos_weight)], inp.array)
            if out.dtype == inp.rows.dtype and out.dtype.isnative and out.flags.aligned and \
                    (inp.d <= 1 or out.strides[-1] == out.itemsize) and out.ndim:
                try:
                    rows_out = np.reshape(out, (inp.n, inp.d), copy=False)
                except (ValueError, TypeError):
                    rows_out = None
        grad_rows = rows_out if rows_out is not None else np.empty((inp.n, inp.d), inp.rows.dtype)

    loss_rows = np.empty((inp.n, inp.d), inp.dtype) if reduction == "none" else None
    row_loss = np.empty(inp.n, np.float64)
    _core.run_elementwise(op, inp.rows, t_rows, w_rows, pw_rows, loss_rows, grad_rows,
                          row_loss, gscale, gout, nt, xdtype=inp.code)

    if reduction == "none":
        if scale != 1.0:
            loss_rows *= inp.dtype.type(scale)
        loss = loss_rows.reshape(inp.shape)
        loss = loss[()] if loss.ndim == 0 else loss
    else:
        total = _core.sum_f64(row_loss)
        if reduction == "mean":
            total = total / size if size else np.float64(np.nan)
        loss = inp.dtype.type(total * scale)
    if not want_grad:
        return loss
    grad = grad_rows.reshape(inp.shape).astype(inp.out_dtype, copy=False)
    if out is not None:
        if rows_out is None:
            np.copyto(out, grad, casting="unsafe")
        return loss, out
    return loss, grad


def binary_cross_entropy(logits, target, *, weight=None, pos_weight=None, reduction="mean",
                         from_logits=True, base=None, num_threads=None):
    """Elementwise binary cross entropy: torch's ``binary_cross_entropy_with_logits``
    (or ``binary_cross_entropy`` on probabilities with ``from_logits=False``)."""
    return _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits,
                                 base, num_threads, False, None, None)


def binary_cross_entropy_with_grad(logits, target, *, weight=None, pos_weight=None,
                                   reduction="mean", from_logits=True, base=None,
                                   num_threads=None, grad_output=1.0, out=None):
    """``(loss, d(loss)/d(logits) * grad_output)`` of ``binary_cross_entropy``."""
    return _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits,
                                 base, num_threads, True, grad_output, out)
