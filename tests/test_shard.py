"""Vocabulary-sharded cross entropy: shard_stats, the merge, shard_grad.

The oracle is the unsharded computation: ``fastxent.reference`` (float64)
on the whole rows, and ``fastxent.cross_entropy`` itself.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastxent
from fastxent import reference

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])

# (rtol of losses, rtol of gradients relative to their largest entry)
TOL = {np.dtype(np.float32): (2e-6, 2e-6), np.dtype(np.float64): (1e-12, 1e-12),
       np.dtype(np.float16): (2e-6, 2.0**-10)}
if BF16 is not None:
    TOL[BF16] = (2e-6, 2.0**-7)


def _splits(c, k, rng):
    """k contiguous, uneven shards of [0, c) as boundaries."""
    cuts = np.sort(rng.choice(np.arange(1, c), size=k - 1, replace=False))
    return [0, *cuts.tolist(), c]


def _sharded(x, y, bounds, axis=-1, num_threads=None, **opts):
    """(loss, grad) of the whole rows from shard computations alone."""
    weight = opts.get("weight")
    C = x.shape[axis]
    xs = [np.take(x, np.arange(a, b), axis=axis) for a, b in zip(bounds, bounds[1:])]
    stats = [fastxent.shard_stats(s, y, vocab_start=a, axis=axis, weight=weight,
                                  num_threads=num_threads)
             for s, a in zip(xs, bounds)]
    merged = fastxent.combine_shard_stats(stats)
    loss = fastxent.shard_loss(merged, y, **opts)
    grads = [fastxent.shard_grad(s, y, merged.lse, vocab_start=a, num_classes=C, axis=axis,
                                 num_threads=num_threads, **opts)
             for s, a in zip(xs, bounds)]
    return loss, np.concatenate(grads, axis=axis)


def _data(rng, n, c, dtype, offset=0.0):
    x = (rng.standard_normal((n, c)) * 3 + offset).astype(dtype)
    y = rng.integers(0, c, size=n)
    return x, y


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"weight": "w"},
    {"weight": "w", "label_smoothing": 0.25, "reduction": "none"},
    {"ignore_index": 3},
    {"base": 2, "reduction": "sum"},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sharded_equals_unsharded(dtype, opts, shards):
    rng = np.random.default_rng(shards)
    n, c = 37, 300
    x, y = _data(rng, n, c, dtype)
    opts = dict(opts)
    y[::5] = opts.get("ignore_index", -100)
    if opts.get("weight") == "w":
        opts["weight"] = rng.uniform(0, 2, c).astype(np.float32)
    bounds = _splits(c, shards, rng)
    loss, grad = _sharded(x, y, bounds, **opts)
    ref_loss, ref_grad = reference.cross_entropy_with_grad(x, y, **opts)
    lt, gt = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(loss, ref_loss, rtol=lt, atol=lt)
    assert grad.dtype == np.dtype(dtype) and grad.shape == x.shape
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=0,
                               atol=gt * np.abs(ref_grad).max())
    # the library's own unsharded result agrees too
    fl, fg = fastxent.cross_entropy_with_grad(x, y, **opts)
    np.testing.assert_allclose(loss, fl, rtol=max(lt, 1e-6), atol=max(lt, 1e-6))


def test_class_axis_and_batch_shape():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50, 4))  # (B, C, T), classes on axis 1
    y = rng.integers(0, 50, size=(3, 4))
    loss, grad = _sharded(x, y, [0, 13, 50], axis=1, reduction="none")
    ref = reference.cross_entropy(x, y, axis=1, reduction="none")
    assert loss.shape == (3, 4)
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    np.testing.assert_allclose(grad, reference.cross_entropy_with_grad(x, y, axis=1, reduction="none")[1],
                               atol=1e-14)


def test_large_offset_keeps_digits():
    """Every logit shifted by 1e4 in float32: the loss keeps its digits."""
    rng = np.random.default_rng(2)
    x, y = _data(rng, 16, 200, np.float32, offset=1e4)
    loss, grad = _sharded(x, y, [0, 64, 65, 200], reduction="none")
    ref, ref_grad = reference.cross_entropy_with_grad(x, y, reduction="none")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def test_bitwise_whatever_the_thread_count():
    rng = np.random.default_rng(3)
    x, y = _data(rng, 64, 3000, np.float32)
    bounds = [0, 1000, 1001, 3000]
    base = _sharded(x, y, bounds, num_threads=1, label_smoothing=0.1)
    for nt in (2, None):
        other = _sharded(x, y, bounds, num_threads=nt, label_smoothing=0.1)
        assert other[0].tobytes() == base[0].tobytes()
        assert other[1].tobytes() == base[1].tobytes()


def test_reduced_stats_equal_the_list_merge():
    """MAX of the maxima, rescale, SUM of the fields: what an all-reduce does."""
    rng = np.random.default_rng(4)
    x, y = _data(rng, 20, 90, np.float64)
    w = rng.uniform(0.1, 1, 90)
    bounds = [0, 30, 31, 90]
    stats = [fastxent.shard_stats(x[:, a:b], y, vocab_start=a, weight=w)
             for a, b in zip(bounds, bounds[1:])]
    M = np.max([s.max for s in stats], axis=0)
    scaled = [fastxent.rescale_shard_stats(s, M) for s in stats]
    reduced = fastxent.ShardStats(
        M, *(np.sum([getattr(s, f) for s in scaled], axis=0)
             for f in ("sumexp", "target_logit", "in_shard", "logit_sum", "weight_sum",
                       "num_classes")))
    reduced = reduced._replace(in_shard=reduced.in_shard.astype(bool),
                               num_classes=int(reduced.num_classes))
    merged = fastxent.combine_shard_stats(stats)
    np.testing.assert_allclose(fastxent.combine_shard_stats(reduced).lse, merged.lse, rtol=1e-15)
    opts = {"weight": w, "label_smoothing": 0.3}
    np.testing.assert_allclose(fastxent.shard_loss(reduced, y, **opts),
                               reference.cross_entropy(x, y, **opts), rtol=1e-13)
    np.testing.assert_allclose(merged.lse, reference.logsumexp(x), rtol=1e-15)


def test_merge_order_does_not_matter_beyond_rounding():
    rng = np.random.default_rng(5)
    x, y = _data(rng, 10, 40, np.float64)
    stats = [fastxent.shard_stats(x[:, a:a + 10], y, vocab_start=a) for a in range(0, 40, 10)]
    a = fastxent.combine_shard_stats(stats)
    b = fastxent.combine_shard_stats(stats[::-1])
    np.testing.assert_allclose(a.lse, b.lse, rtol=1e-15)
    np.testing.assert_array_equal(a.target_logit, b.target_logit)


def test_grad_parts_replace_the_logits():
    rng = np.random.default_rng(6)
    x, y = _data(rng, 12, 100, np.float32)
    w = rng.uniform(0.5, 1.5, 100)
    opts = {"weight": w, "label_smoothing": 0.1}
    parts, grads = [], []
    for a, b in ((0, 40), (40, 100)):
        st, gp = fastxent.shard_stats(x[:, a:b], y, vocab_start=a, weight=w,
                                      return_grad_parts=True)
        np.testing.assert_allclose(gp.exp, np.exp(x[:, a:b] - st.max[:, None]), rtol=1e-6)
        parts.append((a, st, gp))
    merged = fastxent.combine_shard_stats([p[1] for p in parts])
    for a, _, gp in parts:
        grads.append(fastxent.shard_grad(None, y, merged.lse, vocab_start=a, grad_parts=gp,
                                         out=gp.exp, **opts))
        assert grads[-1] is gp.exp  # in place
    ref = reference.cross_entropy_with_grad(x, y, **opts)[1]
    np.testing.assert_allclose(np.concatenate(grads, 1), ref, atol=1e-7)


def test_inplace_out_is_the_logits():
    rng = np.random.default_rng(7)
    x, y = _data(rng, 8, 60, np.float32)
    ref = reference.cross_entropy_with_grad(x, y)[1]
    merged = fastxent.combine_shard_stats(
        [fastxent.shard_stats(x[:, :30], y, vocab_start=0),
         fastxent.shard_stats(x[:, 30:], y, vocab_start=30)])
    left = np.ascontiguousarray(x[:, :30])
    res = fastxent.shard_grad(left, y, merged.lse, vocab_start=0, out=left)
    assert res is left
    np.testing.assert_allclose(left, ref[:, :30], atol=1e-7)


def test_every_row_ignored():
    rng = np.random.default_rng(8)
    x, _ = _data(rng, 4, 10, np.float64)
    y = np.full(4, -100)
    merged = fastxent.combine_shard_stats([fastxent.shard_stats(x, y, vocab_start=0)])
    assert np.isnan(fastxent.shard_loss(merged, y))
    assert fastxent.shard_loss(merged, y, reduction="sum") == 0
    assert not fastxent.shard_grad(x, y, merged.lse, vocab_start=0).any()


def test_minus_inf_logits_and_a_shard_of_them():
    x = np.array([[0.0, 1.0, -np.inf, -np.inf], [2.0, -np.inf, -np.inf, -np.inf]])
    y = np.array([1, 0])
    loss, grad = _sharded(x, y, [0, 2, 4], reduction="none")
    ref, ref_grad = reference.cross_entropy_with_grad(x, y, reduction="none")
    np.testing.assert_allclose(loss, ref, rtol=1e-15)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-15)


@pytest.mark.parametrize("call, match", [
    (lambda x, y: fastxent.shard_stats(x, y, vocab_start=-1), "vocab_start"),
    (lambda x, y: fastxent.shard_stats(x, y, vocab_start=1.5), "vocab_start"),
    (lambda x, y: fastxent.shard_stats(x, y, vocab_start=5, num_classes=12), "does not fit"),
    (lambda x, y: fastxent.shard_stats(x, y + 100, vocab_start=0, num_classes=20), "label 10"),
    (lambda x, y: fastxent.shard_stats(x, y[:2], vocab_start=0), "batch shape"),
    (lambda x, y: fastxent.shard_stats(x, y.astype(float), vocab_start=0), "integer"),
    (lambda x, y: fastxent.shard_stats(x, y, vocab_start=0, out=np.empty_like(x)),
     "return_grad_parts"),
    (lambda x, y: fastxent.shard_stats(x, y, vocab_start=0, weight=np.ones(3)), "num_classes"),
    (lambda x, y: fastxent.shard_grad(x, y, np.zeros(4), vocab_start=0, label_smoothing=0.1),
     "num_classes"),
    (lambda x, y: fastxent.shard_grad(x, y, np.zeros(3), vocab_start=0), "global_lse"),
    (lambda x, y: fastxent.combine_shard_stats([]), "at least one"),
    (lambda x, y: fastxent.combine_shard_stats([1]), "ShardStats"),
])
def test_bad_input(call, match):
    x = np.zeros((4, 8))
    y = np.arange(4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, y)


def test_overlapping_and_missing_shards():
    x = np.zeros((2, 8))
    y = np.array([1, 7])
    a = fastxent.shard_stats(x[:, :4], y, vocab_start=0)
    with pytest.raises(ValueError, match="overlap"):
        fastxent.combine_shard_stats([a, a])
    with pytest.raises(ValueError, match="falls in no shard|out of range"):
        fastxent.shard_loss([a], y)


def test_stash_in_place_keeps_the_target_logits():
    """out=logits: the exponentials overwrite the logits, the target logits
    are read first."""
    rng = np.random.default_rng(9)
    x, y = _data(rng, 6, 40, np.float32)
    y[2] = -100
    want = fastxent.shard_stats(x, y, vocab_start=0)
    xx = x.copy()
    st, parts = fastxent.shard_stats(xx, y, vocab_start=0, return_grad_parts=True, out=xx)
    assert parts.exp is xx
    np.testing.assert_array_equal(st.target_logit, want.target_logit)
    np.testing.assert_array_equal(st.in_shard, [True, True, False, True, True, True])
    np.testing.assert_allclose(xx, np.exp(x - want.max[:, None]), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)
def test_grad_parts_of_16bit_logits_are_float32(dtype):
    rng = np.random.default_rng(10)
    x, y = _data(rng, 5, 30, dtype)
    st, parts = fastxent.shard_stats(x, y, vocab_start=0, return_grad_parts=True)
    assert parts.exp.dtype == np.float32
    merged = fastxent.combine_shard_stats([st])
    g = fastxent.shard_grad(None, y, merged.lse, vocab_start=0, grad_parts=parts)
    ref = reference.cross_entropy_with_grad(x, y)[1]
    np.testing.assert_allclose(g, ref, atol=1e-7)


def test_logit_sums_are_needed_for_smoothing_only():
    rng = np.random.default_rng(11)
    x, y = _data(rng, 5, 30, np.float64)
    stats = [fastxent.shard_stats(x[:, :10], y, vocab_start=0, logit_sum=False),
             fastxent.shard_stats(x[:, 10:], y, vocab_start=10, logit_sum=False)]
    merged = fastxent.combine_shard_stats(stats)
    assert merged.logit_sum is None
    np.testing.assert_allclose(fastxent.shard_loss(merged, y), reference.cross_entropy(x, y),
                               rtol=1e-13)
    with pytest.raises(ValueError, match="logit_sum=True"):
        fastxent.shard_loss(merged, y, label_smoothing=0.1)


def test_bitwise_on_every_instruction_set():
    """The shard kernels give the same bits on every ISA the machine runs."""
    from conftest import each_isa

    rng = np.random.default_rng(12)
    x, y = _data(rng, 33, 2100, np.float32)
    w = rng.uniform(0.5, 1.5, 2100).astype(np.float32)
    results = []
    for _ in each_isa():
        st = fastxent.shard_stats(x[:, 100:], y, vocab_start=100, weight=w)
        g = fastxent.shard_grad(x[:, 100:], y, st.lse + 0.25, vocab_start=100, weight=w,
                                label_smoothing=0.1)
        results.append(b"".join(np.ascontiguousarray(a).tobytes() for a in (*st[:5], g)))
    assert len(set(results)) == 1


def test_one_shard_holding_the_row_has_cross_entropys_statistics():
    """A single shard computes m, s and the smoothing sum with cross_entropy's
    own row code: its loss matches cross_entropy's to the last float32 bit."""
    rng = np.random.default_rng(13)
    x, y = _data(rng, 40, 3000, np.float32)
    merged = fastxent.combine_shard_stats([fastxent.shard_stats(x, y, vocab_start=0)])
    got = fastxent.shard_loss(merged, y, reduction="none").astype(np.float32)
    want = fastxent.cross_entropy(x, y, reduction="none")
    np.testing.assert_array_max_ulp(got, want, maxulp=1)
