"""Plain NumPy twins of every fastxent function: the oracle of the tests.

Each function here has the signature of its fast counterpart (see docs/API.md) and
computes the same thing in the most direct way NumPy allows, so that a reader
can see exactly what the library computes.  The tests compare the C kernels
against these functions and the benchmarks use them as the baseline.

How this module computes:

- Everything is float64.  Inputs are converted with
  ``np.asarray(a, dtype=np.float64)`` (float16, float32 and bfloat16 are
  upcast exactly).  Reductions return ``np.float64`` scalars, per-position
  results float64 arrays of the batch shape, gradients float64 arrays of the
  logits' shape.  (The fast library returns float32 for 16- and 32-bit inputs;
  the tests cast.)
- The class axis (``axis``, default -1) is moved last; every other axis is
  batch.  Integer labels have the logits' shape with ``axis`` removed.
- Stability comes from the max shift: ``log_softmax(x) = x - max - log(sum(
  exp(x - max)))``, in that order (as PyTorch does).  A row whose max is not
  finite (+inf, or every entry -inf) has a NaN log_softmax and softmax, as in
  PyTorch; its logsumexp is +inf or -inf.  NaN anywhere in a row gives NaN
  for that row only.
- ``0 * log 0 = 0``: a term whose coefficient (target probability, times the
  class weight where there is one) is 0 contributes nothing to a loss or to
  its gradient, even when its log-probability is -inf.
- ``num_threads`` is accepted and ignored.  ``out=`` receives the result with
  a cast and is returned.
- ``base`` divides losses, entropies and gradients by ``ln(base)``.

Where PyTorch (2.13) has the same function, the semantics are PyTorch's;
the comments say where they differ and why.
"""

import math
import operator

import numpy as np

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_grad",
    "cross_entropy",
    "cross_entropy_with_grad",
    "entropy",
    "kl_div",
    "kl_div_with_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
]

_REDUCTIONS = ("mean", "sum", "none")
_KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_TARGET_KINDS = ("probs", "log_probs", "logits")

# PyTorch's binary_cross_entropy backward divides by max(p * (1 - p), EPSILON)
# with EPSILON = 1e-12 stored as a float32 constant; we use the same value so
# that gradients at p == 0 or p == 1 agree with torch autograd.
_TORCH_BCE_EPSILON = float(np.float32(1e-12))


# --------------------------------------------------------------------------
# Checks and conversions
# --------------------------------------------------------------------------

def _is_bfloat16_like(dtype):
    # ml_dtypes' bfloat16 (and its float8 relatives) are not NumPy "f" kinds.
    return dtype.name.startswith(("bfloat16", "float8"))


def _as_float64(a, name):
    """``a`` as a float64 array; TypeError for a non-numeric or complex dtype."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise TypeError(f"{name} has complex dtype {a.dtype}; expected a real dtype")
    if a.dtype.kind not in "biuf" and not _is_bfloat16_like(a.dtype):
        raise TypeError(f"{name} has non-numeric dtype {a.dtype}")
    return np.asarray(a, dtype=np.float64)


def _class_axis(ndim, axis):
    """``axis`` normalised to [0, ndim)."""
    if ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    axis = operator.index(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return axis % ndim


def _check_classes(num_classes):
    if num_classes == 0:
        raise ValueError("the class axis has length 0 (C == 0)")


def _check_reduction(reduction, allowed):
    if reduction not in allowed:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {allowed}")


def _log_base(base):
    """ln(base), the divisor of every loss and gradient; 1 for base=None (nats)."""
    if base is None:
        return 1.0
    base = float(base)
    if not (base > 0 and base != 1 and math.isfinite(base)):
        raise ValueError(f"base must be a positive number other than 1, got {base}")
    return math.log(base)


def _check_out(out, shape):
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}, expected {tuple(shape)}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def _into(out, result):
    """``result``, or ``out`` holding it (with a cast) when ``out`` is given."""
    if out is None:
        return result
    _check_out(out, result.shape)
    np.copyto(out, result, casting="unsafe")
    return out


def _check_unit_interval(p, name):
    """ValueError naming the first entry of p outside [0, 1] and its position."""
    bad = (p < 0) | (p > 1)
    if np.any(bad):
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"with from_logits=False, {name} must hold probabilities in [0, 1]; "
                         f"found {p[position]} at position {position}")


def _reduce(per_position, reduction, denominator):
    """Reduce per-position values; "mean" divides by ``denominator``."""
    if reduction == "none":
        return np.asarray(per_position, dtype=np.float64)
    total = np.sum(per_position)
    if reduction == "sum":
        return np.float64(total)
    if denominator == 0:
        # A mean over nothing: nothing was counted (empty batch, every label
        # ignored, or every counted weight 0).
        return np.float64(np.nan)
    return np.float64(total / denominator)


def _gradient_scale(reduction, grad_output, batch_shape, denominator):
    """d(reduced loss)/d(per-position loss) times grad_output, batch-shaped."""
    g = np.asarray(grad_output, dtype=np.float64)
    if reduction == "none":
        try:
            return np.broadcast_to(g, batch_shape)
        except ValueError:
            raise ValueError(
                f"grad_output of shape {g.shape} does not broadcast to the "
                f"per-position loss shape {tuple(batch_shape)}"
            ) from None
    if g.ndim != 0:
        raise ValueError(
            f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}"
        )
    if reduction == "sum":
        factor = g
    elif denominator == 0:
        factor = 0.0  # the mean is NaN; by convention its gradient is 0
    else:
        factor = g / denominator
    return np.full(batch_shape, factor)


# --------------------------------------------------------------------------
# Row operations on the last axis
# --------------------------------------------------------------------------

def _log_softmax_last(x):
    # The order x - max - log(sum) keeps the exact x - max and adds the
    # rounding of the log term once (PyTorch's order).  A row whose max is
    # +inf or -inf gives inf - inf = NaN, as in PyTorch.
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _softmax_last(x):
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _logsumexp_last(x):
    m = np.max(x, axis=-1)  # NaN when the row holds a NaN
    shifted = m + np.log(np.sum(np.exp(x - m[..., None]), axis=-1))
    # A row whose max is not finite: +inf for a row holding +inf, -inf for a
    # row of -inf only, NaN for a row holding NaN.
    return np.where(np.isfinite(m), shifted, m)


def _sigmoid(x):
    # Two forms so that neither exp overflows where it is used.
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-x)), np.exp(x) / (1.0 + np.exp(x)))


# --------------------------------------------------------------------------
# Cross entropy
# --------------------------------------------------------------------------

def _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                   label_smoothing, from_logits, base, grad_output, want_grad):
    x = _as_float64(logits, "logits")
    axis = _class_axis(x.ndim, axis)
    _check_reduction(reduction, _REDUCTIONS)
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    log_base = _log_base(base)

    x = np.moveaxis(x, axis, -1)  # (..., C)
    num_classes = x.shape[-1]
    _check_classes(num_classes)
    batch_shape = x.shape[:-1]

    if weight is None:
        w = np.ones(num_classes)
    else:
        w = _as_float64(weight, "weight")
        if w.shape != (num_classes,):
            raise ValueError(f"weight has shape {w.shape}, expected ({num_classes},)")

    # Every form of the loss is  loss_i = sum_c coef_ic * (-log q_ic)  with
    # q the predicted probabilities; only coef depends on the kind of labels.
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        # Class indices, as torch.nn.functional.cross_entropy with
        #   loss_i = (1 - eps) * w[y_i] * (-logq[y_i]) + eps/C * sum_c w[c] * (-logq[c])
        # and 0 at ignored positions.
        if labels.shape != batch_shape:
            raise ValueError(
                f"integer labels have shape {labels.shape}, expected {batch_shape} "
                f"(the logits' shape {np.moveaxis(x, -1, axis).shape} without axis {axis})"
            )
        counted = labels != ignore_index
        out_of_range = counted & ((labels < 0) | (labels >= num_classes))
        if np.any(out_of_range):
            position = tuple(int(i) for i in np.argwhere(out_of_range)[0])
            raise ValueError(
                f"label {labels[position]} at position {position} is out of range "
                f"[0, {num_classes})"
            )
        y = np.where(counted, labels, 0).astype(np.intp)
        one_hot = np.arange(num_classes) == y[..., None]
        target = (1.0 - eps) * one_hot + eps / num_classes
        coef = w * target * counted[..., None]
        # torch 2.13 divides the whole loss, smoothing term included, by the
        # sum of w[y_i] over the non-ignored positions (their number when
        # there is no weight).  Older torch divided the smoothing term of an
        # unweighted loss by the number of all positions, ignored included;
        # torch 2.13 does not.
        denominator = np.sum(w[y] * counted)
    elif labels.dtype.kind == "f" or _is_bfloat16_like(labels.dtype):
        # Class probabilities (soft labels), used as given, as torch does:
        #   loss_i = -sum_c w[c] * t'_ic * logq_ic,   t' = (1 - eps) * t + eps/C
        # and "mean" divides by the number of positions, whatever the weights.
        t = _as_float64(labels, "labels")
        if t.shape != np.moveaxis(x, -1, axis).shape:
            raise ValueError(
                f"soft labels have shape {t.shape}, expected the logits' shape "
                f"{np.moveaxis(x, -1, axis).shape}"
            )
        t = np.moveaxis(t, axis, -1)
        coef = w * ((1.0 - eps) * t + eps / num_classes)
        denominator = math.prod(batch_shape)
    else:
        raise TypeError(
            f"labels must be integer class indices or floating probabilities, "
            f"got dtype {labels.dtype}"
        )

    if not from_logits:
        # Probabilities outside [0, 1] are an error (NaN passes through), as
        # for binary_cross_entropy: the loss reads only some entries of a
        # row, so a bad entry elsewhere would go unnoticed.
        _check_unit_interval(np.moveaxis(x, -1, axis), "logits")

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if from_logits:
            log_q = _log_softmax_last(x)
        else:
            log_q = np.log(x)  # probabilities as given: no renormalisation, no clipping
        # Terms with coef == 0 and log q == -inf are 0 (0 * log 0 = 0),
        # unlike torch's soft-label path, where 0 * (-inf) gives NaN. A NaN
        # log q (a row holding NaN, or whose max is not finite, so that its
        # softmax is undefined) still poisons the row, whatever its weight,
        # as in torch; ignored positions are 0.
        terms = np.where((coef != 0) | np.isnan(log_q), coef * -log_q, 0.0)
        per_position = np.sum(terms, axis=-1)
        if labels.dtype.kind in "iu":
            per_position = np.where(counted, per_position, 0.0)
        loss = _reduce(per_position / log_base, reduction, denominator)
        if not want_grad:
            return loss, None

        if from_logits:
            # d/dz_j sum_c coef_c * (-log softmax(z)_c) = softmax(z)_j * sum_c coef_c - coef_j
            q = np.exp(log_q)
            grad = q * np.sum(coef, axis=-1, keepdims=True) - coef
        else:
            # d/dp_j sum_c coef_c * (-log p_c) = -coef_j / p_j
            grad = np.where((coef != 0) | np.isnan(x), -coef / x, 0.0)
        if labels.dtype.kind in "iu":
            # An ignored position has a zero gradient, even when its logits
            # hold NaN.
            grad = np.where(counted[..., None], grad, 0.0)
        scale = _gradient_scale(reduction, grad_output, batch_shape, denominator)
        grad = grad * scale[..., None] / log_base
    return loss, np.moveaxis(grad, -1, axis)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, from_logits=True,
                  base=None, num_threads=None):
    """Cross entropy of ``labels`` under ``softmax(logits)`` along ``axis``.

    Semantics of ``torch.nn.functional.cross_entropy`` (integer class
    indices or probability targets; weight, ignore_index, label_smoothing,
    reduction).  With ``from_logits=False``, ``logits`` holds probabilities,
    each in [0, 1] (else ValueError; NaN passes through): the loss is
    ``-sum(w * t * log(p))`` with no renormalisation or clipping.
    """
    loss, _ = _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                             label_smoothing, from_logits, base, 1.0, want_grad=False)
    return loss


def cross_entropy_with_grad(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, from_logits=True,
                            base=None, num_threads=None, grad_output=1.0, out=None):
    """``(loss, grad)``: ``cross_entropy`` and its gradient w.r.t. ``logits``
    times ``grad_output`` (a scalar, or batch-shaped for reduction="none")."""
    loss, grad = _cross_entropy(logits, labels, axis, weight, ignore_index, reduction,
                                label_smoothing, from_logits, base, grad_output,
                                want_grad=True)
    return loss, _into(out, grad)


# --------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------

def _kl_div(logits, target, axis, target_kind, reduction, temperature, base,
            grad_output, want_grad):
    z = _as_float64(logits, "logits")
    axis = _class_axis(z.ndim, axis)
    _check_reduction(reduction, _KL_REDUCTIONS)
    if target_kind not in _TARGET_KINDS:
        raise ValueError(f"unknown target_kind {target_kind!r}; expected one of {_TARGET_KINDS}")
    T = float(temperature)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    log_base = _log_base(base)
    target = _as_float64(target, "target")
    if target.shape != z.shape:
        raise ValueError(f"target has shape {target.shape}, expected the logits' shape {z.shape}")

    z = np.moveaxis(z, axis, -1)
    target = np.moveaxis(target, axis, -1)
    _check_classes(z.shape[-1])
    batch_shape = z.shape[:-1]
    rows = math.prod(batch_shape)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_q = _log_softmax_last(z / T)
        if target_kind == "probs":
            p, log_p = target, np.log(target)
        elif target_kind == "log_probs":
            p, log_p = np.exp(target), target
        else:  # "logits": the target is softened by the same temperature
            log_p = _log_softmax_last(target / T)
            p = np.exp(log_p)
        # KL(P || Q) = sum_c P_c (log P_c - log Q_c), with 0 * log 0 = 0 and
        # +inf where P_c > 0 = Q_c; times T**2 as in knowledge distillation.
        terms = np.where(p != 0, p * (log_p - log_q), 0.0)
        per_row = T**2 * np.sum(terms, axis=-1)
        # "batchmean" and "mean" both divide by the number of rows (torch's
        # "mean" divides by the number of elements, and its "none" is
        # elementwise: here "none" is one value per row).
        name = "none" if reduction == "none" else ("sum" if reduction == "sum" else "mean")
        loss = _reduce(per_row / log_base, name, rows)
        if not want_grad:
            return loss, None

        # d/dz_j T**2 * sum_c P_c (log P_c - log softmax(z/T)_c)
        #   = T * (Q_j * sum_c P_c - P_j),   Q = softmax(z/T);
        # sum_c P_c is 1 for a normalised target.
        q = np.exp(log_q)
        grad = T * (q * np.sum(p, axis=-1, keepdims=True) - p)
        scale = _gradient_scale(name, grad_output, batch_shape, rows)
        grad = grad * scale[..., None] / log_base
    return loss, np.moveaxis(grad, -1, axis)


def kl_div(logits, target, *, axis=-1, target_kind="probs", reduction="batchmean",
           temperature=1.0, base=None, num_threads=None):
    """KL(P || Q) with ``Q = softmax(logits / T)`` and ``P`` from ``target``
    (``"probs"``, ``"log_probs"``, or ``"logits"``: ``P = softmax(target / T)``),
    times ``T**2``.  "batchmean" and "mean" divide by the number of rows,
    "none" gives one value per row."""
    loss, _ = _kl_div(logits, target, axis, target_kind, reduction, temperature,
                      base, 1.0, want_grad=False)
    return loss


def kl_div_with_grad(logits, target, *, axis=-1, target_kind="probs",
                     reduction="batchmean", temperature=1.0, base=None,
                     num_threads=None, grad_output=1.0, out=None):
    """``(loss, grad)``: ``kl_div`` and its gradient w.r.t. ``logits``."""
    loss, grad = _kl_div(logits, target, axis, target_kind, reduction, temperature,
                         base, grad_output, want_grad=True)
    return loss, _into(out, grad)


# --------------------------------------------------------------------------
# Binary cross entropy
# --------------------------------------------------------------------------

def _broadcast_parameter(a, name, shape):
    a = _as_float64(a, name)
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to {shape}") from None


def _binary_cross_entropy(logits, target, weight, pos_weight, reduction, from_logits,
                          base, grad_output, want_grad):
    x = _as_float64(logits, "logits")
    t = _as_float64(target, "target")
    if t.shape != x.shape:
        raise ValueError(f"target has shape {t.shape}, expected the logits' shape {x.shape}")
    _check_reduction(reduction, _REDUCTIONS)
    log_base = _log_base(base)
    w = 1.0 if weight is None else _broadcast_parameter(weight, "weight", x.shape)
    # pos_weight broadcasts against the input like any NumPy operand, so a
    # (C,) pos_weight applies along the last axis.
    pw = 1.0 if pos_weight is None else _broadcast_parameter(pos_weight, "pos_weight", x.shape)
    log_weight = 1.0 + (pw - 1.0) * t  # torch's name: the factor of -log sigmoid(x)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if from_logits:
            # torch.nn.functional.binary_cross_entropy_with_logits:
            #   loss = (1 - t) * x - log_weight * log_sigmoid(x)
            # with -log_sigmoid(x) = log1p(exp(-|x|)) + max(-x, 0), which
            # never overflows.
            loss = (1.0 - t) * x + log_weight * (np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0.0))
            # d/dx = log_weight * sigmoid(x) - pos_weight * t
            grad = log_weight * _sigmoid(x) - pw * t
        else:
            # torch.nn.functional.binary_cross_entropy on probabilities, each
            # log clamped at -100 so that p in {0, 1} gives a finite loss:
            #   loss = -(pos_weight * t * log(p) + (1 - t) * log(1 - p)).
            # torch has no pos_weight here; ours is the one that makes this
            # loss on sigmoid(x) the from_logits=True loss on x (up to the
            # clamps).  torch raises for p or t outside [0, 1]; so do we, but
            # NaN passes through (a NaN element gives NaN).
            _check_unit_interval(x, "logits")
            _check_unit_interval(t, "target")
            log_p = np.maximum(np.log(x), -100.0)
            log_1mp = np.maximum(np.log1p(-x), -100.0)
            loss = -(pw * t * log_p + (1.0 - t) * log_1mp)
            # d/dp = (log_weight * p - pos_weight * t) / (p * (1 - p)), with
            # torch's floor on the denominator (its backward formula, not the
            # derivative of the clamped logs).
            grad = (log_weight * x - pw * t) / np.maximum(x * (1.0 - x), _TORCH_BCE_EPSILON)
        loss = w * loss / log_base
        reduced = _reduce(loss, reduction, loss.size)
        if not want_grad:
            return reduced, None
        grad = w * grad * _gradient_scale(reduction, grad_output, x.shape, x.size) / log_base
    return reduced, np.asarray(grad, dtype=np.float64)


def binary_cross_entropy(logits, target, *, weight=None, pos_weight=None,
                         reduction="mean", from_logits=True, base=None,
                         num_threads=None):
    """Elementwise binary cross entropy, as
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (or, with
    ``from_logits=False``, ``binary_cross_entropy`` on probabilities)."""
    loss, _ = _binary_cross_entropy(logits, target, weight, pos_weight, reduction,
                                    from_logits, base, 1.0, want_grad=False)
    return loss


def binary_cross_entropy_with_grad(logits, target, *, weight=None, pos_weight=None,
                                   reduction="mean", from_logits=True, base=None,
                                   num_threads=None, grad_output=1.0, out=None):
    """``(loss, grad)``: ``binary_cross_entropy`` and its gradient w.r.t. ``logits``."""
    loss, grad = _binary_cross_entropy(logits, target, weight, pos_weight, reduction,
                                       from_logits, base, grad_output, want_grad=True)
    return loss, _into(out, grad)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

def _classes_last(x, axis):
    x = _as_float64(x, "x")
    axis = _class_axis(x.ndim, axis)
    x = np.moveaxis(x, axis, -1)
    _check_classes(x.shape[-1])
    return x, axis


def logsumexp(x, *, axis=-1, num_threads=None):
    """``log(sum(exp(x)))`` along ``axis``, shifted by the row max; batch shape."""
    x, axis = _classes_last(x, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(_logsumexp_last(x), dtype=np.float64)


def log_softmax(x, *, axis=-1, out=None, num_threads=None):
    """``x - max - log(sum(exp(x - max)))`` along ``axis``; the input's shape."""
    x, axis = _classes_last(x, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.moveaxis(_log_softmax_last(x), -1, axis)
    return _into(out, result)


def softmax(x, *, axis=-1, out=None, num_threads=None):
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``; the input's shape."""
    x, axis = _classes_last(x, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.moveaxis(_softmax_last(x), -1, axis)
    return _into(out, result)


def entropy(logits, *, axis=-1, from_logits=True, base=None, num_threads=None):
    """``H = -sum(p * log(p))`` along ``axis`` with ``p = softmax(logits)``
    (or ``p = logits`` as given when ``from_logits=False``), 0 log 0 = 0;
    batch shape."""
    x, axis = _classes_last(logits, axis)
    log_base = _log_base(base)
    with np.errstate(invalid="ignore", divide="ignore"):
        if from_logits:
            log_p = _log_softmax_last(x)
            p = np.exp(log_p)
        else:
            p, log_p = x, np.log(x)
        terms = np.where(p != 0, p * log_p, 0.0)  # a class of probability 0 adds 0
        return np.asarray(-np.sum(terms, axis=-1) / log_base, dtype=np.float64)
