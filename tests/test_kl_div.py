"""kl_div and kl_div_with_grad against fastxent.reference, PyTorch, SciPy and
finite differences.

KL(P || Q) = sum_c P_c (log P_c - log Q_c) with Q = softmax(logits / T) and P
given as probabilities, log-probabilities or logits (softened by the same T),
times T**2.  "batchmean" and "mean" divide by the number of rows; "none" is one
value per row (PyTorch's "none" is elementwise).

The full product dtype x width x layout x target kind x ISA runs on the small
widths, every out= variant and thread count inside each case; the wide widths
(1000, 50257) take every layout with few rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent
from fastxent import _core
from fastxent import reference as ref

from conftest import (
    AVAILABLE_ISAS,
    FLOAT_DTYPES,
    LAYOUTS,
    OUT_KINDS,
    SMALL_WIDTHS,
    THREADS,
    WIDE_WIDTHS,
    assert_bitwise_equal,
    assert_close,
    assert_scalar_of,
    batch_shape,
    call_with_out,
    check_grad,
    compute_dtype,
    grad_scale,
    make_layout,
    random_logits,
    random_probs,
    to_logical,
)

TARGET_KINDS = ("probs", "log_probs", "logits")
REDUCTIONS = ("batchmean", "mean", "sum", "none")
# The reduction each out= variant of the with_grad loop runs with, so that every
# reduction meets the gradient somewhere in the matrix.
GRAD_REDUCTION = {"none": "batchmean", "prealloc": "sum", "inplace": "none"}


# --------------------------------------------------------------- helpers


def make_target(rng, kind, shape, dtype, zeros=False):
    """A target of ``kind`` (class axis last).

    With ``zeros``, one class per row (when there are at least 2) gets
    probability 0: a 0 probability, a -inf log-probability or a -inf logit.
    """
    C = shape[-1]
    if kind == "logits":
        t = random_logits(rng, shape, np.float64)
        if zeros and C >= 2:
            hole = rng.integers(0, C, shape[:-1])
            np.put_along_axis(t, hole[..., None], -np.inf, axis=-1)
        return t.astype(dtype)
    p = random_probs(rng, shape, np.float64)
    if zeros and C >= 2:
        hole = rng.integers(0, C, shape[:-1])
        np.put_along_axis(p, hole[..., None], 0.0, axis=-1)
        p /= p.sum(axis=-1, keepdims=True)
    if kind == "probs":
        return p.astype(dtype)
    with np.errstate(divide="ignore"):
        return np.log(p).astype(dtype)


def lay_out(logical, layout):
    """:func:`make_layout` of a copy: for some shapes a layout is a view of its
    input (an (n, 1) array is already in F order), and out=logits would then
    overwrite the logical array the reference reads."""
    return make_layout(np.array(logical, copy=True), layout)


def default_temperature(kind):
    # The distillation case (target logits) runs softened; the others at T = 1.
    return 2.0 if kind == "logits" else 1.0


def check_loss(got, expected, reduction, ct, batch, what):
    if reduction == "none":
        assert isinstance(got, np.ndarray), f"{what}: {type(got)} is not an array"
        assert got.dtype == ct and got.shape == batch, f"{what}: {got.dtype} {got.shape}"
    else:
        assert_scalar_of(got, ct, what)
    assert_close(got, expected, ct, what=what)


def check_matrix_case(rng, dtype, C, layout, kind, n, threads_list=THREADS):
    ct = compute_dtype(dtype)
    batch = batch_shape(layout, n)
    rows = math.prod(batch)
    shape = batch + (C,)
    T = default_temperature(kind)
    logical = random_logits(rng, shape, dtype)
    target = make_target(rng, kind, shape, dtype, zeros=True)
    kw = dict(target_kind=kind, temperature=T)
    arr, axis = lay_out(logical, layout)
    tarr, _ = lay_out(target, layout)

    # The reference once per case: per-row values and the per-row gradient
    # (grad_output 1), from which every reduction follows.
    ref_rows, ref_grad_rows = ref.kl_div_with_grad(logical, target, reduction="none", **kw)
    total = np.sum(ref_rows)
    expected = {"none": ref_rows, "sum": total, "batchmean": total / rows, "mean": total / rows}

    # ---- loss only, every reduction, the thread counts in turn
    for i, reduction in enumerate(REDUCTIONS):
        threads = threads_list[i % len(threads_list)]
        got = fastxent.kl_div(arr, tarr, axis=axis, reduction=reduction, num_threads=threads, **kw)
        check_loss(got, expected[reduction], reduction, ct, batch, f"{kind} {reduction} threads={threads}")
    assert np.all(np.isfinite(got)), "a finite target and finite logits give a finite KL"

    # ---- loss and gradient: every out= variant with every thread count
    go_rows = rng.uniform(-2.0, 2.0, batch)
    for out_kind in OUT_KINDS:
        reduction = GRAD_REDUCTION[out_kind]
        if reduction == "none":
            go, factor = go_rows, go_rows[..., None]
        else:
            go = 0.75
            factor = go / rows if reduction == "batchmean" else go
        ref_grad = ref_grad_rows * factor
        floor = 1e-6 * T * (1.0 if reduction != "batchmean" else 1.0 / max(rows, 1))
        for threads in threads_list:
            arr, axis = lay_out(logical, layout)
            call = dict(axis=axis, reduction=reduction, grad_output=go, num_threads=threads, **kw)
            what = f"{kind} {out_kind} {reduction} threads={threads}"
            step = call_with_out(lambda out: fastxent.kl_div_with_grad(arr, tarr, out=out, **call),
                                 arr, logical, axis, layout, out_kind, what=what)
            if step is None:
                continue
            (loss, grad), out = step
            check_loss(loss, expected[reduction], reduction, ct, batch, what + " loss")
            check_grad(grad, arr, dtype, out, ref_grad, axis=axis, floor=floor, what=what + " grad")
    assert_bitwise_equal(to_logical(tarr, axis), target, what="target was modified")


# ------------------------------------------------- the layout/threads matrix


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", SMALL_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_widths_full_product(dtype, C, layout, kind, isa, rng):
    check_matrix_case(rng, dtype, C, layout, kind, n=13)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", WIDE_WIDTHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_wide_widths(dtype, C, layout, isa, rng):
    # The target kind and the thread count turn with the ISA, so that over the
    # ISAs every (layout, kind) pair runs once and each ISA meets every kind;
    # this keeps the 50257-wide cases cheap.  The determinism test below
    # compares thread counts and ISAs bitwise.
    i = AVAILABLE_ISAS.index(isa)
    kind = TARGET_KINDS[(LAYOUTS.index(layout) + i) % len(TARGET_KINDS)]
    threads = (THREADS[i % len(THREADS)],)
    check_matrix_case(rng, dtype, C, layout, kind, n=2 if C > 10000 else 9, threads_list=threads)


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_huge_row(dtype, kind, isa, rng):
    """Fewer rows than threads: the row itself is split across threads."""
    C = 200_003
    ct = compute_dtype(dtype)
    z = random_logits(rng, (1, C), dtype)
    target = make_target(rng, kind, (1, C), dtype, zeros=True)
    kw = dict(target_kind=kind, temperature=default_temperature(kind))
    ref_loss, ref_grad = ref.kl_div_with_grad(z, target, **kw)
    results = []
    for threads in THREADS:
        loss, grad = fastxent.kl_div_with_grad(z, target, num_threads=threads, **kw)
        assert_close(loss, ref_loss, ct, what=f"threads={threads}")
        check_grad(grad, z, dtype, None, ref_grad, axis=-1, floor=1e-6)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert_bitwise_equal(loss, results[0][0], what="loss across threads")
        assert_bitwise_equal(grad, results[0][1], what="grad across threads")


# ---------------------------------------------------- options vs reference


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_options_against_reference(dtype, kind, temperature, reduction, isa, rng):
    ct = compute_dtype(dtype)
    for C, base in ((17, None), (1000, 2), (5, 10.0)):
        shape = (3, 7, C)  # batch (3, 7): "batchmean" divides by 21
        z = random_logits(rng, shape, dtype)
        target = make_target(rng, kind, shape, dtype, zeros=True)
        kw = dict(target_kind=kind, temperature=temperature, reduction=reduction, base=base)
        what = f"C={C} base={base}"
        got = fastxent.kl_div(z, target, **kw)
        expected = ref.kl_div(z, target, **kw)
        check_loss(got, expected, reduction, ct, shape[:-1], what)
        go = rng.uniform(0.5, 2.0, shape[:-1]) if reduction == "none" else -1.5
        loss, grad = fastxent.kl_div_with_grad(z, target, grad_output=go, **kw)
        ref_loss, ref_grad = ref.kl_div_with_grad(z, target, grad_output=go, **kw)
        check_loss(loss, ref_loss, reduction, ct, shape[:-1], what + " fused")
        assert_close(loss, got, ct, what=what + " fused loss vs loss-only")
        check_grad(grad, z, dtype, None, ref_grad, axis=-1, floor=1e-6, what=what + " grad")


def test_mean_is_batchmean_and_none_is_per_row(rng):
    z = random_logits(rng, (4, 5, 11), np.float64)
    p = random_probs(rng, (4, 5, 11), np.float64)
    per_row = fastxent.kl_div(z, p, reduction="none")
    assert per_row.shape == (4, 5)
    total = fastxent.kl_div(z, p, reduction="sum")
    assert_close(total, per_row.sum(), np.float64)
    for reduction in ("batchmean", "mean"):
        assert_close(fastxent.kl_div(z, p, reduction=reduction), per_row.sum() / 20, np.float64)
    assert_bitwise_equal(fastxent.kl_div(z, p), fastxent.kl_div(z, p, reduction="batchmean"))
    # Not torch's elementwise "mean" (divided by 220) nor its elementwise "none".
    assert abs(fastxent.kl_div(z, p, reduction="mean") - per_row.sum() / 220) > 1e-3
    # Per row it is exactly the sum of the elementwise terms.
    log_q = ref.log_softmax(z)
    assert_close(per_row, np.sum(p * (np.log(p) - log_q), axis=-1), np.float64)


@pytest.mark.parametrize("base", [2, 10, math.e, 0.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_base_divides_by_log_base(dtype, base, rng):
    ct = compute_dtype(dtype)
    z = random_logits(rng, (9, 13), dtype)
    t = make_target(rng, "logits", (9, 13), dtype)
    kw = dict(target_kind="logits", reduction="none")
    nats = ref.kl_div(z, t, **kw)
    assert_close(fastxent.kl_div(z, t, base=base, **kw), nats / math.log(base), ct)
    _, grad = fastxent.kl_div_with_grad(z, t, base=base, **kw)
    ref_grad = ref.kl_div_with_grad(z, t, **kw)[1] / math.log(base)
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_temperature_scaling(dtype, rng):
    """T softens both sides and scales by T**2: KL at T equals T**2 times KL at
    1 of the logits divided by T; the gradient is T times that gradient."""
    ct = compute_dtype(dtype)
    z = random_logits(rng, (8, 21), np.float64)
    t = random_logits(rng, (8, 21), np.float64)
    T = 4.0  # a power of 2: z / T is exact
    zd, td = z.astype(dtype), t.astype(dtype)
    got = fastxent.kl_div(zd, td, target_kind="logits", temperature=T, reduction="none")
    at_one = ref.kl_div(zd.astype(np.float64) / T, td.astype(np.float64) / T,
                        target_kind="logits", reduction="none")
    assert_close(got, T**2 * at_one, ct)
    _, grad = fastxent.kl_div_with_grad(zd, td, target_kind="logits", temperature=T)
    g1 = ref.kl_div_with_grad(zd.astype(np.float64) / T, td.astype(np.float64) / T,
                              target_kind="logits")[1]
    assert_close(grad, T * g1, ct, scale=grad_scale(T * g1, 1e-6))
    # A probability target is not softened: only the model's side is.
    p = random_probs(rng, (8, 21), dtype)
    got = fastxent.kl_div(zd, p, temperature=T, reduction="none")
    at_one = ref.kl_div(zd.astype(np.float64) / T, p, reduction="none")
    assert_close(got, T**2 * at_one, ct)


# ------------------------------------------------------------- grad_output


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_scalar(dtype, reduction, isa, rng):
    ct = compute_dtype(dtype)
    z = random_logits(rng, (23, 17), dtype)
    t = make_target(rng, "logits", (23, 17), dtype)
    kw = dict(target_kind="logits", temperature=1.5, reduction=reduction)
    go = -2.5
    loss, grad = fastxent.kl_div_with_grad(z, t, grad_output=go, **kw)
    ref_loss, ref_grad = ref.kl_div_with_grad(z, t, grad_output=go, **kw)
    assert_close(loss, ref_loss, ct)
    scale = grad_scale(ref_grad, 1e-6)
    assert_close(grad, ref_grad, ct, scale=scale)
    loss1, grad1 = fastxent.kl_div_with_grad(z, t, **kw)
    assert_bitwise_equal(loss, loss1, what="the loss does not depend on grad_output")
    assert_close(grad, go * grad1.astype(np.float64), ct, scale=scale)
    for other in (np.float32(go), np.float64(go), np.array(go)):
        assert_bitwise_equal(fastxent.kl_div_with_grad(z, t, grad_output=other, **kw)[1], grad)
    assert np.all(fastxent.kl_div_with_grad(z, t, grad_output=0.0, **kw)[1] == 0)


@pytest.mark.parametrize("layout", ["contiguous", "class_first", "axis1_3d", "negative"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_output_per_row(dtype, layout, isa, rng):
    ct = compute_dtype(dtype)
    C = 17
    batch = batch_shape(layout, 23)
    logical = random_logits(rng, batch + (C,), dtype)
    p = make_target(rng, "probs", batch + (C,), dtype, zeros=True)
    go = rng.standard_normal(batch)
    arr, axis = make_layout(logical, layout)
    parr, _ = make_layout(p, layout)
    ref_loss, ref_grad = ref.kl_div_with_grad(logical, p, reduction="none", grad_output=go)
    scale = grad_scale(ref_grad, 1e-6)
    big = np.zeros(tuple(2 * s for s in batch))
    strided_go = big[(slice(None, None, 2),) * len(batch)]
    strided_go[...] = go
    for g in (go, go.astype(dtype), strided_go, go.tolist()):
        loss, grad = fastxent.kl_div_with_grad(arr, parr, axis=axis, reduction="none", grad_output=g)
        assert loss.shape == batch
        assert_close(loss, ref_loss, ct)
        assert_close(to_logical(grad, axis), ref_grad, ct, scale=scale)
    go0 = go.copy()
    go0.reshape(-1)[1::2] = 0
    _, grad = fastxent.kl_div_with_grad(arr, parr, axis=axis, reduction="none", grad_output=go0)
    assert np.all(to_logical(grad, axis).reshape(-1, C)[1::2] == 0)


def test_grad_output_shape_errors(rng):
    z = random_logits(rng, (6, 5), np.float64)
    p = random_probs(rng, (6, 5), np.float64)
    with pytest.raises(ValueError):
        fastxent.kl_div_with_grad(z, p, reduction="batchmean", grad_output=np.ones(6))
    with pytest.raises(ValueError):
        fastxent.kl_div_with_grad(z, p, reduction="none", grad_output=np.ones(5))


# ------------------------------------------------------------ other oracles


def _torch_case(rng, kind, shape, T):
    z = random_logits(rng, shape, np.float64)
    # probs may hold zeros (torch's xlogy handles them); log_probs may not
    # (torch gives NaN for a -inf log-target, see test_minus_inf_log_target).
    target = make_target(rng, kind, shape, np.float64, zeros=(kind == "probs"))
    return z, target


@pytest.mark.parametrize("shape", [(13, 17), (3, 4, 9)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_against_torch(dtype, kind, temperature, shape, rng):
    """Every reduction, loss and autograd gradient, against torch's F.kl_div."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    T = temperature
    ct = compute_dtype(dtype)
    z, target = _torch_case(rng, kind, shape, T)
    z, target = z.astype(dtype), target.astype(dtype)
    rows = math.prod(shape[:-1])
    zt = torch.tensor(z.astype(np.float64), requires_grad=True)
    tt = torch.tensor(target.astype(np.float64))
    log_q = F.log_softmax(zt / T, dim=-1)
    if kind == "probs":
        elementwise = F.kl_div(log_q, tt, reduction="none")
    elif kind == "log_probs":
        elementwise = F.kl_div(log_q, tt, reduction="none", log_target=True)
    else:
        elementwise = F.kl_div(log_q, F.log_softmax(tt / T, dim=-1), reduction="none", log_target=True)
    per_row = elementwise.sum(-1) * T**2
    go_rows = rng.standard_normal(shape[:-1])
    for reduction in REDUCTIONS:
        if reduction == "none":
            expected, go = per_row, go_rows
            t_grad, = torch.autograd.grad(per_row, zt, torch.tensor(go), retain_graph=True)
        else:
            expected = per_row.sum() if reduction == "sum" else per_row.sum() / rows
            go = 0.8
            t_grad, = torch.autograd.grad(expected * go, zt, retain_graph=True)
        loss, grad = fastxent.kl_div_with_grad(z, target, target_kind=kind, temperature=T,
                                               reduction=reduction, grad_output=go)
        check_loss(loss, expected.detach().numpy(), reduction, ct, shape[:-1],
                   f"{reduction} loss vs torch")
        t_grad = t_grad.numpy()
        assert_close(grad, t_grad, ct, scale=grad_scale(t_grad, 1e-6), what=f"{reduction} grad vs torch")
    # torch's own reductions, on 2-D input where its batchmean divides by the rows.
    if len(shape) == 2:
        z64 = torch.tensor(z.astype(np.float64))
        for reduction in ("batchmean", "sum"):
            if kind == "logits":
                t_loss = F.kl_div(F.log_softmax(z64 / T, dim=-1), F.log_softmax(tt / T, dim=-1),
                                  log_target=True, reduction="sum")
                t_loss = t_loss * T**2 / (rows if reduction == "batchmean" else 1)
            else:
                t_loss = F.kl_div(F.log_softmax(z64 / T, dim=-1), tt, reduction=reduction,
                                  log_target=(kind == "log_probs")) * T**2
            got = fastxent.kl_div(z, target, target_kind=kind, temperature=T, reduction=reduction)
            assert_close(got, t_loss.item(), ct, what=f"torch {reduction}")


def test_torch_tensors_as_input(rng):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 10, generator=g)
    t = torch.randn(12, 10, generator=g)
    got = fastxent.kl_div(z, t, target_kind="logits", reduction="none")
    assert_bitwise_equal(got, fastxent.kl_div(z.numpy(), t.numpy(), target_kind="logits", reduction="none"))
    F = torch.nn.functional
    expected = F.kl_div(F.log_softmax(z.double(), -1), F.log_softmax(t.double(), -1),
                        log_target=True, reduction="none").sum(-1)
    assert_close(got, expected.numpy(), np.float32)
    got_t = fastxent.kl_div(z.t(), t.t(), axis=0, target_kind="logits", reduction="none")
    assert_close(got_t, expected.numpy(), np.float32)


@pytest.mark.parametrize("C", [2, 9, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_against_scipy_rel_entr(dtype, C, rng):
    special = pytest.importorskip("scipy.special")
    ct = compute_dtype(dtype)
    z = random_logits(rng, (11, C), dtype)
    p = make_target(rng, "probs", (11, C), dtype, zeros=True)
    p64, z64 = p.astype(np.float64), z.astype(np.float64)
    q = special.softmax(z64, axis=-1)
    per_row = special.rel_entr(p64, q).sum(axis=-1)
    assert_close(fastxent.kl_div(z, p, reduction="none"), per_row, ct)
    assert_close(fastxent.kl_div(z, p), per_row.mean(), ct)
    assert_close(fastxent.kl_div(z, p, reduction="sum", base=2), per_row.sum() / math.log(2), ct)
    with np.errstate(divide="ignore"):
        logp = np.log(p64).astype(dtype)
    per_row_log = special.rel_entr(np.exp(logp.astype(np.float64)), q).sum(axis=-1)
    assert_close(fastxent.kl_div(z, logp, target_kind="log_probs", reduction="none"), per_row_log, ct)
    t = random_logits(rng, (11, C), dtype)
    per_row_t = special.rel_entr(special.softmax(t.astype(np.float64), axis=-1), q).sum(axis=-1)
    assert_close(fastxent.kl_div(z, t, target_kind="logits", reduction="none"), per_row_t, ct)
    # scipy.stats.entropy(p, q) is the same divergence (it renormalises p; ours sum to ~1).
    stats = pytest.importorskip("scipy.stats")
    if dtype == np.float64:
        assert_close(fastxent.kl_div(z, p, reduction="none"), stats.entropy(p64, q, axis=-1), ct)


# ------------------------------------------------------- finite differences


def _fourth_order(f, x, direction, h):
    return (-f(x + 2 * h * direction) + 8 * f(x + h * direction)
            - 8 * f(x - h * direction) + f(x - 2 * h * direction)) / (12 * h)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", TARGET_KINDS + ("unnormalised",))
def test_gradient_finite_differences(kind, temperature, reduction, rng):
    n, C = 4, 6
    x = random_logits(rng, (n, C), np.float64)
    if kind == "unnormalised":  # probabilities summing to 0.7: the gradient is T (q * 0.7 - p)
        target, kind = 0.7 * random_probs(rng, (n, C), np.float64), "probs"
    else:
        target = make_target(rng, kind, (n, C), np.float64, zeros=True)
    kw = dict(target_kind=kind, temperature=temperature, reduction=reduction, base=2)
    h = 1e-3
    if reduction == "none":
        go = rng.uniform(0.5, 2.0, n)
        _, grad = fastxent.kl_div_with_grad(x, target, grad_output=go, **kw)
        for c in range(C):  # a row's value depends on its row only: one column at a time
            e = np.zeros_like(x)
            e[:, c] = 1.0
            fd = _fourth_order(lambda v: fastxent.kl_div(v, target, **kw), x, e, h)
            np.testing.assert_allclose(grad[:, c], go * fd, rtol=1e-7, atol=1e-9, err_msg=f"column {c}")
    else:
        _, grad = fastxent.kl_div_with_grad(x, target, **kw)
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = 1.0
            fd[idx] = _fourth_order(lambda v: float(fastxent.kl_div(v, target, **kw)), x, e, h)
        np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ edges


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_target_where_model_is_zero_contributes_nothing(dtype, kind, isa):
    """0 log 0 = 0 in every form: a class with probability 0 on both sides adds 0."""
    ct = compute_dtype(dtype)
    z = np.array([[0.0, -np.inf, 1.0, -0.5], [2.0, 0.5, -np.inf, -np.inf]], dtype=dtype)
    p = np.array([[0.5, 0.0, 0.25, 0.25], [0.25, 0.75, 0.0, 0.0]])
    with np.errstate(divide="ignore"):
        target = {"probs": p, "log_probs": np.log(p), "logits": np.log(p) + 3.0}[kind].astype(dtype)
    # The same rows without the impossible classes.
    kept = ([0, 2, 3], [0, 1])
    expected = [ref.kl_div(z[[i]][:, c], target[[i]][:, c], target_kind=kind, reduction="sum")
                for i, c in enumerate(kept)]
    got = fastxent.kl_div(z, target, target_kind=kind, reduction="none")
    assert np.all(np.isfinite(got)), got
    assert_close(got, expected, ct)
    assert_close(got, ref.kl_div(z, target, target_kind=kind, reduction="none"), ct)
    loss, grad = fastxent.kl_div_with_grad(z, target, target_kind=kind, reduction="sum")
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(grad[np.isneginf(z)] == 0)
    ref_grad = ref.kl_div_with_grad(z, target, target_kind=kind, reduction="sum")[1]
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))
    # Zero target probability on a class the model finds likely: also just 0.
    z2 = np.array([[3.0, 0.0, 1.0]], dtype=dtype)
    got2 = fastxent.kl_div(z2, target[:1, :3], target_kind=kind, reduction="none")
    assert np.isfinite(got2[0])
    assert_close(got2, ref.kl_div(z2, target[:1, :3], target_kind=kind, reduction="none"), ct)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_minus_inf_log_target(dtype, rng):
    """A -inf log-target contributes 0 (torch's log_target=True gives NaN)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ct = compute_dtype(dtype)
    z = random_logits(rng, (3, 6), dtype)
    p = random_probs(rng, (3, 6), np.float64)
    p[0, 2] = 0.0
    p[2, [0, 5]] = 0.0
    p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_p = np.log(p).astype(dtype)
    got = fastxent.kl_div(z, log_p, target_kind="log_probs", reduction="none")
    assert np.all(np.isfinite(got))
    torch_rows = F.kl_div(F.log_softmax(torch.tensor(z.astype(np.float64)), -1),
                          torch.tensor(log_p.astype(np.float64)), log_target=True,
                          reduction="none").sum(-1).numpy()
    assert np.isnan(torch_rows[0]) and np.isnan(torch_rows[2]), "torch gives NaN here"
    # Where torch is finite, we agree with it; elsewhere with the 0-convention.
    assert_close(got[1], torch_rows[1], ct)
    expected = ref.kl_div(z, log_p, target_kind="log_probs", reduction="none")
    assert np.all(np.isfinite(expected))
    assert_close(got, expected, ct)
    # Same value as the probability form of the same target.
    assert_close(got, ref.kl_div(z, np.exp(log_p.astype(np.float64)), reduction="none"), ct)
    _, grad = fastxent.kl_div_with_grad(z, log_p, target_kind="log_probs")
    assert np.all(np.isfinite(grad))
    ref_grad = ref.kl_div_with_grad(z, log_p, target_kind="log_probs")[1]
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mass_where_model_is_zero_gives_inf(dtype, kind, isa, rng):
    """A positive target probability where softmax(logits) is 0 gives +inf."""
    z = random_logits(rng, (4, 9), dtype)
    z[1, 3] = -np.inf
    target = make_target(rng, kind, (4, 9), dtype)
    got = fastxent.kl_div(z, target, target_kind=kind, reduction="none")
    assert got[1] == np.inf
    assert np.all(np.isfinite(got[[0, 2, 3]]))
    for reduction in ("batchmean", "mean", "sum"):
        assert fastxent.kl_div(z, target, target_kind=kind, reduction=reduction) == np.inf
    loss, grad = fastxent.kl_div_with_grad(z, target, target_kind=kind, reduction="none")
    assert loss[1] == np.inf
    ref_grad = ref.kl_div_with_grad(z, target, target_kind=kind, reduction="none")[1]
    assert_close(grad, ref_grad, compute_dtype(dtype), scale=grad_scale(ref_grad, 1e-6))


@pytest.mark.parametrize("where", ["logits", "target"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("C", [7, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_poisons_its_row_only(dtype, C, kind, where, isa, rng):
    ct = compute_dtype(dtype)
    z = random_logits(rng, (7, C), dtype)
    target = make_target(rng, kind, (7, C), dtype)
    (z if where == "logits" else target)[2, C // 2] = np.nan
    clean = np.delete(np.arange(7), 2)
    got = fastxent.kl_div(z, target, target_kind=kind, reduction="none")
    assert np.isnan(got[2])
    assert_close(got[clean], ref.kl_div(z[clean], target[clean], target_kind=kind, reduction="none"), ct)
    loss, grad = fastxent.kl_div_with_grad(z, target, target_kind=kind, reduction="none")
    assert np.isnan(loss[2]) and np.all(np.isfinite(loss[clean]))
    assert np.all(np.isfinite(grad[clean]))
    ref_grad = ref.kl_div_with_grad(z[clean], target[clean], target_kind=kind, reduction="none")[1]
    assert_close(grad[clean], ref_grad, ct, scale=grad_scale(ref_grad, 1e-6))
    assert np.isnan(fastxent.kl_div(z, target, target_kind=kind))
    assert np.isnan(fastxent.kl_div(z, target, target_kind=kind, reduction="sum"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_identical_distributions_give_zero(dtype, isa, rng):
    ct = compute_dtype(dtype)
    z = random_logits(rng, (6, 33), dtype)
    for kw in (dict(target_kind="logits"), dict(target_kind="logits", temperature=3.0)):
        got = fastxent.kl_div(z, z.copy(), reduction="none", **kw)
        assert_close(got, np.zeros(6), ct)
        _, grad = fastxent.kl_div_with_grad(z, z.copy(), **kw)
        assert_close(grad, np.zeros(z.shape), ct, scale=1.0)
    logq = ref.log_softmax(z)
    got = fastxent.kl_div(z, logq.astype(dtype), target_kind="log_probs", reduction="none")
    assert_close(got, ref.kl_div(z, logq.astype(dtype), target_kind="log_probs", reduction="none"), ct)
    assert np.all(np.abs(got) < 1e-5)


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("C", [7, 17, 1000, 50257])
def test_float32_rows_with_large_common_offset(C, offset, isa, rng):
    n = 2 if C > 10000 else 13
    z = (offset + rng.standard_normal((n, C))).astype(np.float32)
    t = (offset + rng.standard_normal((n, C))).astype(np.float32)
    kw = dict(target_kind="logits", reduction="none")
    assert_close(fastxent.kl_div(z, t, **kw), ref.kl_div(z, t, **kw), np.float32, what="logits target")
    p = random_probs(rng, (n, C), np.float32)
    assert_close(fastxent.kl_div(z, p, reduction="none"), ref.kl_div(z, p, reduction="none"),
                 np.float32, what="probs target")
    loss, grad = fastxent.kl_div_with_grad(z, t, target_kind="logits", temperature=2.0)
    ref_loss, ref_grad = ref.kl_div_with_grad(z, t, target_kind="logits", temperature=2.0)
    assert_close(loss, ref_loss, np.float32)
    assert_close(grad, ref_grad, np.float32, scale=grad_scale(ref_grad, 1e-6))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("C", [7, 17, 1000, 50257])
def test_float32_near_converged_distillation(C, temperature, isa, rng):
    """Student and teacher logits almost equal: the KL is small while each
    side's log-sum-exp is large, and the float32 result must still be within
    a few ulp of max(KL, 1)."""
    n = 2 if C > 10000 else 13
    z = random_logits(rng, (n, C), np.float32)
    t = (z + 0.05 * rng.standard_normal((n, C))).astype(np.float32)
    kw = dict(target_kind="logits", temperature=temperature)
    expected = ref.kl_div(z, t, reduction="none", **kw)
    assert np.all(expected < 0.05)
    assert_close(fastxent.kl_div(z, t, reduction="none", **kw), expected, np.float32)
    loss, grad = fastxent.kl_div_with_grad(z, t, reduction="sum", **kw)
    ref_loss, ref_grad = ref.kl_div_with_grad(z, t, reduction="sum", **kw)
    assert_close(loss, ref_loss, np.float32)
    # The gradient T (q - p) cancels: it is accurate to a few ulp of the
    # probabilities it is formed from, not of the (small) difference.
    terms = temperature * max(float(ref.softmax(z / np.float32(temperature)).max()),
                              float(ref.softmax(t / np.float32(temperature)).max()))
    assert_close(grad, ref_grad, np.float32, scale=terms)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_batch(dtype):
    ct = compute_dtype(dtype)
    x = np.zeros((0, 5), dtype=dtype)
    for kind in TARGET_KINDS:
        for reduction in ("batchmean", "mean"):
            got = fastxent.kl_div(x, x, target_kind=kind, reduction=reduction)
            assert_scalar_of(got, ct)
            assert np.isnan(got)
        total = fastxent.kl_div(x, x, target_kind=kind, reduction="sum")
        assert_scalar_of(total, ct)
        assert total == 0
        none = fastxent.kl_div(x, x, target_kind=kind, reduction="none")
        assert none.shape == (0,) and none.dtype == ct
        loss, grad = fastxent.kl_div_with_grad(x, x.copy(), target_kind=kind)
        assert np.isnan(loss) and grad.shape == (0, 5) and grad.dtype == dtype
        loss, grad = fastxent.kl_div_with_grad(x, x.copy(), target_kind=kind, reduction="sum")
        assert loss == 0 and grad.shape == (0, 5)
    x3 = np.zeros((2, 5, 0), dtype=dtype)
    assert fastxent.kl_div(x3, x3, axis=1, reduction="none").shape == (2, 0)


def test_one_dimensional_input(rng):
    z = random_logits(rng, (9,), np.float64)
    p = random_probs(rng, (9,), np.float64)
    got = fastxent.kl_div(z, p, reduction="none")
    assert np.shape(got) == ()
    expected = ref.kl_div(z[None], p[None], reduction="none")[0]
    assert_close(float(got), expected, np.float64)
    assert_close(fastxent.kl_div(z, p), expected, np.float64)
    loss, grad = fastxent.kl_div_with_grad(z, p)
    assert grad.shape == (9,)
    assert_close(grad, ref.kl_div_with_grad(z[None], p[None])[1][0], np.float64, scale=1.0)


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_any_axis_of_3d(axis, rng):
    x = random_logits(rng, (4, 5, 6), np.float64)
    t = random_logits(rng, (4, 5, 6), np.float64)
    kw = dict(target_kind="logits", temperature=1.5)
    got = fastxent.kl_div(x, t, axis=axis, reduction="none", **kw)
    expected = ref.kl_div(x, t, axis=axis, reduction="none", **kw)
    assert got.shape == tuple(s for i, s in enumerate(x.shape) if i != axis % 3)
    assert_close(got, expected, np.float64)
    _, grad = fastxent.kl_div_with_grad(x, t, axis=axis, **kw)
    ref_grad = ref.kl_div_with_grad(x, t, axis=axis, **kw)[1]
    assert_close(grad, ref_grad, np.float64, scale=grad_scale(ref_grad, 1e-6))


# ------------------------------------------------------------- inputs, out=


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_is_logits_in_place(dtype, rng):
    ct = compute_dtype(dtype)
    x = random_logits(rng, (64, 50), dtype)
    t = make_target(rng, "logits", (64, 50), dtype)
    ref_loss, ref_grad = ref.kl_div_with_grad(x.copy(), t, target_kind="logits", temperature=2.0)
    buf = x
    loss, grad = fastxent.kl_div_with_grad(buf, t, target_kind="logits", temperature=2.0, out=buf)
    assert grad is buf or (np.shares_memory(grad, buf) and grad.shape == buf.shape)
    assert_close(loss, ref_loss, ct)
    assert_close(buf, ref_grad, ct, scale=grad_scale(ref_grad, 1 / 64))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out_prealloc_strided(dtype, rng):
    ct = compute_dtype(dtype)
    x = random_logits(rng, (20, 33), dtype)
    p = random_probs(rng, (20, 33), dtype)
    ref_grad = ref.kl_div_with_grad(x, p)[1]
    for out in (np.empty((33, 20), dtype).T, np.full((20, 70), np.nan, dtype)[:, ::2][:, :33],
                np.empty((20, 33), dtype)[::-1]):
        _, grad = fastxent.kl_div_with_grad(x, p, out=out)
        assert np.shares_memory(grad, out)
        assert_close(out, ref_grad, ct, scale=grad_scale(ref_grad, 1 / 20))


def test_bad_out_and_options(rng):
    x = random_logits(rng, (6, 5), np.float32)
    p = random_probs(rng, (6, 5), np.float32)
    for out in (np.empty((6, 5), np.float64), np.empty((5, 6), np.float32)):
        with pytest.raises(ValueError):
            fastxent.kl_div_with_grad(x, p, out=out)
    ro = np.empty((6, 5), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        fastxent.kl_div_with_grad(x, p, out=ro)
    with pytest.raises(ValueError):
        fastxent.kl_div(x, p, target_kind="probabilities")
    with pytest.raises(ValueError):
        fastxent.kl_div(x, p, reduction="elementwise")
    with pytest.raises(ValueError):
        fastxent.kl_div(x, p[:, :4])
    with pytest.raises(ValueError):
        fastxent.kl_div(x, p, base=-2)


def test_mixed_target_dtype(rng):
    """A target of another float dtype than the logits is accepted."""
    x = random_logits(rng, (20, 9), np.float32)
    p64 = random_probs(rng, (20, 9), np.float64)
    # Casting the target to float32 costs half an ulp of each term: inside 8 ulp.
    assert_close(fastxent.kl_div(x, p64), ref.kl_div(x, p64), np.float32)
    x64 = x.astype(np.float64)
    p32 = p64.astype(np.float32)
    assert_close(fastxent.kl_div(x64, p32), ref.kl_div(x64, p32), np.float64)


@pytest.mark.parametrize("kind", ["probs", "log_probs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_target_terms_vector_and_library_blocks(dtype, kind, isa, rng):
    """Targets are taken 8 at a time by the vector log/exp; a block holding a
    value they do not cover (subnormal p, log p > 0, NaN) goes through the C
    library. Rows mix both kinds of block and a tail (C = 37)."""
    C = 37
    z = random_logits(rng, (6, C), dtype)
    p = random_probs(rng, (6, C), dtype)
    p[0, 3] = 0.0  # zero: vector block
    p[1, 9] = np.finfo(dtype).smallest_subnormal * 4  # library block
    p[2, 36] = 0.0  # tail
    p[3, :] = 0.0
    p[3, 20] = 1.0  # one-hot
    with np.errstate(divide="ignore"):
        t = p if kind == "probs" else np.log(p)
    if kind == "log_probs":
        t[4, 17] = 0.25  # log p > 0: not a probability, still computed
    ct = compute_dtype(dtype)
    got = fastxent.kl_div(z, t, target_kind=kind, reduction="none")
    want = ref.kl_div(z, t, target_kind=kind, reduction="none")
    assert_close(got, want, ct)
    loss, grad = fastxent.kl_div_with_grad(z, t, target_kind=kind, reduction="sum")
    ref_loss, ref_grad = ref.kl_div_with_grad(z, t, target_kind=kind, reduction="sum")
    assert_close(loss, ref_loss, ct)
    assert_close(grad, ref_grad, ct, scale=grad_scale(ref_grad, 1e-3))
    t[5, 30] = np.nan  # NaN poisons its row only
    got = fastxent.kl_div(z, t, target_kind=kind, reduction="none")
    assert np.isnan(got[5]) and np.all(np.isfinite(got[:5]))


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("shape", [(257, 1000), (64, 17), (3, 50257), (1, 100003)],
                         ids=["many_rows", "narrow", "vocab", "one_row"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitwise_identical_across_threads_and_isas(dtype, shape, rng):
    z = random_logits(rng, shape, dtype)
    z[0, 0] = -np.inf
    t = make_target(rng, "logits", shape, dtype, zeros=True)
    p = make_target(rng, "probs", shape, dtype, zeros=True)
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    previous = _core.get_isa()
    baseline = None
    try:
        for name in AVAILABLE_ISAS:
            _core.set_isa(name)
            for threads in (1, 2, 3, 4, None):
                kw = dict(num_threads=threads)
                results = {
                    "logits": fastxent.kl_div(z, t, target_kind="logits", temperature=2.0,
                                              reduction="none", **kw),
                    "probs_grad": fastxent.kl_div_with_grad(z, p, **kw),
                    "log_probs_grad": fastxent.kl_div_with_grad(z, lp, target_kind="log_probs", **kw),
                    "logits_grad": fastxent.kl_div_with_grad(z, t, target_kind="logits", **kw),
                }
                if baseline is None:
                    baseline = results
                    continue
                for key, value in results.items():
                    where = f"{key} isa={name} threads={threads}"
                    if isinstance(value, tuple):
                        assert_bitwise_equal(value[0], baseline[key][0], what=f"{where} loss")
                        assert_bitwise_equal(value[1], baseline[key][1], what=f"{where} grad")
                    else:
                        assert_bitwise_equal(value, baseline[key], what=where)
    finally:
        _core.set_isa(previous)
