"""The exp kernel (csrc/simd/expm.h): at most 0.9919 ulp (the documented bound)
over every float32 in [ln(FLT_MIN), 0], bit-identical on every ISA (its fused
multiply-adds emulated exactly where the ISA has none), 0 below the cutoff,
NaN kept; and the exp of summed terms (fx_expsum_f32): expm's bits from its
floor -87 up, exp(-87) below, and losses that do not see the difference."""
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import fastxent
from fastxent import _core, reference

CUTOFF32 = np.float32(-87.33654475)


def _assert_same_bits_on_every_isa(kernel, x):
    previous = _core.get_isa()
    try:
        outs = []
        for isa in _core.available_isas():
            _core.set_isa(isa)
            outs.append(kernel(x))
    finally:
        _core.set_isa(previous)
    for o in outs[1:]:
        assert np.array_equal(o.view(np.uint8), outs[0].view(np.uint8))


EXP_F32_MAX_ULP = 0.9919  # docs/API.md, "Accuracy" (measured: 0.99181 at x = -5.86587)


def test_float32_exhaustive_within_the_documented_bound():
    # Every float32 in [-87.3365, 0] (about 1.1e9 values), scanned in C
    # against the C library's double exp: seconds on two cores.
    worst, where = _core.expm_f32_max_ulp(float(CUTOFF32), 0.0)
    assert worst <= EXP_F32_MAX_ULP, f"max error {worst} ulp at x = {where!r}"
    assert worst > 0.5  # the scan did compare something (not correctly rounded everywhere)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_on_every_isa(dtype):
    rng = np.random.default_rng(3)
    x = -np.abs(rng.standard_normal(100_003) * 30).astype(dtype)
    # CUTOFF32: the one input whose fused result is subnormal (emulated
    # exactly on the baseline build, one instruction on the others).
    x[:6] = [0.0, -0.0, -1e-30, -700.0, -np.inf, CUTOFF32]
    _assert_same_bits_on_every_isa(_core.expm, x)


def test_float64_accuracy_and_specials():
    rng = np.random.default_rng(4)
    x = -rng.uniform(0, 708, 1_000_000)
    got = _core.expm(x)
    ref = np.exp(x)
    assert np.max(np.abs(got - ref) / ref) <= 2.5 * np.finfo(np.float64).eps
    special = np.array([0.0, -np.inf, np.nan, -709.0, -1e300])
    got = _core.expm(special)
    assert got[0] == 1.0 and got[1] == 0.0 and np.isnan(got[2]) and got[3] == 0.0 and got[4] == 0.0


def test_float32_specials():
    x = np.array([0.0, -np.inf, np.nan, CUTOFF32, np.nextafter(CUTOFF32, -np.inf), -1e30],
                 np.float32)
    got = _core.expm(x)
    assert got[0] == 1.0 and got[1] == 0.0 and np.isnan(got[2])
    assert got[3] > 0 and got[4] == 0.0 and got[5] == 0.0


# fx_expsum_f32: the exp of terms that are only summed (loss, logsumexp).
EXPSUM_FLOOR = np.float32(-87.0)


def test_expsum_has_the_bits_of_expm_from_its_floor_up():
    # Every float32 in [-87, 16], on the active ISA (the ISA test below
    # ties the others to it): scaling u = exp(r) by 2^n last commutes with
    # rounding while the result is normal, and expm's s (1 + p) is one
    # fused rounding, so nothing differs above the floor.
    count, last = _core.expsum_f32_mismatches(float(EXPSUM_FLOOR), 16.0)
    assert count == 0, f"{count} values differ, the largest at {last!r}"
    # Below the floor expsum clamps (exp(-87)) where expm goes on down to
    # its cutoff: every value there differs, and the scan does compare.
    count, last = _core.expsum_f32_mismatches(float(CUTOFF32), 16.0)
    assert 40_000 < count < 50_000 and last < EXPSUM_FLOOR


def test_expsum_floor_nan_and_range():
    x = np.array([0.0, -0.0, 16.0, -1.5, -87.0, -87.5, -1000.0, -np.inf, np.nan, -80.0],
                 np.float32)
    got = _core.expsum(x)
    assert got[0] == 1.0 and got[1] == 1.0 and got[2] == _core.expm(x[2:3])[0]
    floor = _core.expsum(np.array([EXPSUM_FLOOR], np.float32))[0]
    assert np.isclose(floor, np.exp(np.float64(EXPSUM_FLOOR)), rtol=2 ** -23, atol=0)
    # Below the floor every term is exp(-87), never 0 (the sums absorb it).
    assert got[5] == floor and got[6] == floor and got[7] == floor
    assert np.isnan(got[8])
    np.testing.assert_allclose(got[[3, 9]].astype(np.float64), np.exp([-1.5, -80.0]), rtol=2 ** -23)


def test_expsum_same_bits_on_every_isa():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_003) * 40).astype(np.float32)
    x = np.minimum(x, np.float32(16))
    x[:6] = [0.0, -0.0, -np.inf, np.nan, -87.0, -79.5]
    _assert_same_bits_on_every_isa(_core.expsum, x)


@pytest.mark.parametrize("n", [10, 40, 128, 1000, 5000])
def test_summed_terms_below_the_floor_leave_the_loss_bits(n):
    # The loss alone sums fx_expsum terms; with a gradient the exponentials
    # are kept (fx_expm, 0 for -inf). Terms below 1e-34 of the row's max
    # term must not reach the loss: masked rows, rows whose other classes
    # sit 80-200 below the max, and a mix, on every ISA.
    rng = np.random.default_rng(n)
    rows = 64
    x = (rng.standard_normal((rows, n)) * 2).astype(np.float32)
    x[0::4, : n // 2] = -np.inf                      # masked half
    x[1::4] = -rng.uniform(80, 200, (len(x[1::4]), n)).astype(np.float32)
    x[1::4, 0] = 0.0                                 # one class far above the rest
    x[2::4, 1::2] = -np.inf
    x[2::4, 0::2] -= 85                              # near the floor
    x[2::4, -1] = 3.0
    y = rng.integers(0, n, rows)
    y[0::4] = n - 1
    y[2::4] = n - 1
    probs = np.zeros_like(x)  # soft targets on classes with finite logits
    probs[np.arange(rows), y] = 0.75
    probs[:, -1] += 0.25
    probs[1::4, -1] = 0.0
    probs[1::4, 0] += 0.25
    previous = _core.get_isa()
    try:
        losses = []
        for isa in _core.available_isas():
            _core.set_isa(isa)
            loss = fastxent.cross_entropy(x, y, reduction="none")
            loss_g, _ = fastxent.cross_entropy_with_grad(x, y, reduction="none")
            assert_array_equal(loss.view(np.uint32), loss_g.view(np.uint32))
            soft = fastxent.cross_entropy(x, probs, reduction="none")
            soft_g, _ = fastxent.cross_entropy_with_grad(x, probs, reduction="none")
            assert_array_equal(soft.view(np.uint32), soft_g.view(np.uint32))
            losses.append(loss)
            lse = fastxent.logsumexp(x)
            np.testing.assert_allclose(lse, reference.logsumexp(x), rtol=2 ** -22)
    finally:
        _core.set_isa(previous)
    np.testing.assert_allclose(losses[0], reference.cross_entropy(x, y, reduction="none"),
                               rtol=2 ** -21, atol=2 ** -21)
    for other in losses[1:]:
        assert_array_equal(other.view(np.uint32), losses[0].view(np.uint32))
