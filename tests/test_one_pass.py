"""One-pass row statistics (csrc/rows/stats.h, group_lse): the loss (label
smoothing and the z-loss too), logsumexp, log_softmax, softmax and entropy read a row once, summing exp(x - b) for a base b
that is raised only when an element exceeds it by more than FX_LSE_T (16).

These rows make the base move: ramps (a raise every few vectors), late
spikes, a first vector of -inf, huge offsets, values near the float range,
+inf and NaN after the first vector. Each is checked against the reference
and for the same bits on every ISA, thread count and row split (rows of
65536 or more classes split across threads when there are fewer rows than
threads, at group boundaries)."""
import numpy as np
import pytest

import fastxent
from fastxent import _core, reference
from conftest import assert_bitwise_equal, assert_close, compute_dtype, each_isa

# 16 classes a vector (float32), 4096 a group: widths inside one vector,
# one chunk, one group, and several groups (70000 splits across threads).
WIDTHS = (40, 128, 1000, 5000, 70000)


def _row(kind, n, rng):
    if kind == "ramp":  # every pair of vectors raises the base
        return np.arange(n) * 0.75
    if kind == "ramp_down":
        return -np.arange(n) * 0.75
    if kind == "late_spike":  # one raise, far into the row (another group for n > 4096)
        x = rng.standard_normal(n)
        x[(2 * n) // 3] = 60.0
        x[n // 5] = 30.0
        return x
    if kind == "masked":  # -inf but the target: the loss must be exactly 0
        x = np.full(n, -np.inf)
        x[n - 3] = 0.5
        return x
    if kind == "masked_first_vector":
        x = rng.standard_normal(n)
        x[:16] = -np.inf
        return x
    if kind == "offset":  # every logit shares a large offset
        return 1e4 + rng.standard_normal(n)
    if kind == "huge":  # near the float32 range: bases must not overflow
        x = rng.uniform(0, 3e38, n)
        x[n // 2] = 3.4e38
        return x
    if kind == "posinf_late":
        x = rng.standard_normal(n)
        x[n - 1] = np.inf
        return x
    if kind == "nan_late":
        x = rng.standard_normal(n)
        x[n - 2] = np.nan
        return x
    if kind == "negnan_late":  # a NaN with the sign bit set (x86's inf - inf)
        x = rng.standard_normal(n)
        x[n - 5] = -np.nan
        return x
    if kind == "wide_range":
        return rng.standard_normal(n) * 40
    if kind == "peaked":  # the heaviest class far above the first vector's base
        x = rng.standard_normal(n)
        x[:16] -= 15.9
        x[n // 2] += 25.0
        return x
    raise ValueError(kind)


KINDS = ("ramp", "ramp_down", "late_spike", "masked", "masked_first_vector", "offset", "huge",
         "posinf_late", "nan_late", "negnan_late", "wide_range", "peaked")


def _batch(n, dtype, rng):
    with np.errstate(over="ignore"):  # float16: the huge row is +inf
        x = np.stack([_row(k, n, rng) for k in KINDS]).astype(dtype)
    y = rng.integers(0, n, len(KINDS))
    y[KINDS.index("masked")] = n - 3
    return x, y


def _results(x, y, threads):
    kw = {"num_threads": threads}
    loss, grad = fastxent.cross_entropy_with_grad(x, y, reduction="none", **kw)
    loss_s, grad_s = fastxent.cross_entropy_with_grad(x, y, reduction="none", label_smoothing=0.1, **kw)
    with np.errstate(over="ignore"):  # the huge row's z-loss, 1e-3 lse^2, is past float32
        loss_z, grad_z = fastxent.cross_entropy_with_grad(x, y, reduction="none", z_loss=1e-3, **kw)
        ce_z = fastxent.cross_entropy(x, y, reduction="none", z_loss=1e-3, **kw)
    inplace = x.copy()
    loss_ip, _ = fastxent.cross_entropy_with_grad(inplace, y, reduction="none", out=inplace, **kw)
    return {
        "ce": fastxent.cross_entropy(x, y, reduction="none", **kw),
        "lse": fastxent.logsumexp(x, **kw),
        "log_softmax": fastxent.log_softmax(x, **kw),
        "softmax": fastxent.softmax(x, **kw),
        "entropy": fastxent.entropy(x, **kw),
        "ce_smooth": fastxent.cross_entropy(x, y, reduction="none", label_smoothing=0.1, **kw),
        "ce_z": ce_z,
        "fused_z_loss": loss_z,
        "fused_z_grad": grad_z,
        "fused_smooth_loss": loss_s,
        "fused_smooth_grad": grad_s,
        "fused_loss": loss,
        "fused_grad": grad,
        "fused_loss_inplace": loss_ip,
        "fused_grad_inplace": inplace,
    }


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_the_reference(n, dtype, isa, rng):
    x, y = _batch(n, dtype, rng)
    ct = compute_dtype(dtype)
    got = _results(x, y, 1)
    ref_ce = reference.cross_entropy(x, y, reduction="none")
    ref_lse = reference.logsumexp(x)
    ref_lsm = reference.log_softmax(x)
    ref_sm = reference.softmax(x)
    ref_ent = reference.entropy(x)
    _, ref_grad = reference.cross_entropy_with_grad(x, y, reduction="none")
    ref_ces = reference.cross_entropy(x, y, reduction="none", label_smoothing=0.1)
    _, ref_grads = reference.cross_entropy_with_grad(x, y, reduction="none", label_smoothing=0.1)
    ref_cez = reference.cross_entropy(x, y, reduction="none", z_loss=1e-3)
    _, ref_gradz = reference.cross_entropy_with_grad(x, y, reduction="none", z_loss=1e-3)
    huge = KINDS.index("huge")
    for i, kind in enumerate(KINDS):
        # Losses of rows whose logits are ~1e38 apart are ~1e38: scale by the row.
        scale = max(1.0, float(np.nanmax(np.abs(x[i][np.isfinite(x[i])]), initial=0.0))) if i == huge else 1.0
        what = f"{kind} n={n} {isa}"
        assert_close(got["ce"][i], ref_ce[i], ct, scale=scale, what="ce " + what)
        assert_close(got["lse"][i], ref_lse[i], ct, scale=scale, what="lse " + what)
        assert_close(got["log_softmax"][i], ref_lsm[i], ct, scale=scale, ulps=16,
                     what="log_softmax " + what)
        assert_close(got["softmax"][i], ref_sm[i], ct, scale=1.0 / n, ulps=16, what="softmax " + what)
        assert_close(got["entropy"][i], ref_ent[i], ct, what="entropy " + what)
        assert_close(got["fused_loss"][i], ref_ce[i], ct, scale=scale, what="fused loss " + what)
        assert_close(got["fused_grad"][i], ref_grad[i], ct, scale=1.0 / n, ulps=16,
                     what="fused grad " + what)
        assert_close(got["ce_smooth"][i], ref_ces[i], ct, scale=scale, what="smoothed ce " + what)
        assert_close(got["fused_smooth_loss"][i], ref_ces[i], ct, scale=scale,
                     what="smoothed fused loss " + what)
        assert_close(got["fused_smooth_grad"][i], ref_grads[i], ct, scale=1.0 / n, ulps=16,
                     what="smoothed fused grad " + what)
        # The z-loss is 1e-3 lse^2: ~1e73 at the huge row's lse of 3e38.
        if i != huge:
            assert_close(got["ce_z"][i], ref_cez[i], ct, what="z-loss ce " + what)
            assert_close(got["fused_z_loss"][i], ref_cez[i], ct, what="z-loss fused loss " + what)
            assert_close(got["fused_z_grad"][i], ref_gradz[i], ct, scale=1.0 / n, ulps=16,
                         what="z-loss fused grad " + what)
        for key in ("fused_loss", "fused_grad"):
            assert_bitwise_equal(got[key + "_inplace"][i], got[key][i], what=f"{key} in place {what}")
    assert got["ce"][KINDS.index("masked")] == 0.0


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_same_bits_on_every_isa_and_thread_count(n, dtype, rng):
    x, y = _batch(n, dtype, rng)
    baseline = None
    for name in each_isa():
        for threads in (1, 2, 3):
            res = _results(x, y, threads)
            # One row at a time: a row alone with several threads is split.
            for i in (0, 2, 4, 7, 9):
                for key, value in _results(x[i : i + 1], y[i : i + 1], threads).items():
                    res[f"{key}_row{i}"] = value
            if baseline is None:
                baseline = res
                continue
            for key, value in res.items():
                assert_bitwise_equal(value, baseline[key], what=f"{key} n={n} isa={name} threads={threads}")
    for i in (0, 2, 4, 7, 9):
        for key in ("ce", "lse", "log_softmax", "softmax", "entropy", "fused_loss", "fused_grad",
                    "ce_smooth", "fused_smooth_loss", "fused_smooth_grad", "ce_z", "fused_z_loss",
                    "fused_z_grad"):
            assert_bitwise_equal(baseline[f"{key}_row{i}"], baseline[key][i : i + 1], what=f"{key} row {i} alone")


def test_exp_kernel_above_zero_within_an_ulp():
    """The one-pass sums evaluate exp at arguments up to FX_LSE_T = 16."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(0, 16, 2_000_000), np.linspace(0, 16, 100_001)]).astype(np.float32)
    got = _core.expm(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - ref) / ulp) <= 1.0
    x64 = rng.uniform(0, 16, 1_000_000)
    got64 = _core.expm(x64)
    assert np.max(np.abs(got64 - np.exp(x64)) / np.exp(x64)) <= 2.5 * np.finfo(np.float64).eps
    for name in each_isa():
        assert_bitwise_equal(_core.expm(x), got.astype(np.float32), what=name)


# ------------------------------------------------------------ KL divergence

# KL (csrc/rows/kl.h, kl_block) reads the student's row, and a logits
# target's, once, in blocks of 1024 whose maxima raise each row's running
# base (a ramp raises it every block, a late spike once). The huge row is left
# out: its KL of ~1e38 times the teacher's sum of exponentials overflows
# float32's cross term on any path.
KL_KINDS = tuple(k for k in KINDS if k != "huge")


def _kl_pairs(n, dtype, rng):
    """Student and teacher rows: each kind as the student against normal
    teacher logits, as the teacher against a normal student, and on both
    sides (two draws of the same kind)."""
    normal = lambda: 3 * rng.standard_normal(n)  # noqa: E731
    z = [_row(k, n, rng) for k in KL_KINDS] + [normal() for _ in KL_KINDS] + [_row(k, n, rng) for k in KL_KINDS]
    t = [normal() for _ in KL_KINDS] + [_row(k, n, rng) for k in KL_KINDS] + [_row(k, n, rng) for k in KL_KINDS]
    return np.stack(z).astype(dtype), np.stack(t).astype(dtype)


def _kl_target(t, kind):
    """The teacher's rows as the target kind: probabilities and
    log-probabilities are its softmax (NaN for the rows that have none)."""
    if kind == "logits":
        return t
    with np.errstate(invalid="ignore", divide="ignore"):
        return (reference.softmax(t) if kind == "probs" else reference.log_softmax(t)).astype(t.dtype)


@pytest.mark.parametrize("kind", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kl_against_the_reference(n, dtype, temperature, kind, isa, rng):
    z, t = _kl_pairs(n, dtype, rng)
    t = _kl_target(t, kind)
    ct = compute_dtype(dtype)
    kw = dict(target_kind=kind, temperature=temperature, reduction="none")
    ref_loss, ref_grad = reference.kl_div_with_grad(z, t, **kw)
    loss = fastxent.kl_div(z, t, **kw)
    fused, grad = fastxent.kl_div_with_grad(z, t, **kw)
    inplace = z.copy()
    fused_ip, _ = fastxent.kl_div_with_grad(inplace, t, out=inplace, **kw)
    # The gradient T (q - p) cancels: it is accurate to a few ulp of the
    # larger probability it is formed from (test_kl_div's near-converged rows).
    with np.errstate(invalid="ignore"):
        p = {"logits": lambda: reference.softmax(t / temperature), "probs": lambda: t.astype(np.float64),
             "log_probs": lambda: np.exp(t.astype(np.float64))}[kind]()
        heaviest = np.fmax(reference.softmax(z / temperature).max(axis=-1), p.max(axis=-1))
    for i in range(len(z)):
        what = f"row {i} ({KL_KINDS[i % len(KL_KINDS)]}) n={n} T={temperature} {isa}"
        # T^2 KL: a few ulp of max(KL, 1) before the T^2.
        assert_close(loss[i], ref_loss[i], ct, scale=temperature**2, what="loss " + what)
        assert_bitwise_equal(fused[i], loss[i], what="fused loss " + what)
        assert_bitwise_equal(fused_ip[i], loss[i], what="in-place loss " + what)
        scale = temperature * (heaviest[i] if np.isfinite(heaviest[i]) else 1.0)
        assert_close(grad[i], ref_grad[i], ct, scale=scale, what="grad " + what)
        assert_bitwise_equal(inplace[i], grad[i], what="in-place grad " + what)
    assert np.isinf(ref_loss).any() and np.isfinite(ref_loss).sum() > len(z) // 2


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("n", WIDTHS)
def test_kl_same_bits_on_every_isa_and_thread_count(n, kind, rng):
    z, t = _kl_pairs(n, np.float32, rng)
    t = _kl_target(t, kind)
    kw = dict(target_kind=kind, temperature=2.0, reduction="none")
    baseline = None
    for name in each_isa():
        for threads in (1, 2, 3):
            loss, grad = fastxent.kl_div_with_grad(z, t, num_threads=threads, **kw)
            row = fastxent.kl_div_with_grad(z[5:6], t[5:6], num_threads=threads, **kw)
            if baseline is None:
                baseline = (loss, grad)
                assert_bitwise_equal(row[0], loss[5:6], what="row alone")
                continue
            assert_bitwise_equal(loss, baseline[0], what=f"loss n={n} isa={name} threads={threads}")
            assert_bitwise_equal(grad, baseline[1], what=f"grad n={n} isa={name} threads={threads}")
            assert_bitwise_equal(row[1], baseline[1][5:6], what=f"row alone n={n} isa={name}")


# JSD (csrc/rows/jsd.h) on the same rows: against the reference, the loss
# alone, with its gradient and in place, on every ISA.
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("n", WIDTHS)
def test_jsd_against_the_reference_on_every_isa(n, kind, rng):
    z, t = _kl_pairs(n, np.float32, rng)
    t = _kl_target(t, kind)
    kw = dict(target_kind=kind, temperature=2.0, beta=0.3, reduction="none")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ref_loss, ref_grad = reference.jsd_with_grad(z, t, **kw)
    baseline = None
    for name in each_isa():
        loss = fastxent.jsd(z, t, **kw)
        fused, grad = fastxent.jsd_with_grad(z, t, **kw)
        inplace = z.copy()
        fused_ip, _ = fastxent.jsd_with_grad(inplace, t, out=inplace, **kw)
        assert_bitwise_equal(fused, loss, what=f"fused loss n={n} {name}")
        assert_bitwise_equal(fused_ip, loss, what=f"in-place loss n={n} {name}")
        assert_bitwise_equal(inplace, grad, what=f"in-place grad n={n} {name}")
        if baseline is None:
            baseline = (loss, grad)
            for i in range(len(z)):
                what = f"row {i} ({KL_KINDS[i % len(KL_KINDS)]}) n={n}"
                # T^2 times a divergence of at most log 2: ulps of T^2.
                assert_close(loss[i], ref_loss[i], np.float32, ulps=64, scale=4.0, what="loss " + what)
                # Where q and p both underflow to 0 the reference's
                # gradient is NaN or -inf (its 0 log 0), the kernels' 0:
                # compared where the reference is finite.
                ok = np.isfinite(ref_grad[i])
                assert_close(grad[i][ok], ref_grad[i][ok], np.float32, ulps=64, scale=2.0,
                             what="grad " + what)
        else:
            assert_bitwise_equal(loss, baseline[0], what=f"loss n={n} {name}")
            assert_bitwise_equal(grad, baseline[1], what=f"grad n={n} {name}")
    assert np.isfinite(ref_loss).sum() > len(z) // 2
