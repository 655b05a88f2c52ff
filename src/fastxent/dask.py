"""Cross entropy and its relatives over Dask arrays: logits larger than memory.

Logits are a 2-D ``dask.array`` of shape ``(rows, classes)``, chunked along
rows and, for vocabularies too wide for one block, along classes too. Every
function builds a graph and returns a Dask array (a 0-d one for a
reduction): nothing is read until ``.compute()`` (or ``dask.compute``).

* Blocks that hold whole rows go through fastxent's kernels directly.
* Blocks that hold part of the classes are reduced to shard statistics
  (``fastxent.shard_stats``: row max, sum of exponentials, target logit),
  which are merged per row in the order of the class chunks (the merge rule
  of ``fastxent.combine_shard_stats``).
* Reductions sum per-row values within a block, then the blocks' partial
  sums in a tree fixed by the chunks and ``split_every`` (``dask.array``'s
  reduction tree): the result depends on the chunking, never on the
  scheduler, the number of workers or the order tasks finish in.

``open_logits`` opens a ``.npy`` file (memory-mapped, one mapping per block
that is released with it) or a Zarr array with row chunks sized to a memory
budget. Needs ``dask[array]`` (``pip install fastxent[dask]``).
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np

if importlib.util.find_spec("dask") is None:  # pragma: no cover - depends on the environment
    raise ImportError("fastxent.dask needs Dask: pip install fastxent[dask] (dask[array])")

import dask.array as da  # noqa: E402
from dask.base import tokenize  # noqa: E402
from dask.utils import parse_bytes  # noqa: E402

from . import _api, _shard
from ._api import cross_entropy as _cross_entropy, entropy as _entropy, kl_div as _kl_div

__all__ = [
    "cross_entropy",
    "log_loss",
    "perplexity",
    "accuracy",
    "entropy",
    "kl_div",
    "metrics",
    "open_logits",
    "rows_per_chunk",
]

# Fields of the per-block shard statistics, in their packed order.
_STATS = ("max", "sumexp", "target_logit", "in_shard", "logit_sum")


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def _logits(logits, name="logits"):
    x = logits if isinstance(logits, da.Array) else da.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, classes) array, got shape {x.shape}")
    if any(math.isnan(s) for s in x.shape):
        raise ValueError(f"{name} must have known chunk sizes (call compute_chunk_sizes())")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no classes (C == 0)")
    _api._compute_dtype(x.dtype, name)
    return x


def _labels(labels, x):
    y = labels if isinstance(labels, da.Array) else da.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) (one per row), got {y.shape}")
    return y.rechunk((x.chunks[0],))


def _class_starts(x):
    return np.cumsum((0,) + x.chunks[1][:-1]).astype(np.int64)


def _check_weight(weight, c):
    if weight is None:
        return None
    w = np.asarray(weight)
    if w.shape != (c,):
        raise ValueError(f"weight must have shape ({c},) (one per class), got {w.shape}")
    return w


def _starts_array(x):
    """The global class index of every column, chunked like the classes: a
    block function reads its first class from element 0."""
    return da.arange(x.shape[1], chunks=(x.chunks[1],), dtype=np.int64)


# --------------------------------------------------------------------------
# Per-block work (runs on the workers)
# --------------------------------------------------------------------------

def _ce_rows(x, y, weight, ignore_index, label_smoothing):
    """Whole rows: (n, 1, 2) = per-row loss (nats), per-row weight of the mean."""
    y = np.asarray(y).reshape(-1)
    loss = _cross_entropy(x, y, weight=weight, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    out = np.empty((len(y), 1, 2))
    out[:, 0, 0] = loss
    out[:, 0, 1] = _row_weight(y, weight, ignore_index)
    return out


def _row_weight(y, weight, ignore_index):
    counted = y != ignore_index
    if weight is None:
        return counted
    return np.where(counted, np.asarray(weight, np.float64)[np.where(counted, y, 0)], 0.0)


def _stats_block(x, y, start, weight, ignore_index, logit_sum):
    """Part of the classes of a block of rows: (n, 1, 5) shard statistics
    (the logit sum NaN unless label smoothing needs it)."""
    st = _shard.shard_stats(x, np.asarray(y).reshape(-1), vocab_start=int(start[0]),
                            weight=weight, ignore_index=ignore_index, logit_sum=logit_sum)
    out = np.full((len(st.max), 1, len(_STATS)), np.nan)
    for k, f in enumerate(_STATS):
        if getattr(st, f) is not None:
            out[:, 0, k] = getattr(st, f)
    return out


def _unpack(packed, sums, logit_sum):
    """The (n, J, 5) statistics of J class chunks as a list of ShardStats."""
    return [_shard.ShardStats(packed[:, j, 0], packed[:, j, 1], packed[:, j, 2],
                              packed[:, j, 3] > 0.5, packed[:, j, 4] if logit_sum else None,
                              ws, nc)
            for j, (ws, nc) in enumerate(sums)]


def _ce_merge(packed, y, sums, weight, ignore_index, label_smoothing):
    """(n, 2) per-row loss and weight from the statistics of every class chunk."""
    y = np.asarray(y).reshape(-1)
    merged = _shard.combine_shard_stats(_unpack(packed, sums, label_smoothing > 0))
    out = np.empty((len(y), 2))
    out[:, 0] = _shard.shard_loss(merged, y, weight=weight, ignore_index=ignore_index,
                                  reduction="none", label_smoothing=label_smoothing)
    out[:, 1] = _row_weight(y, weight, ignore_index)
    return out


def _argmax_block(x, start):
    """(n, 1, 2): the row max of a class chunk and where it is (a global class)."""
    xx = np.asarray(x)
    i = np.argmax(xx, axis=1)
    out = np.empty((xx.shape[0], 1, 2))
    out[:, 0, 0] = xx[np.arange(xx.shape[0]), i]
    out[:, 0, 1] = i + int(start[0])
    return out


def _accuracy_merge(packed, y, ignore_index):
    """(n, 2): correct, counted. The first chunk holding the row's max wins
    (np.argmax's first occurrence over the whole row)."""
    y = np.asarray(y).reshape(-1)
    best, pred = packed[:, 0, 0].copy(), packed[:, 0, 1].copy()
    for j in range(1, packed.shape[1]):
        better = packed[:, j, 0] > best
        best = np.where(better, packed[:, j, 0], best)
        pred = np.where(better, packed[:, j, 1], pred)
    counted = y != ignore_index
    return np.stack([(pred == y) & counted, counted], axis=1).astype(np.float64)


def _metrics_rows(x, y, ignore_index):
    """Whole rows: (n, 1, 4) = loss, counted, correct, counted."""
    y = np.asarray(y).reshape(-1)
    out = np.empty((len(y), 1, 4))
    out[:, 0, 0] = _cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
    counted = y != ignore_index
    out[:, 0, 1] = out[:, 0, 3] = counted
    out[:, 0, 2] = (np.argmax(x, axis=1) == y) & counted
    return out


def _metrics_block(x, y, start, ignore_index):
    """Part of the classes: (n, 1, 7) = shard statistics, row max, its class."""
    return np.concatenate([_stats_block(x, y, start, None, ignore_index, False),
                           _argmax_block(x, start)], axis=2)


def _metrics_merge(packed, y, sums, ignore_index):
    out = np.empty((packed.shape[0], 4))
    out[:, :2] = _ce_merge(packed[..., :5], y, sums, None, ignore_index, 0.0)
    out[:, 2:] = _accuracy_merge(packed[..., 5:], y, ignore_index)
    return out


def _entropy_block(x):
    """(n, 1, 3): max m, s = sum exp(x - m), q = sum exp(x - m) (x - m)."""
    out = np.empty((x.shape[0], 1, 3))
    for r0, r1 in _shard._row_blocks(x.shape[0], x.shape[1]):
        z = np.asarray(x[r0:r1], np.float64)
        m = np.fmax.reduce(z, axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            z = z - np.where(np.isfinite(m), m, 0.0)[:, None]
            e = np.exp(z)
            q = np.where(e == 0, 0.0, e * z).sum(axis=1)  # 0 log 0 = 0
        out[r0:r1, 0] = np.stack([m, e.sum(axis=1), q], axis=1)
    return out


def _entropy_merge(packed, scale):
    """H = log S - Q / S with S, Q rescaled to the row max over all chunks."""
    m, s, q = packed[..., 0], packed[..., 1], packed[..., 2]
    M = np.fmax.reduce(m, axis=1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        delta = np.where(m == M[:, None], 0.0, m - M[:, None])
        f = np.exp(delta)
        S = (s * f).sum(axis=1)
        Q = (f * (q + np.where(s == 0, 0.0, s * delta))).sum(axis=1)
        return (np.log(S) - Q / S) * scale


def _finish(sums, reduction, scale):
    """A (2,) block of (sum of values, sum of weights) as the reduced scalar."""
    total, denom = float(sums[0]), float(sums[1])
    if reduction == "mean":
        total = total / denom if denom != 0 else math.nan
    return np.float64(total * scale)


def _reduce_pairs(pairs, reduction, scale, split_every):
    """(n, 2) per-row (value, weight) as the reduction's lazy result."""
    if reduction == "none":
        return pairs[:, 0] * scale if scale != 1.0 else pairs[:, 0]
    sums = pairs.sum(axis=0, split_every=split_every)
    return sums.map_blocks(_finish, reduction, scale, drop_axis=0, dtype=np.float64)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------

def cross_entropy(logits, labels, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, base=None, split_every=None):
    """Cross entropy of 2-D Dask logits (rows, classes) against integer labels.

    The options mean what they mean in ``fastxent.cross_entropy`` (and torch);
    the result is lazy: a 0-d float64 Dask array for "mean" and "sum", a
    (rows,) one for "none". Row chunks run fastxent's kernels; several class
    chunks per row are merged from their shard statistics.
    """
    x = _logits(logits)
    y = _labels(labels, x)
    reduction = _api._check_reduction(reduction)
    eps = _api._check_smoothing(label_smoothing)
    scale = _api._log_base_scale(base)
    ii = _api._check_ignore_index(ignore_index)
    w = _check_weight(weight, x.shape[1])
    if x.numblocks[1] == 1:
        # Outputs keep the class index j, so that the read of a block fuses
        # with its first use into one task (a contracted index would not):
        # a block then never travels between workers.
        pairs = da.blockwise(_ce_rows, "ijp", x, "ij", y, "i", new_axes={"p": 2},
                             adjust_chunks={"j": 1}, dtype=np.float64, weight=w,
                             ignore_index=ii, label_smoothing=eps)[:, 0, :]
    else:
        starts = _class_starts(x)
        sums = [(float(ch) if w is None else float(np.sum(w[s0:s0 + ch], dtype=np.float64)), ch)
                for s0, ch in zip(starts, x.chunks[1])]
        stats = da.blockwise(_stats_block, "ijk", x, "ij", y, "i", _starts_array(x), "j",
                             new_axes={"k": len(_STATS)}, dtype=np.float64, concatenate=True,
                             weight=w, ignore_index=ii, logit_sum=eps > 0)
        pairs = da.blockwise(_ce_merge, "ip", stats.rechunk({1: -1}), "ijk", y, "i",
                             new_axes={"p": 2}, dtype=np.float64, concatenate=True, sums=sums,
                             weight=w, ignore_index=ii, label_smoothing=eps)
    return _reduce_pairs(pairs, reduction, scale, split_every)


def log_loss(logits, labels, *, weight=None, ignore_index=-100, base=None, split_every=None):
    """The mean cross entropy (negative log-likelihood per counted row), lazy."""
    return cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index,
                         reduction="mean", base=base, split_every=split_every)


def perplexity(logits, labels, *, ignore_index=-100, split_every=None):
    """``exp`` of the mean cross entropy in nats over the counted rows, lazy."""
    return da.exp(cross_entropy(logits, labels, ignore_index=ignore_index, split_every=split_every))


def accuracy(logits, labels, *, ignore_index=-100, split_every=None):
    """Fraction of counted rows whose largest logit is the label's (ties: the
    first class, as ``np.argmax``), lazy."""
    x = _logits(logits)
    y = _labels(labels, x)
    ii = _api._check_ignore_index(ignore_index)
    packed_x = da.blockwise(_argmax_block, "ijk", x, "ij", _starts_array(x), "j",
                            new_axes={"k": 2}, dtype=np.float64, concatenate=True)
    packed_x = packed_x.rechunk({1: -1})
    pairs = da.blockwise(_accuracy_merge, "ip", packed_x, "ijk", y, "i", new_axes={"p": 2},
                         dtype=np.float64, concatenate=True, ignore_index=ii)
    return _reduce_pairs(pairs, "mean", 1.0, split_every)


def _ratio(sums, i):
    return sums[i] / sums[i + 1]


def metrics(logits, labels, *, ignore_index=-100, split_every=None):
    """Mean cross entropy, perplexity and accuracy from one read of the logits.

    A dict of lazy 0-d Dask arrays (``"cross_entropy"``, ``"perplexity"``,
    ``"accuracy"``); computed together (``dask.compute(*d.values())``) they
    share one pass over the blocks, so a file is read once.
    """
    x = _logits(logits)
    y = _labels(labels, x)
    ii = _api._check_ignore_index(ignore_index)
    if x.numblocks[1] == 1:
        per_row = da.blockwise(_metrics_rows, "ijp", x, "ij", y, "i", new_axes={"p": 4},
                               adjust_chunks={"j": 1}, dtype=np.float64,
                               ignore_index=ii)[:, 0, :]
    else:
        sums = [(float(ch), ch) for ch in x.chunks[1]]
        packed = da.blockwise(_metrics_block, "ijk", x, "ij", y, "i", _starts_array(x), "j",
                              new_axes={"k": 7}, dtype=np.float64, ignore_index=ii)
        per_row = da.blockwise(_metrics_merge, "ip", packed.rechunk({1: -1}), "ijk", y, "i",
                               new_axes={"p": 4}, dtype=np.float64, concatenate=True,
                               sums=sums, ignore_index=ii)
    totals = per_row.sum(axis=0, split_every=split_every)
    ce = totals.map_blocks(_ratio, 0, drop_axis=0, dtype=np.float64)
    return {"cross_entropy": ce, "perplexity": da.exp(ce),
            "accuracy": totals.map_blocks(_ratio, 2, drop_axis=0, dtype=np.float64)}


def entropy(logits, *, base=None):
    """Entropy of ``softmax`` of each row, lazy: a (rows,) float64 Dask array."""
    x = _logits(logits)
    scale = _api._log_base_scale(base)
    if x.numblocks[1] == 1:
        return da.blockwise(_entropy_rows, "ij", x, "ij", adjust_chunks={"j": 1},
                            dtype=np.float64, base=base)[:, 0]
    packed = da.blockwise(_entropy_block, "ijk", x, "ij", new_axes={"k": 3}, dtype=np.float64,
                          concatenate=True).rechunk({1: -1})
    return da.blockwise(_entropy_merge, "i", packed, "ijk", dtype=np.float64,
                        concatenate=True, scale=scale)


def _entropy_rows(x, base):
    return np.asarray(_entropy(x, base=base), np.float64)[:, None]


def _kl_rows(x, t, target_kind, temperature):
    return np.asarray(_kl_div(x, t, target_kind=target_kind, reduction="none",
                              temperature=temperature), np.float64)[:, None]


def kl_div(logits, target, *, target_kind="probs", reduction="batchmean", temperature=1.0,
           base=None, split_every=None):
    """``fastxent.kl_div`` over 2-D Dask arrays, lazy. Reads whole rows: class
    chunks are merged into one per row block first."""
    x = _logits(logits)
    t = _logits(target, "target")
    if t.shape != x.shape:
        raise ValueError(f"target must have the shape of logits {x.shape}, got {t.shape}")
    reduction = _api._check_reduction(reduction, _api._KL_REDUCTIONS)
    scale = _api._log_base_scale(base)
    if not isinstance(target_kind, str) or target_kind not in _api._KL_OPS:
        raise ValueError(f"target_kind must be one of 'probs', 'log_probs', 'logits'; got {target_kind!r}")
    T = _api._check_temperature(temperature)
    x = x.rechunk({1: -1})
    t = t.rechunk((x.chunks[0], -1))
    rows = da.blockwise(_kl_rows, "ij", x, "ij", t, "ij", adjust_chunks={"j": 1},
                        dtype=np.float64, target_kind=target_kind, temperature=T)[:, 0]
    if reduction == "none":
        return rows * scale if scale != 1.0 else rows
    pairs = da.stack([rows, da.ones_like(rows)], axis=1)
    return _reduce_pairs(pairs, "sum" if reduction == "sum" else "mean", scale, split_every)


# --------------------------------------------------------------------------
# Reading from disk
# --------------------------------------------------------------------------

def rows_per_chunk(num_classes, itemsize, memory_budget, *, class_chunk=None):
    """Rows per block such that one block takes at most a quarter of
    ``memory_budget`` (bytes, or a string such as "512 MiB"): a worker thread
    holds the block it computes on, what the kernels make of it, and the next
    block being read; the quarter leaves room for those and the process."""
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget!r}")
    width = min(num_classes, class_chunk or num_classes)
    rows = budget // 4 // max(1, width * itemsize)
    if rows < 1:
        raise ValueError(f"memory_budget {memory_budget!r} is too small for one row of {width} "
                         f"classes of {itemsize} bytes; pass class_chunk= to split rows")
    return int(rows)


class _NpyRows:
    """A .npy file as an array-like whose every read maps just the rows it
    returns; the mapping goes when the block does, so a worker's resident
    memory holds the blocks in flight, not the file it has read."""

    def __init__(self, path):
        mm = np.load(path, mmap_mode="r")  # reads the header; maps nothing yet
        shape, dtype, self.offset = mm.shape, mm.dtype, mm.offset
        fortran = mm.ndim > 1 and not mm.flags.c_contiguous
        del mm
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: a C-ordered 2-D array is needed, got shape {shape}"
                             f"{' in Fortran order' if fortran else ''}")
        self.path, self.shape, self.dtype, self.ndim = os.fspath(path), tuple(shape), dtype, 2

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("row blocks are contiguous")
        n = max(0, r1 - r0)
        if n == 0:
            return np.empty((0, self.shape[1]), self.dtype)[:, cols]
        mm = np.memmap(self.path, self.dtype, "r", self.offset + r0 * self.shape[1] * self.dtype.itemsize,
                       (n, self.shape[1]))
        return mm[:, cols]


def open_logits(path, *, memory_budget="512 MiB", class_chunk=None):
    """Logits on disk as a lazily read 2-D Dask array chunked for a memory budget.

    ``path`` is a ``.npy`` file (read through a memory map, one per block) or
    a Zarr array (a path, URL or ``zarr.Array``). Blocks hold
    ``rows_per_chunk(...)`` rows and ``class_chunk`` classes (all of them
    by default).
    """
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".npy"):
        src = _NpyRows(path)
        shape, dtype = src.shape, src.dtype
    else:
        import zarr

        src = path if hasattr(path, "shape") else zarr.open_array(path, mode="r")
        shape, dtype = src.shape, np.dtype(src.dtype)
        if len(shape) != 2:
            raise ValueError(f"logits must be a 2-D (rows, classes) array, got shape {shape}")
    rows = rows_per_chunk(shape[1], dtype.itemsize, memory_budget, class_chunk=class_chunk)
    chunks = (min(rows, shape[0]) or 1, class_chunk or shape[1])
    if isinstance(src, _NpyRows):
        return da.from_array(src, chunks=chunks, asarray=False, fancy=False, inline_array=True,
                             name="npy-logits-" + tokenize(src.path, os.path.getmtime(src.path),
                                                           shape, str(dtype), chunks))
    return da.from_zarr(src, chunks=chunks)
