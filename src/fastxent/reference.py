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


# --------------------------------------------------------------------------
# Options of the language-model loss: z-loss, soft-capping, per-row weights,
# a caller-given mean denominator, token statistics
# --------------------------------------------------------------------------
#
# For a row with logits x, the options compute, in this order:
#
#   z        = softcap * tanh(x / softcap)          (x itself when softcap is None)
#   lse      = log(sum(exp(z)))
#   ce       = the cross entropy of the row above, on z (class weights,
#              ignore_index and label smoothing as torch; 0 on ignored rows)
#   zpart    = z_loss * lse**2                       (0 on ignored rows)
#   row loss = sample_weight * (ce + zpart)
#
# How the z-loss composes with the other options (Liger-Kernel's
# ``lse_square_scale`` is the model; PaLM introduced the term):
#
# - class ``weight``: not applied to the z-loss.  The term regularises the
#   normaliser of the softmax, which does not depend on the label, so
#   weighting it by the label's class would make the regulariser stronger on
#   rare classes for no reason.  Liger does the same.
# - ``ignore_index``: an ignored row contributes no z-loss (nor gradient), as
#   in Liger: ignored positions are padding or prompt tokens.
# - ``sample_weight``: scales the whole row loss, z-loss included: a token of
#   weight 0 contributes nothing at all (Liger has no per-token weight).
# - "mean": the cross entropy part is divided by the sum of the weights of the
#   counted rows, sum_i sample_weight_i * weight[y_i] (torch's denominator,
#   times the per-token weights: scikit-learn's log_loss); the z-loss part by
#   sum_i sample_weight_i over the counted rows, its own (unweighted by class)
#   denominator.  Without class weights both denominators are the same number
#   and the mean is sum(row loss) / sum(sample_weight).  With sample_weight
#   None this is exactly Liger's loss: CE mean + z_loss * mean(lse**2) over
#   the non-ignored rows.  Soft labels count every row: both denominators are
#   sum(sample_weight) (the number of rows without it).
# - ``n_valid``: replaces both denominators of "mean" (Unsloth's n_items), so
#   that the sum over micro-batches of their means with the same n_valid is
#   the mean of the whole batch.
# - ``base``: divides the whole row loss, z-loss included.
#
# The gradient of the z-loss term with respect to z is 2 * z_loss * lse *
# softmax(z) (Liger's formula); soft-capping multiplies the gradient with
# respect to z by dz/dx = 1 - tanh(x / softcap)**2.
#
# ``return_stats=True`` adds a CrossEntropyStats named tuple, computed from
# the same rows:
#   lse      per row; for "mean"/"sum" the mean over the counted rows,
#            weighted by sample_weight.  For from_logits=False it is
#            log(sum(p)), the log normaliser of the given probabilities.
#   z_loss   the z-loss part of the returned loss, reduced as the loss (per
#            row for "none"), so that ``loss - z_loss`` is the cross entropy.
#   argmax   per row in every reduction: the index of the largest input
#            logit (before soft-capping, which preserves the order), ties to
#            the lowest index as torch.argmax.
#   accuracy for "mean"/"sum" the fraction of counted rows whose argmax is
#            the label (the argmax of the label probabilities for soft
#            labels), weighted by sample_weight (NaN when no row counts); for
#            "none" 1.0 or 0.0 per row and NaN at ignored rows.

from collections import namedtuple as _namedtuple

CrossEntropyStats = _namedtuple("CrossEntropyStats", ["lse", "z_loss", "argmax", "accuracy"])


def _option_number(value, name, positive=False):
    """A finite real option (>= 0, or > 0 with positive=True) as a float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def _check_sample_weight(sample_weight, batch_shape):
    if sample_weight is None:
        return np.ones(batch_shape)
    sw = _as_float64(sample_weight, "sample_weight")
    if sw.shape != tuple(batch_shape):
        raise ValueError(f"sample_weight has shape {sw.shape}, expected the batch shape "
                         f"{tuple(batch_shape)} (one weight per row)")
    bad = ~(np.isfinite(sw) & (sw >= 0))
    if np.any(bad):
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"sample_weight must be finite and non-negative; "
                         f"sample_weight{list(position)} = {sw[position]!r}")
    return sw


def _cross_entropy_options(logits, labels, axis, weight, ignore_index, reduction,
                           label_smoothing, from_logits, base, z_loss, softcap,
                           sample_weight, n_valid, grad_output, want_grad):
    x = _as_float64(logits, "logits")
    axis = _class_axis(x.ndim, axis)
    _check_reduction(reduction, _REDUCTIONS)
    log_base = _log_base(base)
    z_loss = _option_number(z_loss, "z_loss")
    if softcap is not None:
        softcap = _option_number(softcap, "softcap", positive=True)
    if n_valid is not None:
        n_valid = _option_number(n_valid, "n_valid", positive=True)
        if reduction != "mean":
            raise ValueError(f"n_valid is the denominator of reduction='mean'; "
                             f"got reduction={reduction!r}")
    if not from_logits and (z_loss != 0 or softcap is not None):
        raise ValueError("z_loss and softcap apply to logits; they need from_logits=True")

    xl = np.moveaxis(x, axis, -1)
    _check_classes(xl.shape[-1])
    batch_shape = xl.shape[:-1]
    sw = _check_sample_weight(sample_weight, batch_shape)
    labels = np.asarray(labels)
    hard = labels.dtype.kind in "iu"

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = xl if softcap is None else softcap * np.tanh(xl / softcap)
        lse = _logsumexp_last(z) if from_logits else np.log(np.sum(xl, axis=-1))
        # The cross entropy part per row (class-weighted, 0 at ignored rows),
        # from the oracle above, which also checks labels and weight.
        ce, _ = _cross_entropy(np.moveaxis(z, -1, axis), labels, axis, weight, ignore_index,
                               "none", label_smoothing, from_logits, None, 1.0, False)
        if hard:
            counted = labels != ignore_index
            y = np.where(counted, labels, 0).astype(np.intp)
            w = np.ones(xl.shape[-1]) if weight is None else _as_float64(weight, "weight")
            ce_denominator = np.sum(sw * w[y] * counted)
            truth = y
        else:
            counted = np.ones(batch_shape, dtype=bool)
            ce_denominator = np.sum(sw)
            truth = np.argmax(np.moveaxis(_as_float64(labels, "labels"), axis, -1), axis=-1)
        z_denominator = np.sum(sw * counted)
        if n_valid is not None:
            ce_denominator = z_denominator = n_valid
        zpart = np.where(counted & (z_loss != 0), z_loss * lse**2, 0.0)

        # Per-row factors of the two parts of the loss: d(loss)/d(part of row i).
        g = _as_float64(grad_output if want_grad else 1.0, "grad_output")
        if reduction == "none":
            try:
                g = np.broadcast_to(g, batch_shape)
            except ValueError:
                raise ValueError(f"grad_output of shape {g.shape} does not broadcast to "
                                 f"the per-position loss shape {tuple(batch_shape)}") from None
        elif g.ndim != 0:
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {g.shape}")
        ce_factor = z_factor = g * sw
        if reduction == "mean":
            # A mean over nothing is NaN; its gradient is 0.
            ce_factor = ce_factor / ce_denominator if ce_denominator else 0.0 * sw
            z_factor = z_factor / z_denominator if z_denominator else 0.0 * sw
        grad = None
        if want_grad:
            _, grad_z = _cross_entropy(np.moveaxis(z, -1, axis), labels, axis, weight,
                                       ignore_index, "none", label_smoothing, from_logits,
                                       None, ce_factor, True)
            grad_z = np.moveaxis(grad_z, axis, -1)
            if z_loss != 0:
                zg = np.where(counted, 2.0 * z_loss * lse * z_factor, 0.0)
                grad_z = grad_z + zg[..., None] * _softmax_last(z)
            if softcap is not None:
                grad_z = grad_z * (1.0 - np.tanh(xl / softcap) ** 2)
            grad = np.moveaxis(grad_z / log_base, -1, axis)

        ce_sum, z_sum = np.sum(sw * ce), np.sum(sw * zpart)
        if reduction == "none":
            loss = np.asarray(sw * (ce + zpart) / log_base, dtype=np.float64)
            zstat = sw * zpart / log_base
        elif reduction == "sum":
            loss = np.float64((ce_sum + z_sum) / log_base)
            zstat = np.float64(z_sum / log_base)
        else:
            ce_mean = ce_sum / ce_denominator if ce_denominator else np.nan
            zstat = (z_sum / z_denominator if z_denominator else np.nan) if z_loss != 0 else 0.0
            loss = np.float64((ce_mean + zstat) / log_base)
            zstat = np.float64(zstat / log_base)

        argmax = np.argmax(xl, axis=-1)
        correct = argmax == truth
        if reduction == "none":
            accuracy = np.where(counted, correct.astype(np.float64), np.nan)
            lse_stat = lse
        else:
            total = np.sum(sw * counted)
            accuracy = np.float64(np.sum(sw * counted * correct) / total) if total else np.float64(np.nan)
            lse_stat = np.float64(np.sum(np.where(counted, sw * lse, 0.0)) / total) if total \
                else np.float64(np.nan)
    stats = CrossEntropyStats(lse_stat, zstat, argmax, accuracy)
    return loss, grad, stats


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, from_logits=True,
                  base=None, num_threads=None, z_loss=0.0, softcap=None,
                  sample_weight=None, n_valid=None, return_stats=False):
    """Cross entropy of ``labels`` under ``softmax(logits)`` along ``axis``.

    Semantics of ``torch.nn.functional.cross_entropy`` (integer class
    indices or probability targets; weight, ignore_index, label_smoothing,
    reduction).  With ``from_logits=False``, ``logits`` holds probabilities:
    the loss is ``-sum(w * t * log(p))`` with no renormalisation or clipping.
    The language-model options (z_loss, softcap, sample_weight, n_valid,
    return_stats) are described above; ``return_stats=True`` returns
    ``(loss, CrossEntropyStats)``.
    """
    loss, _, stats = _cross_entropy_options(
        logits, labels, axis, weight, ignore_index, reduction, label_smoothing, from_logits,
        base, z_loss, softcap, sample_weight, n_valid, 1.0, want_grad=False)
    return (loss, stats) if return_stats else loss


def cross_entropy_with_grad(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, from_logits=True,
                            base=None, num_threads=None, grad_output=1.0, out=None,
                            z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                            return_stats=False):
    """``(loss, grad)``: ``cross_entropy`` and its gradient w.r.t. ``logits``
    times ``grad_output`` (a scalar, or batch-shaped for reduction="none");
    ``(loss, grad, CrossEntropyStats)`` with ``return_stats=True``."""
    loss, grad, stats = _cross_entropy_options(
        logits, labels, axis, weight, ignore_index, reduction, label_smoothing, from_logits,
        base, z_loss, softcap, sample_weight, n_valid, grad_output, want_grad=True)
    grad = _into(out, grad)
    return (loss, grad, stats) if return_stats else (loss, grad)


# --------------------------------------------------------------------------
# Generalised Jensen-Shannon divergence (Liger-Kernel's LigerJSD)
# --------------------------------------------------------------------------
#
# With Q = softmax(student / T) the student's distribution, P the teacher's
# (from teacher logits softened by T, log-probabilities or probabilities) and
# M = beta * Q + (1 - beta) * P, Liger's generalised JSD of a row is
#
#   0 < beta < 1:  beta * KL(Q || M) + (1 - beta) * KL(P || M)
#                  = sum_c beta Q log Q + (1 - beta) P log P - M log M
#   beta = 0:      KL(P || Q)   (forward KL, the limit Liger uses)
#   beta = 1:      KL(Q || P)   (reverse KL)
#
# times T**2, as kl_div does (so that jsd(beta=0) is kl_div(student, teacher)
# with the same temperature; Liger's fused linear JSD divides the logits by T
# and does not multiply by T**2).  0 log 0 counts as 0.  Rows whose label is
# ignore_index (when labels are given) count neither in the loss nor in the
# denominator, as in Liger; "batchmean" and "mean" divide the sum by the
# number of counted rows, "none" gives one value per row (0 at ignored rows).
#
# With X = log Q, the gradient of the row sum with respect to X is
#   0 < beta < 1:  beta * Q * (X - log M)    (Liger's dX)
#   beta = 0:      -P
#   beta = 1:      Q * (X - log P) + Q
# and through the log-softmax, d/dz = (dX - Q * sum(dX)) / T, times T**2.

_JSD_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels,
         ignore_index, reduction, axis, base, grad_output, want_grad):
    x = _as_float64(student_logits, "student_logits")
    t = _as_float64(teacher_logits, "teacher_logits")
    axis = _class_axis(x.ndim, axis)
    _check_reduction(reduction, _JSD_REDUCTIONS)
    if target_kind not in _TARGET_KINDS:
        raise ValueError(f"unknown target_kind {target_kind!r}; expected one of {_TARGET_KINDS}")
    beta = _option_number(beta, "beta")
    if beta > 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    T = _option_number(temperature, "temperature", positive=True)
    log_base = _log_base(base)
    if t.shape != x.shape:
        raise ValueError(f"teacher_logits has shape {t.shape}, expected the student's {x.shape}")
    x = np.moveaxis(x, axis, -1)
    t = np.moveaxis(t, axis, -1)
    _check_classes(x.shape[-1])
    batch_shape = x.shape[:-1]
    if labels is None:
        counted = np.ones(batch_shape, dtype=bool)
    else:
        labels = np.asarray(labels)
        if labels.shape != batch_shape:
            raise ValueError(f"labels have shape {labels.shape}, expected the batch shape "
                             f"{tuple(batch_shape)}")
        counted = labels != ignore_index
    denominator = np.sum(counted)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_q = _log_softmax_last(x / T)
        q = np.exp(log_q)
        if target_kind == "probs":
            p, log_p = t, np.log(t)
        elif target_kind == "log_probs":
            p, log_p = np.exp(t), t
        else:
            log_p = _log_softmax_last(t / T)
            p = np.exp(log_p)

        def xlogy(a, log_b):
            return np.where(a != 0, a * log_b, 0.0)

        if beta == 0.0:
            terms = xlogy(p, log_p) - xlogy(p, log_q)
            d_logq = -p
        elif beta == 1.0:
            terms = xlogy(q, log_q) - xlogy(q, log_p)
            d_logq = q * (log_q - log_p) + q
        else:
            m = beta * q + (1.0 - beta) * p
            log_m = np.log(m)
            terms = beta * xlogy(q, log_q) + (1.0 - beta) * xlogy(p, log_p) - xlogy(m, log_m)
            d_logq = beta * np.where(q != 0, q * (log_q - log_m), 0.0)
        per_row = np.where(counted, T**2 * np.sum(terms, axis=-1), 0.0) / log_base
        name = "none" if reduction == "none" else ("sum" if reduction == "sum" else "mean")
        loss = _reduce(per_row, name, denominator)
        if not want_grad:
            return loss, None
        grad = T * (d_logq - q * np.sum(d_logq, axis=-1, keepdims=True))
        grad = np.where(counted[..., None], grad, 0.0)
        scale = _gradient_scale(name, grad_output, batch_shape, denominator)
        grad = grad * scale[..., None] / log_base
    return loss, np.moveaxis(grad, -1, axis)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, target_kind="logits",
        labels=None, ignore_index=-100, reduction="batchmean", axis=-1, base=None,
        num_threads=None):
    """Liger's generalised Jensen-Shannon divergence between the student's
    ``softmax(student_logits / T)`` and the teacher's distribution, times
    ``T**2`` (beta = 0: KL(teacher || student), beta = 1: KL(student ||
    teacher)); rows whose ``labels`` equal ``ignore_index`` are left out."""
    loss, _ = _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels,
                   ignore_index, reduction, axis, base, 1.0, want_grad=False)
    return loss


def jsd_with_grad(student_logits, teacher_logits, *, beta=0.5, temperature=1.0,
                  target_kind="logits", labels=None, ignore_index=-100, reduction="batchmean",
                  axis=-1, base=None, num_threads=None, grad_output=1.0, out=None):
    """``(loss, grad)``: ``jsd`` and its gradient w.r.t. ``student_logits``."""
    loss, grad = _jsd(student_logits, teacher_logits, beta, temperature, target_kind, labels,
                      ignore_index, reduction, axis, base, grad_output, want_grad=True)
    return loss, _into(out, grad)


# --------------------------------------------------------------------------
# The linear head: cross entropy of hidden @ weight.T + bias
# --------------------------------------------------------------------------

def _linear_cross_entropy(hidden, weight, labels, bias, options, grad_output, want_grad):
    h = _as_float64(hidden, "hidden")
    w = _as_float64(weight, "weight")
    if h.ndim < 1 or w.ndim != 2:
        raise ValueError(f"hidden must be (..., D) and weight (V, D); got {h.shape} and {w.shape}")
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"hidden has D = {h.shape[-1]} features but weight has {w.shape[1]}")
    logits = h @ w.T  # materialised: the oracle
    if bias is not None:
        b = _as_float64(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias has shape {b.shape}, expected ({w.shape[0]},)")
        logits = logits + b
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    options = dict(options)
    options["weight"] = options.pop("class_weight", None)
    loss, grad, stats = _cross_entropy_options(
        logits, labels, -1, options["weight"], options.get("ignore_index", -100),
        options.get("reduction", "mean"), options.get("label_smoothing", 0.0), True,
        options.get("base"), options.get("z_loss", 0.0), options.get("softcap"),
        options.get("sample_weight"), options.get("n_valid"), grad_output, want_grad)
    if not want_grad:
        return loss, None, stats
    g2 = grad.reshape(-1, w.shape[0])
    grads = [(g2 @ w).reshape(h.shape), g2.T @ h.reshape(-1, w.shape[1])]
    if bias is not None:
        grads.append(g2.sum(axis=0))
    return loss, grads, stats


def linear_cross_entropy(hidden, weight, labels, *, bias=None, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                         base=None, return_stats=False, num_threads=None, chunk_size=None):
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` with the logits
    materialised in float64; ``weight`` is (V, D), the ``nn.Linear`` layout,
    and the class weights are ``class_weight``."""
    opts = dict(class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                sample_weight=sample_weight, n_valid=n_valid, base=base)
    loss, _, stats = _linear_cross_entropy(hidden, weight, labels, bias, opts, 1.0, False)
    return (loss, stats) if return_stats else loss


def linear_cross_entropy_with_grad(hidden, weight, labels, *, bias=None, class_weight=None,
                                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, sample_weight=None, n_valid=None,
                                   base=None, return_stats=False, num_threads=None,
                                   chunk_size=None, grad_output=1.0):
    """``(loss, d_hidden, d_weight[, d_bias][, stats])`` of ``linear_cross_entropy``."""
    opts = dict(class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                sample_weight=sample_weight, n_valid=n_valid, base=base)
    loss, grads, stats = _linear_cross_entropy(hidden, weight, labels, bias, opts,
                                               grad_output, True)
    return (loss, *grads, stats) if return_stats else (loss, *grads)


__all__ += ["CrossEntropyStats", "jsd", "jsd_with_grad", "linear_cross_entropy",
            "linear_cross_entropy_with_grad"]
