"""The public functions (their contract: docs/API.md): validation, layout and
dtype handling around the C kernels.

Everything the C layer indexes by is decided and checked here:

* the class axis is moved last and the input viewed as ``(N, C)`` rows with
  contiguous, aligned, native-endian elements (copied only when no such
  view exists);
* labels are checked to lie in ``[0, C)`` or equal ``ignore_index`` and
  handed over as contiguous int64;
* weights, targets and ``out=`` are checked for shape, dtype and overlap.

Each call then crosses into the binding once (``_core.run``), which runs the
kernels and sums their per-row float64 values in a fixed order that does
not depend on the thread count. The common calls with default options on a
2-D C-contiguous float32/float64 array are parsed and checked whole by the
binding (``_core.cross_entropy_common``, ``_core.rows_common``), with the
same bits; anything else comes here.

dtypes: float32 and float64 are computed natively; float16 and bfloat16
(ml_dtypes) rows are read and written 16-bit by the kernels and computed in
float32; integer and bool inputs are computed in float64.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys

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
_MAX_THREADS = _core.MAX_THREADS


# --------------------------------------------------------------------------
# Threads (a call's count is resolved by _core.threads, in one place)
# --------------------------------------------------------------------------

def _check_threads(n, name="num_threads"):
    """num_threads as an int in [1, _MAX_THREADS]; None stays None (the default)."""
    if n is None:
        return None
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an integer or None, got {n!r}") from None
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"{name} must be between 1 and {_MAX_THREADS}, got {n}")
    return n


def set_num_threads(n):
    """Set the default thread count of every later call (``None``: follow OpenMP; docs/API.md).

    ``None`` restores the default, which reads ``omp_get_max_threads()`` at
    each call and so honours ``OMP_NUM_THREADS`` and ``threadpoolctl``. An
    explicit count takes precedence over both.
    """
    _core.set_default_threads(_check_threads(n, "n") or 0)


def get_num_threads():
    """The thread count a call with ``num_threads=None`` uses now."""
    return _core.threads(None)


# --------------------------------------------------------------------------
# dtypes and layout
# --------------------------------------------------------------------------

def _is_bfloat16(dt):
    """Whether dt is ml_dtypes' bfloat16, told without importing ml_dtypes
    (half a second of ``import fastxent``): an array of that dtype means the
    caller has imported it already."""
    if dt.kind != "V" or dt.name != "bfloat16":
        return False
    ml = sys.modules.get("ml_dtypes")
    return ml is not None and dt == np.dtype(ml.bfloat16)


def _compute_dtype(dt, name):
    """(compute dtype, result dtype for arrays shaped like the input)."""
    if dt.kind == "f":
        if dt.itemsize == 2:
            return np.dtype(np.float32), np.dtype(np.float16)
        if dt.itemsize == 4:
            return np.dtype(np.float32), np.dtype(np.float32)
        return np.dtype(np.float64), np.dtype(np.float64)
    if dt.kind in "iub":
        return np.dtype(np.float64), np.dtype(np.float64)
    if _is_bfloat16(dt):
        return np.dtype(np.float32), dt
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
    if _is_bfloat16(dt):
        return _CODE_BF16
    return -1


def _refuse_autograd(name, *arrays):
    """A torch tensor that requires grad cannot become a NumPy array: say
    where its autograd lives instead of torch's numpy() error."""
    for a in arrays:
        if type(a).__module__.startswith("torch") and getattr(a, "requires_grad", False) is True:
            raise TypeError(f"{name}() got a torch tensor that requires grad; use "
                            f"fastxent.torch.{name} for autograd, or pass tensor.detach() "
                            "for the value alone")


class _Input:
    """An input with a class axis, seen as ``(N, C)`` rows. float16 and
    bfloat16 rows stay 16-bit (``code`` says which): the kernels read them."""

    __slots__ = ("array", "moved", "rows", "batch_shape", "n", "c", "dtype", "out_dtype", "axis",
                 "code")

    def __init__(self, data, axis, name):
        a = np.asarray(data)
        if a.ndim == 0:
            raise ValueError(f"{name} must have at least one dimension (the class axis)")
        self.dtype, self.out_dtype = _compute_dtype(a.dtype, name)
        self.code = _storage_code(a.dtype)
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


def _out_rows(out, inp, inputs):
    """(rows_out, rows): the rows of out= the kernel may write directly (or
    None) and the rows it writes (rows_out, or a temporary)."""
    rows_out = None
    if out is not None:
        rows_out = _check_out(out, inp, inp.out_dtype)
        _check_overlap(out, inputs, inp.array)
    rows = rows_out if rows_out is not None else np.empty((inp.n, inp.c), inp.rows.dtype)
    return rows_out, rows


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


def _result_rows(out, rows_out, rows, inp):
    """The (N, C) rows a kernel wrote, as the caller's result: out= itself
    (copied into when the kernel wrote a temporary), else a new array."""
    if out is not None:
        if rows_out is None:
            _write_out(out, rows, inp)
        return out
    return _fresh_like(rows, inp, inp.out_dtype)


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
    bad = ((flat < 0) | (flat >= inp.c)) & (flat != ignore_index)
    if bad.any():
        i = int(np.argmax(bad))
        pos = np.unravel_index(i, inp.batch_shape) if inp.batch_shape else ()
        raise _core.label_error(flat[i], tuple(int(p) for p in pos), inp.c, ignore_index)
    return np.require(flat, np.int64, _CA)


def _check_probabilities(a, name):
    """With from_logits=False, every entry of a must lie in [0, 1] (NaN passes)."""
    bad = (a < 0) | (a > 1)
    if bad.any():
        i = int(np.argmax(bad.reshape(-1)))
        pos = tuple(int(p) for p in np.unravel_index(i, a.shape))
        raise ValueError(f"with from_logits=False, {name} must hold probabilities in [0, 1]; "
                         f"found {a.reshape(-1)[i]} at position {pos}")


def _check_ignore_index(ignore_index):
    try:
        ii = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None
    if not -(2**63) <= ii < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ii}")
    return ii


def _grad_output(grad_output, reduction, shape, what):
    """grad_output as a float, or (reduction "none") a float64 array of
    ``shape``; TypeError naming it for anything not real."""
    if isinstance(grad_output, float):
        return float(grad_output)
    try:
        g = np.asarray(grad_output)
    except Exception as exc:  # ragged sequences and the like
        raise TypeError(f"grad_output must be a real number or array, got {grad_output!r}") from exc
    if g.dtype.kind not in "biuf" and not _is_bfloat16(g.dtype):
        raise TypeError(f"grad_output must be a real number or array, got dtype {g.dtype} "
                        f"({'complex' if g.dtype.kind == 'c' else 'not numeric'})")
    if g.ndim == 0:
        return float(grad_output)
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
    if g.shape != shape:
        raise ValueError(f"grad_output must be a scalar or have the {what} {shape}, got {g.shape}")
    return g.astype(np.float64, copy=False)


def _per_row(g):
    """A grad_output of _grad_output as run takes it: a float, or one per row."""
    return g if isinstance(g, float) else np.ascontiguousarray(g.reshape(-1))


def _row_loss(res, reduction, inp, scale):
    """run's result as the loss: the reduced scalar as it is; for reduction
    "none", the row values times scale, of the batch shape."""
    if reduction != "none":
        return res
    if scale != 1.0:
        res *= scale
    return inp.batch_result(res)


# --------------------------------------------------------------------------
# Cross entropy
# --------------------------------------------------------------------------

def _cross_entropy(logits, labels, axis, weight, ignore_index, reduction, label_smoothing,
                   from_logits, base, num_threads, want_grad, grad_output, out):
    _refuse_autograd("cross_entropy_with_grad" if want_grad else "cross_entropy",
                     logits, labels, weight)
    lab = np.asarray(labels)
    inp = _Input(logits, axis, "logits")
    reduction = _check_reduction(reduction)
    eps = _check_smoothing(label_smoothing)
    scale = _log_base_scale(base)
    ignore_index = _check_ignore_index(ignore_index)
    nt = _check_threads(num_threads)
    w, w_sum = _check_weight(weight, inp)

    denom = 0.0
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
    elif lab.dtype.kind == "f" or _is_bfloat16(lab.dtype):
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
        _check_probabilities(inp.array, "logits")
        op = _core.CE_PROBS_SOFT if soft else _core.CE_PROBS_HARD

    g = rows_out = grad_rows = None
    if want_grad:
        g = _per_row(_grad_output(grad_output, reduction, inp.batch_shape, "batch shape"))
        rows_out, grad_rows = _out_rows(out, inp, [("logits", inp.array), ("labels", lab),
                                                   ("weight", weight)])
    # A mean over no counted label (or counted weights summing to 0) is NaN.
    res = _core.run(op, inp.rows, num_threads=nt, xdtype=inp.code, labels=labels64,
                    ignore_index=ignore_index, target=target, weight=w, w_sum=w_sum,
                    smoothing=eps, out=grad_rows, grad_output=g, reduction=reduction,
                    denom=denom, scale=scale)
    loss = _row_loss(res, reduction, inp, scale)
    if not want_grad:
        return loss
    return loss, _result_rows(out, rows_out, grad_rows, inp)


def _lm_options(z_loss, softcap, sample_weight, n_valid, return_stats):
    """Whether a call uses a language-model option (_options.py takes it)."""
    return not (type(z_loss) in (int, float) and z_loss == 0 and softcap is None
                and sample_weight is None and n_valid is None and return_stats is False)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, from_logits=True,
                  base=None, num_threads=None, z_loss=0.0, softcap=None,
                  sample_weight=None, n_valid=None, return_stats=False):
    """Cross entropy between ``softmax(logits)`` along ``axis`` and ``labels``.

    ``labels`` are integer class indices (the logits' shape without ``axis``)
    or floating class probabilities (the logits' shape). Semantics follow
    ``torch.nn.functional.cross_entropy`` (pass ``axis=1`` for its layout).
    The full contract: docs/API.md; the language-model options (z_loss,
    softcap, sample_weight, n_valid, return_stats): docs/lm-head.md.
    """
    if _lm_options(z_loss, softcap, sample_weight, n_valid, return_stats):
        from ._options import cross_entropy_options

        return cross_entropy_options(logits, labels, axis, weight, ignore_index, reduction,
                                     label_smoothing, from_logits, base, num_threads, z_loss,
                                     softcap, sample_weight, n_valid, return_stats, False, 1.0,
                                     None)
    # The common call is parsed and run whole by _core (same bits as below).
    loss = _core.cross_entropy_common(logits, labels, axis, weight, ignore_index, reduction,
                                      label_smoothing, from_logits, base, num_threads)
    if loss is None:
        loss = _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                              label_smoothing, from_logits, base, num_threads, False, None, None)
    return loss


def cross_entropy_with_grad(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, from_logits=True,
                            base=None, num_threads=None, grad_output=1.0, out=None,
                            z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                            return_stats=False):
    """``(loss, d(loss)/d(logits) * grad_output)`` from one fused pass.

    ``out=`` takes an array shaped like ``logits`` (of its dtype) for the
    gradient; ``out=logits`` overwrites the logits in place. See docs/API.md;
    with ``return_stats=True`` the result is ``(loss, grad, stats)``.
    """
    if _lm_options(z_loss, softcap, sample_weight, n_valid, return_stats):
        from ._options import cross_entropy_options

        return cross_entropy_options(logits, labels, axis, weight, ignore_index, reduction,
                                     label_smoothing, from_logits, base, num_threads, z_loss,
                                     softcap, sample_weight, n_valid, return_stats, True,
                                     grad_output, out)
    res = _core.cross_entropy_common(logits, labels, axis, weight, ignore_index, reduction,
                                     label_smoothing, from_logits, base, num_threads, True,
                                     grad_output, out)
    if res is None:
        res = _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                             label_smoothing, from_logits, base, num_threads, True,
                             grad_output, out)
    return res


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

def _row_values(name, op, x, axis, num_threads, arg="x"):
    _refuse_autograd(name, x)
    inp = _Input(x, axis, arg)
    return inp, _core.run(op, inp.rows, num_threads=_check_threads(num_threads), xdtype=inp.code)


def logsumexp(x, *, axis=-1, num_threads=None):
    """``log(sum(exp(x)))`` along ``axis``: an array of the batch shape. See docs/API.md."""
    res = _core.rows_common(_core.LOGSUMEXP, x, axis, num_threads)
    if res is None:
        inp, row = _row_values("logsumexp", _core.LOGSUMEXP, x, axis, num_threads)
        res = inp.batch_result(row)
    return res


def entropy(logits, *, axis=-1, from_logits=True, base=None, num_threads=None):
    """Entropy of ``softmax(logits)`` (or of the probabilities themselves with
    ``from_logits=False``) along ``axis``: an array of the batch shape. See docs/API.md."""
    res = _core.rows_common(_core.ENTROPY, logits, axis, num_threads, None, from_logits, base)
    if res is None:
        scale = _log_base_scale(base)
        op = _core.ENTROPY if from_logits else _core.ENTROPY_PROBS
        inp, row = _row_values("entropy", op, logits, axis, num_threads, "logits")
        res = _row_loss(row, "none", inp, scale)
    return res


def _normalise(name, op, x, axis, out, num_threads):
    res = _core.rows_common(op, x, axis, num_threads, out)
    if res is None:
        _refuse_autograd(name, x)
        inp = _Input(x, axis, "x")
        nt = _check_threads(num_threads)
        rows_out, rows = _out_rows(out, inp, [("logits", inp.array)])
        _core.run(op, inp.rows, num_threads=nt, xdtype=inp.code, out=rows)
        res = _result_rows(out, rows_out, rows, inp)
    return res


def log_softmax(x, *, axis=-1, out=None, num_threads=None):
    """``x - max - log(sum(exp(x - max)))`` along ``axis``, in x's dtype. See docs/API.md."""
    return _normalise("log_softmax", _core.LOG_SOFTMAX, x, axis, out, num_threads)


def softmax(x, *, axis=-1, out=None, num_threads=None):
    """``exp(x - logsumexp(x))`` along ``axis``, in x's dtype. See docs/API.md."""
    return _normalise("softmax", _core.SOFTMAX, x, axis, out, num_threads)


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
    _refuse_autograd("kl_div_with_grad" if want_grad else "kl_div", logits, target)
    inp = _Input(logits, axis, "logits")
    reduction = _check_reduction(reduction, _KL_REDUCTIONS)
    if not isinstance(target_kind, str) or target_kind not in _KL_OPS:
        raise ValueError(f"target_kind must be one of 'probs', 'log_probs', 'logits'; got {target_kind!r}")
    T = _check_temperature(temperature)
    scale = _log_base_scale(base)
    nt = _check_threads(num_threads)
    tgt = np.asarray(target)
    if tgt.dtype.kind not in "f" and not _is_bfloat16(tgt.dtype):
        if tgt.dtype.kind in "iub":
            tgt = tgt.astype(inp.dtype)
        else:
            raise TypeError(f"target must have a real floating dtype, got {tgt.dtype}")
    target_rows = inp.same_layout(tgt, "target")
    op = getattr(_core, _KL_OPS[target_kind])

    g = rows_out = grad_rows = None
    if want_grad:
        g = _per_row(_grad_output(grad_output, reduction, inp.batch_shape, "batch shape"))
        rows_out, grad_rows = _out_rows(out, inp, [("logits", inp.array), ("target", tgt)])
    # "batchmean" and "mean" both divide by the number of rows.
    red = "mean" if reduction == "batchmean" else reduction
    res = _core.run(op, inp.rows, num_threads=nt, xdtype=inp.code, target=target_rows,
                    temperature=T, out=grad_rows, grad_output=g, reduction=red,
                    denom=float(inp.n), scale=scale)
    loss = _row_loss(res, red, inp, scale)
    if not want_grad:
        return loss
    return loss, _result_rows(out, rows_out, grad_rows, inp)


def kl_div(logits, target, *, axis=-1, target_kind="probs", reduction="batchmean",
           temperature=1.0, base=None, num_threads=None):
    """KL(P || Q) with ``Q = softmax(logits / T)`` along ``axis`` and P the target
    (``target_kind``: "probs", "log_probs", or "logits", softened by T too),
    times ``T**2``. "batchmean" and "mean" divide the sum by the number of rows;
    "none" gives one value per row. ``0 * log 0`` counts as 0. See docs/API.md."""
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
    """An elementwise input seen as (N, C) rows, C its last axis (an input
    of the shape helpers of _Input: out=, results)."""

    __slots__ = ("array", "moved", "rows", "n", "c", "axis", "dtype", "out_dtype", "shape", "code")

    def __init__(self, data, name):
        a = np.asarray(data)
        self.dtype, self.out_dtype = _compute_dtype(a.dtype, name)
        self.code = _storage_code(a.dtype)  # 16-bit rows stay 16-bit
        self.array = self.moved = a
        self.axis = a.ndim - 1
        self.shape = a.shape
        self.c = a.shape[-1] if a.ndim else 1
        self.n = a.size // self.c if self.c else 0
        store = self.dtype if self.code < 0 else np.dtype(a.dtype.newbyteorder("="))
        self.rows = self.as_rows(a, store)

    def as_rows(self, b, dtype=None):
        moved = b.reshape(1) if b.ndim == 0 else b
        return _as_rows(moved, self.n, self.c, dtype or self.dtype)

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
    _refuse_autograd("binary_cross_entropy_with_grad" if want_grad else "binary_cross_entropy",
                     logits, target, weight, pos_weight)
    inp = _Elementwise(logits, "logits")
    reduction = _check_reduction(reduction)
    scale = _log_base_scale(base)
    nt = _check_threads(num_threads)
    tgt = np.asarray(target)
    if tgt.shape != inp.shape:
        raise ValueError(f"target must have the shape of logits {inp.shape}, got {tgt.shape}")
    _compute_dtype(tgt.dtype, "target")
    t_rows = inp.as_rows(tgt)
    w_rows = None if weight is None else inp.broadcast_rows(weight, "weight")
    pw_rows = None if pos_weight is None else inp.broadcast_rows(pos_weight, "pos_weight")
    if not from_logits:
        _check_probabilities(inp.array, "logits")
        _check_probabilities(tgt, "target")
    op = _core.BCE_LOGITS if from_logits else _core.BCE_PROBS

    g = gout = rows_out = grad_rows = None
    if want_grad:
        g = _grad_output(grad_output, reduction, inp.shape, "input shape")
        if not isinstance(g, float):
            # Elementwise: grad_output scales each element (as gout), not each row.
            g, gout = 1.0, inp.as_rows(g.astype(inp.dtype))
        rows_out, grad_rows = _out_rows(out, inp, [("logits", inp.array), ("target", tgt),
                                                   ("weight", weight), ("pos_weight", pos_weight)])
    loss_rows = np.empty((inp.n, inp.c), inp.dtype) if reduction == "none" else None
    loss = _core.run(op, inp.rows, num_threads=nt, xdtype=inp.code, target=t_rows,
                     weight=w_rows, pos_weight=pw_rows, loss_out=loss_rows, out=grad_rows,
                     grad_output=g, gout=gout, reduction=reduction,
                     denom=float(inp.n * inp.c), scale=scale)
    if reduction == "none":
        if scale != 1.0:
            loss_rows *= inp.dtype.type(scale)
        loss = loss_rows.reshape(inp.shape)
        loss = loss[()] if loss.ndim == 0 else loss
    if not want_grad:
        return loss
    return loss, _result_rows(out, rows_out, grad_rows, inp)


def binary_cross_entropy(logits, target, *, weight=None, pos_weight=None, reduction="mean",
                         from_logits=True, base=None, num_threads=None):
    """Elementwise binary cross entropy: torch's ``binary_cross_entropy_with_logits``
    (or ``binary_cross_entropy`` on probabilities with ``from_logits=False``).
    See docs/API.md."""
    return _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits,
                                 base, num_threads, False, None, None)


def binary_cross_entropy_with_grad(logits, target, *, weight=None, pos_weight=None,
                                   reduction="mean", from_logits=True, base=None,
                                   num_threads=None, grad_output=1.0, out=None):
    """``(loss, d(loss)/d(logits) * grad_output)`` of ``binary_cross_entropy``."""
    return _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits,
                                 base, num_threads, True, grad_output, out)
