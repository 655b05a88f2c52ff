"""Cross entropy over a vocabulary split into shards.

When the classes of a row are spread over several processes (tensor
parallelism: each rank holds the logits of classes ``[v0, v1)``), no process
sees a whole row. Each shard then reduces its part of every row to a few
numbers, the *shard statistics*, and any engine that can take a maximum and
a sum across processes (``torch.distributed``, MPI, Dask, Ray) combines them
into the exact loss; the gradient of each shard then needs only the row's
global log-sum-exp.

Statistics of one shard k, per row (float64, of the batch shape):

    max           m_k = max_{c in k} x_c
    sumexp        s_k = sum_{c in k} exp(x_c - m_k)
    target_logit  x_y where the label y falls in the shard, else 0
    in_shard      whether it does
    logit_sum     d_k = sum_{c in k} w_c (x_c - m_k)   (label smoothing)
and per shard: weight_sum W_k = sum_{c in k} w_c (its class count without
weights) and num_classes C_k.

The merge rule (the online-softmax merge, exact up to rounding) with
M = max_k m_k:

    S = sum_k s_k exp(m_k - M)         D = sum_k (d_k + W_k (m_k - M))
    x_y, in_shard: summed (one shard holds the label)
    W = sum_k W_k                      C = sum_k C_k
    lse = M + log S

``rescale_shard_stats(stats, M)`` gives each shard's terms of those sums, so
a MAX all-reduce of ``max`` followed by one SUM all-reduce of the rescaled
fields is the merge; ``combine_shard_stats`` does it for a list of shards in
list order. The loss of a row, as ``cross_entropy`` computes it from its
own (m, s, d):

    (1 - eps) w_y (log S - (x_y - M)) + eps / C (W log S - D)

and the gradient of class c held by a shard, p_c = exp(x_c - lse):

    gs [ p_c ((1 - eps) w_y + eps W / C) - eps w_c / C - (1 - eps) w_y [c == y] ]
"""
from __future__ import annotations

import math
import operator
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from . import _api, _core

__all__ = [
    "ShardStats",
    "ShardGradParts",
    "shard_stats",
    "rescale_shard_stats",
    "combine_shard_stats",
    "shard_loss",
    "shard_grad",
]

# Rows per block of the NumPy computation: bounds its float64 temporaries.
_BLOCK_ELEMS = 1 << 20


class ShardStats(NamedTuple):
    """Per-row statistics of one vocabulary shard, or of several merged.

    Arrays have the batch shape (the logits' shape without the class axis);
    ``weight_sum`` and ``num_classes`` are per shard (summed by the merge)."""

    max: np.ndarray
    sumexp: np.ndarray
    target_logit: np.ndarray
    in_shard: np.ndarray
    logit_sum: np.ndarray
    weight_sum: float
    num_classes: int

    @property
    def lse(self):
        """log(sum exp(x)) over the classes these statistics cover."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.max + np.log(self.sumexp)


class ShardGradParts(NamedTuple):
    """What ``shard_grad(grad_parts=...)`` needs instead of the logits:
    ``exp`` = exp(x - max) of every element of the shard (its shape, in the
    compute dtype), the shard's row maxima and its target logits."""

    exp: np.ndarray
    max: np.ndarray
    target_logit: np.ndarray


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------

def _check_vocab_start(vocab_start, c_local, num_classes):
    try:
        v0 = operator.index(vocab_start)
    except TypeError:
        raise TypeError(f"vocab_start must be an integer, got {vocab_start!r}") from None
    if v0 < 0:
        raise ValueError(f"vocab_start must be >= 0, got {v0}")
    if num_classes is not None and v0 + c_local > num_classes:
        raise ValueError(f"the shard [vocab_start, vocab_start + {c_local}) = [{v0}, {v0 + c_local}) "
                         f"does not fit in num_classes = {num_classes}")
    return v0


def _check_num_classes(num_classes, weight):
    if weight is not None:
        c = np.shape(weight)
        if len(c) != 1:
            raise ValueError(f"weight must be the (num_classes,) vector of every class's weight, "
                             f"got shape {c}")
        if num_classes is not None and operator.index(num_classes) != c[0]:
            raise ValueError(f"weight has {c[0]} entries but num_classes = {num_classes}")
        num_classes = c[0]
    if num_classes is None:
        return None
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"num_classes must be an integer or None, got {num_classes!r}") from None
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return num_classes


def _check_full_weight(weight, num_classes, dtype):
    """The (C,) class weights as float64 and in the compute dtype, checked as
    cross_entropy checks them (the kernels read them in the compute dtype)."""
    if weight is None:
        return None, None
    wt, _ = _api._check_weight(weight, SimpleNamespace(c=num_classes, dtype=np.dtype(dtype)))
    return wt.astype(np.float64), wt


def _check_global_labels(labels, batch_shape, num_classes, ignore_index, name="labels"):
    """Labels (global class indices) as flat int64, every value checked."""
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer class indices, got dtype {lab.dtype}")
    if lab.shape != tuple(batch_shape):
        raise ValueError(f"{name} must have the batch shape {tuple(batch_shape)}, got {lab.shape}")
    flat = lab.reshape(-1)
    bad = flat < 0
    if num_classes is not None:
        bad |= flat >= num_classes
    bad &= flat != ignore_index
    if bad.any():
        i = int(np.argmax(bad))
        pos = tuple(int(p) for p in np.unravel_index(i, batch_shape)) if batch_shape else ()
        hi = "num_classes" if num_classes is None else num_classes
        raise ValueError(f"label {flat[i]} at position {pos} is out of range [0, {hi}) "
                         f"and is not ignore_index ({ignore_index})")
    return flat.astype(np.int64, copy=False)


def _check_stats(stats, name="stats"):
    if not isinstance(stats, ShardStats):
        raise TypeError(f"{name} must be a ShardStats (from shard_stats or combine_shard_stats), "
                        f"got {type(stats).__name__}")
    return stats


def _local_labels(labels64, v0, c_local, ignore_index):
    """(index into the shard or -1, in-shard mask); ignored rows are in no shard."""
    local = labels64 - v0
    inside = (labels64 >= v0) & (local < c_local) & (labels64 != ignore_index)
    return np.where(inside, local, -1), inside


# --------------------------------------------------------------------------
# Shard statistics
# --------------------------------------------------------------------------

def _row_blocks(n, c):
    step = max(1, _BLOCK_ELEMS // max(c, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _stats(inp, labels64, ignore_index, v0, w_shard, smooth, stash, nt):
    """The (n, 5) statistics of the shard's rows (the row kernel FX_SHARD_STATS,
    rows/shard.h): max, sum of exp, target logit, in-shard flag, logit sum."""
    return _core.run(_core.SHARD_STATS, inp.rows, num_threads=nt, xdtype=inp.code,
                     labels=labels64, ignore_index=ignore_index, weight=w_shard,
                     smoothing=1.0 if smooth else 0.0, out=stash, vocab_start=v0)


def shard_stats(logits_shard, labels, *, vocab_start, axis=-1, weight=None, ignore_index=-100,
                num_classes=None, logit_sum=True, return_grad_parts=False, out=None,
                num_threads=None):
    """Statistics of one vocabulary shard, to be merged with the others'.

    ``logits_shard`` holds the logits of classes ``[vocab_start, vocab_start
    + C_local)`` along ``axis``; ``labels`` are the global class indices
    (the batch shape; ``ignore_index`` marks rows that count for nothing).
    ``weight``, if given, is the ``(num_classes,)`` vector of every class's
    weight (each shard reads its slice). ``num_classes``, if given, checks
    the labels and the shard's range. ``logit_sum=False`` skips the sum of
    the logits that only label smoothing needs (``ShardStats.logit_sum`` is
    then None).

    Returns a :class:`ShardStats`; with ``return_grad_parts=True`` also a
    :class:`ShardGradParts` holding ``exp(x - max)`` of the shard (written
    into ``out=``, an array of the shard's shape in the compute dtype, which
    may be ``logits_shard`` itself), from which ``shard_grad`` makes the
    gradient without a second exponential.
    """
    inp = _api._Input(logits_shard, axis, "logits_shard")
    ignore_index = _api._check_ignore_index(ignore_index)
    num_classes = _check_num_classes(num_classes, weight)
    v0 = _check_vocab_start(vocab_start, inp.c, num_classes)
    nt = _api._check_threads(num_threads)
    labels64 = _check_global_labels(labels, inp.batch_shape, num_classes, ignore_index)
    w64, wt = _check_full_weight(weight, num_classes, inp.dtype)
    w_shard = None if wt is None else np.ascontiguousarray(wt[v0:v0 + inp.c])

    stash = stash_rows = None
    if return_grad_parts:
        if out is not None:
            stash_rows = _api._check_out(out, inp, inp.dtype)
            _api._check_overlap(out, [("logits", inp.array), ("labels", labels)], inp.array)
        stash = stash_rows if stash_rows is not None else np.empty((inp.n, inp.c), inp.dtype)
    elif out is not None:
        raise ValueError("out= is where return_grad_parts=True puts exp(x - max); "
                         "it needs return_grad_parts=True")

    res = _stats(inp, labels64, ignore_index, v0, w_shard, bool(logit_sum), stash, nt)
    shape = inp.batch_shape
    stats = ShardStats(res[:, 0].reshape(shape), res[:, 1].reshape(shape),
                       res[:, 2].reshape(shape), (res[:, 3] != 0).reshape(shape),
                       res[:, 4].reshape(shape) if logit_sum else None,
                       float(inp.c) if w64 is None else float(np.sum(w64[v0:v0 + inp.c])),
                       int(inp.c))
    if not return_grad_parts:
        return stats
    if out is not None:
        exp = out if stash_rows is not None else _api._write_out(out, stash, inp)
    else:
        exp = _api._fresh_like(stash, inp, inp.dtype)
    return stats, ShardGradParts(exp, stats.max, stats.target_logit)


# --------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------

def rescale_shard_stats(stats, global_max):
    """One shard's statistics taken relative to the row maxima over all
    shards (``global_max``): summing the fields of every shard's result
    (a SUM all-reduce) is then the merge, ``max`` being ``global_max``."""
    st = _check_stats(stats)
    M = np.asarray(global_max, dtype=np.float64)
    if M.shape != np.shape(st.max):
        raise ValueError(f"global_max must have the batch shape {np.shape(st.max)}, got {M.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        # m_k == M covers M = +-inf (whose difference is NaN): factor 1.
        delta = np.where(st.max == M, 0.0, st.max - M)
        s = st.sumexp * np.exp(delta)
        # A shard of total weight 0 adds nothing, even at m_k = -inf.
        d = None if st.logit_sum is None else (
            st.logit_sum + (0.0 if st.weight_sum == 0 else st.weight_sum * delta))
    return ShardStats(M, s, st.target_logit, st.in_shard, d, st.weight_sum, st.num_classes)


def combine_shard_stats(stats):
    """Merge shard statistics into those of whole rows.

    ``stats`` is a list of :class:`ShardStats` (one per shard, any order
    of classes; merged in list order, so a given list always gives the same
    bits), or one :class:`ShardStats` already reduced across shards (by
    ``rescale_shard_stats`` and a sum), which is checked and returned.
    """
    if isinstance(stats, ShardStats):
        return stats
    parts = [_check_stats(s, f"stats[{i}]") for i, s in enumerate(stats)]
    if not parts:
        raise ValueError("combine_shard_stats needs at least one ShardStats")
    shape = np.shape(parts[0].max)
    for i, p in enumerate(parts):
        if np.shape(p.max) != shape:
            raise ValueError(f"stats[{i}] has batch shape {np.shape(p.max)}, stats[0] has {shape}")
    M = parts[0].max
    for p in parts[1:]:
        M = np.fmax(M, p.max)
    scaled = [rescale_shard_stats(p, M) for p in parts]
    s, xt = np.array(scaled[0].sumexp), np.array(scaled[0].target_logit)
    d = None if any(p.logit_sum is None for p in parts) else np.array(scaled[0].logit_sum)
    count = np.asarray(scaled[0].in_shard, dtype=np.int64)
    for p in scaled[1:]:
        s = s + p.sumexp
        xt = xt + p.target_logit
        if d is not None:
            d = d + p.logit_sum
        count = count + p.in_shard
    if (count > 1).any():
        i = int(np.argmax(count.reshape(-1) > 1))
        raise ValueError(f"the label of row {i} falls in {int(count.reshape(-1)[i])} shards: "
                         "shards overlap")
    return ShardStats(np.asarray(M), s, xt, count.astype(bool), d,
                      float(sum(p.weight_sum for p in parts)), int(sum(p.num_classes for p in parts)))


def _row_terms(merged, labels64, ignore_index, w64, eps):
    """(per-row loss coefficients) c1 = (1-eps) w_y (0 where ignored), wy, counted mask."""
    counted = labels64 != ignore_index
    found = np.asarray(merged.in_shard).reshape(-1)
    missing = counted & ~found
    if missing.any():
        i = int(np.argmax(missing))
        raise ValueError(f"label {labels64[i]} of row {i} falls in no shard: the shards do not "
                         f"cover it (they cover {merged.num_classes} classes)")
    if w64 is None:
        wy = counted.astype(np.float64)
    else:
        wy = np.where(counted, w64[np.where(counted, labels64, 0)], 0.0)
    return (1.0 - eps) * wy, wy, counted


def shard_loss(stats, labels, *, weight=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0, base=None):
    """The cross entropy of whole rows from merged shard statistics.

    ``stats`` is a merged :class:`ShardStats` (or a list, merged first);
    ``labels``, ``weight`` (the full ``(num_classes,)`` vector),
    ``ignore_index``, ``reduction``, ``label_smoothing`` and ``base`` mean
    what they mean in ``cross_entropy``, which this equals on the unsharded
    logits. The result is float64 (a scalar, or the batch shape for
    ``reduction="none"``).
    """
    st = combine_shard_stats(stats)
    reduction = _api._check_reduction(reduction)
    eps = _api._check_smoothing(label_smoothing)
    if eps > 0 and st.logit_sum is None:
        raise ValueError("label_smoothing needs the logit sums of every shard: "
                         "shard_stats(..., logit_sum=True)")
    scale = _api._log_base_scale(base)
    ignore_index = _api._check_ignore_index(ignore_index)
    shape = np.shape(st.max)
    C = st.num_classes
    labels64 = _check_global_labels(labels, shape, C, ignore_index)
    w64, _ = _check_full_weight(_weight_of(weight, C), C, np.float64)
    c1, wy, counted = _row_terms(st, labels64, ignore_index, w64, eps)
    M = np.asarray(st.max, dtype=np.float64).reshape(-1)
    S = np.asarray(st.sumexp, dtype=np.float64).reshape(-1)
    xy = np.asarray(st.target_logit, dtype=np.float64).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logs = np.log(S)
        # A true class of coefficient 0 costs 0 even at x_y = -inf (0 log 0).
        zero = (c1 == 0) & (xy == -np.inf) & ~np.isnan(S)
        loss = np.where(zero, 0.0, c1 * (logs - (xy - M)))
        if eps > 0:
            W = st.weight_sum
            D = np.asarray(st.logit_sum, dtype=np.float64).reshape(-1)
            loss = loss + eps / C * (W * logs - D)
    loss = np.where(counted, loss, 0.0)
    if reduction == "none":
        return (loss * scale).reshape(shape)
    total = math.fsum(loss)  # exactly rounded: no order to depend on
    if reduction == "mean":
        denom = float(np.sum(wy[counted]))
        total = total / denom if denom != 0 else np.float64(np.nan)
    return np.float64(total * scale)


def _grad_from_stash(rows, labels64, ignore_index, v0, w_shard, row_in, grad_rows, ct):
    """The gradient from stashed exp(x - m_k): the affine map e k1 - k2 w
    (k1 carrying exp(m_k - lse)), the true class gy, ignored rows 0."""
    n, c = rows.shape
    local, inside = _local_labels(labels64, v0, c, ignore_index)
    rows_in = np.nonzero(inside)[0]
    gy = row_in[rows_in, 3].astype(ct)
    for r0, r1 in _row_blocks(n, c):
        p = row_in[r0:r1].astype(ct)
        with np.errstate(invalid="ignore", over="ignore"):
            g = rows[r0:r1] * p[:, 1:2]
            g -= p[:, 2:3] if w_shard is None else p[:, 2:3] * w_shard
        grad_rows[r0:r1] = g
    grad_rows[rows_in, local[rows_in]] = gy
    ignored = np.nonzero(labels64 == ignore_index)[0]
    if ignored.size:
        grad_rows[ignored] = 0


def _weight_of(weight, C):
    if weight is not None and np.shape(weight) != (C,):
        raise ValueError(f"weight must have shape ({C},) (one per class of all shards), "
                         f"got {np.shape(weight)}")
    return weight


# --------------------------------------------------------------------------
# The gradient of one shard
# --------------------------------------------------------------------------

def shard_grad(logits_shard, labels, global_lse, *, vocab_start, num_classes=None, axis=-1,
               weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               base=None, grad_output=1.0, out=None, grad_parts=None, num_threads=None):
    """``d loss / d logits_shard`` given every row's global log-sum-exp.

    The loss is ``cross_entropy`` of the whole rows (with ``weight`` the full
    ``(num_classes,)`` vector, ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``base``) times ``grad_output``; ``global_lse`` is
    ``combine_shard_stats(...).lse``. ``num_classes`` is needed with label
    smoothing when no ``weight`` gives it. ``out=`` takes an array of the
    shard's shape and dtype (``out=logits_shard`` overwrites it in place).
    ``grad_parts`` (from ``shard_stats(return_grad_parts=True)``) replaces
    the exponentials of the logits, which are then not read (``logits_shard``
    may be ``None``, or the exponentials' own array, updated in place).

    Each element is visited once: ``p_c = exp(x_c - lse)`` and the
    gradient's affine form, the true class corrected from its saved logit.
    """
    if grad_parts is not None:
        if not isinstance(grad_parts, ShardGradParts):
            raise TypeError(f"grad_parts must be a ShardGradParts, got {type(grad_parts).__name__}")
        source = grad_parts.exp
    else:
        source = logits_shard
    inp = _api._Input(source, axis, "logits_shard")
    reduction = _api._check_reduction(reduction)
    eps = _api._check_smoothing(label_smoothing)
    scale = _api._log_base_scale(base)
    ignore_index = _api._check_ignore_index(ignore_index)
    nt = _api._check_threads(num_threads)
    num_classes = _check_num_classes(num_classes, weight)
    if eps > 0 and num_classes is None:
        raise ValueError("label_smoothing needs num_classes (or weight) in shard_grad: the "
                         "smoothing spreads eps over every class of every shard")
    v0 = _check_vocab_start(vocab_start, inp.c, num_classes)
    labels64 = _check_global_labels(labels, inp.batch_shape, num_classes, ignore_index)
    w64, wt = _check_full_weight(weight, num_classes, inp.dtype)
    lse = np.asarray(global_lse, dtype=np.float64)
    if lse.shape != inp.batch_shape:
        raise ValueError(f"global_lse must have the batch shape {inp.batch_shape}, got {lse.shape}")
    lse = lse.reshape(-1)

    counted = labels64 != ignore_index
    if w64 is None:
        wy = counted.astype(np.float64)
        W = float(num_classes) if num_classes is not None else 0.0
    else:
        wy = np.where(counted, w64[np.where(counted, labels64, 0)], 0.0)
        W = float(np.sum(w64))
    denom = None
    if reduction == "mean":
        denom = float(np.sum(wy))
    factor = scale if denom is None else (scale / denom if denom != 0 else 0.0)
    g = _api._grad_output(grad_output, reduction, inp.batch_shape, "batch shape")
    gs = np.where(counted, np.reshape(g, -1) * factor if not isinstance(g, float) else g * factor,
                  0.0)

    ec = eps / num_classes if eps > 0 else 0.0
    c1 = (1.0 - eps) * wy
    A = c1 + ec * W
    k1 = gs * A
    k2 = gs * ec
    local, inside = _local_labels(labels64, v0, inp.c, ignore_index)
    rows_in = np.nonzero(inside)[0]
    if grad_parts is not None:
        xy = np.asarray(grad_parts.target_logit, dtype=np.float64).reshape(-1)
    else:
        xy = np.zeros(inp.n)
        xy[rows_in] = inp.rows[rows_in, local[rows_in]].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        gy = gs * (np.exp(xy - lse) * A - c1 - ec * wy)

    w_shard = None if wt is None else np.ascontiguousarray(wt[v0:v0 + inp.c])
    rows_out = None
    if out is not None:
        rows_out = _api._check_out(out, inp, inp.out_dtype)
        _api._check_overlap(out, [("logits", inp.array), ("labels", labels), ("weight", weight)],
                            inp.array)
    grad_rows = rows_out if rows_out is not None else np.empty((inp.n, inp.c), inp.rows.dtype)
    ct = inp.dtype.type
    with np.errstate(invalid="ignore", over="ignore"):
        if grad_parts is not None:
            # exp(x - m_k) * exp(m_k - lse): the stash's own max.
            hi = np.zeros(inp.n)
            k1 = k1 * np.exp(np.asarray(grad_parts.max, np.float64).reshape(-1) - lse)
        else:
            # exp(x - lse) = exp(x - hi) exp(hi - lse) with hi = lse rounded
            # to the compute dtype: x - hi is exact near the row maximum.
            hi = lse.astype(ct).astype(np.float64)
            k1 = k1 * np.exp(hi - lse)
    row_in = np.stack([hi, k1, k2, gy], axis=1)
    if grad_parts is None:
        _core.run(_core.SHARD_GRAD, inp.rows, num_threads=nt, xdtype=inp.code, labels=labels64,
                  ignore_index=ignore_index, weight=w_shard, out=grad_rows, vocab_start=v0,
                  row_in=np.ascontiguousarray(row_in))
    else:
        _grad_from_stash(inp.rows, labels64, ignore_index, v0, w_shard, row_in, grad_rows, ct)
    if out is not None:
        if rows_out is None:
            _api._write_out(out, grad_rows, inp)
        return out
    return _api._fresh_like(grad_rows, inp, inp.out_dtype)
