/*
 * expm.h - exp(x) for x <= 16: the range the softmax sums need.
 *
 * Branch-free and lanewise, so it vectorises on every ISA and gives the same
 * bits on all of them. The build disables contraction (the compiler would
 * fuse differently per ISA); float32 fuses explicitly instead, with
 * fx_fma_f32 (vec.h): the instruction on AVX2 and AVX-512, an exact
 * emulation where there is none, so every ISA rounds the same fused
 * operations once. float64 does not fuse.
 *
 *   n = round(x / ln 2)             by the "magic number" addition, which
 *                                   also leaves n in the low mantissa bits
 *   r = x - n*ln2_hi - n*ln2_lo     Cody-Waite: ln2_hi has trailing zero
 *                                   bits, so n*ln2_hi is exact
 *   exp(x) = 2^n * (1 + r*p(r))     |r| <= ln2/2; 2^n built from the bits
 *
 * float32: exp(r) = 1 + p, p = r + r^2 q(r) in one fused rounding, q of
 * degree 4 by fused Horner steps, and the result s (1 + p) as one fused
 * s p + s: 11 vector operations for the reduction and polynomial where the
 * unfused form (s + (s*r + (s*r)*r*q), which kept the error within 1 ulp
 * without FMA) took 20. q is fitted for the minimax relative error of
 * exp(r) (3.5e-9) on |r| <= ln2/2; max error 0.9919 ulp over every float32
 * in [-87.3365, 0] (0.99181 at -5.86587), checked exhaustively by the
 * tests. float64: q is the Taylor series 1/2! ... 1/13!, whose truncation
 * error (< 5e-18) is below double rounding, evaluated unfused as
 * s + (s*r + (s*r)*r*q).
 *
 * Inputs below ln(smallest normal) (-87.3365 in float32, -708.396 in
 * float64) return 0: softmax terms that small are below the rounding of any
 * sum that holds the row maximum's term exp(0) = 1. NaN passes through.
 * In float64, only inputs within about 0.7 of the cutoff meet subnormal
 * intermediates (s * r), which cost some CPUs (Zen 3) a slow path; float32
 * has none (its s * p is inside the fused operation).
 * Inputs up to FX_LSE_T (16) are also in range: the one-pass row sums
 * (rows/stats.h) subtract a base that may sit up to 16 below an element;
 * the same reduction holds there (within 1 ulp in float32, tested).
 * Larger positive inputs are outside the contract.
 */
#ifndef FASTXENT_EXPM_H
#define FASTXENT_EXPM_H

#include "vec.h"

/* The reduction and polynomial of the float32 exps, for x in their range:
   p = exp(r) - 1 = r + r^2 q(r), with *t = x / ln 2 + 1.5 2^23 (n in its
   low bits), r = x - n ln 2. */
FX_INLINE fx_vf32 fx_expm1_core_f32(fx_vf32 x, fx_vf32 *tp)
{
    const fx_vf32 magic = fx_splat_f32(12582912.0f); /* 1.5 * 2^23 */
    const fx_vf32 t = fx_fma_f32(x, fx_splat_f32(1.44269504088896341f), magic);
    const fx_vf32 mn = magic - t; /* -n, exact */
    fx_vf32 r = fx_fma_f32(mn, fx_splat_f32(0x1.62E400p-1f), x);
    r = fx_fma_f32(mn, fx_splat_f32(0x1.7F7D1Cp-20f), r);
    fx_vf32 q = fx_splat_f32(0x1.6a107ep-10f);
    q = fx_fma_f32(q, r, fx_splat_f32(0x1.1245c8p-7f));
    q = fx_fma_f32(q, r, fx_splat_f32(0x1.55593cp-5f));
    q = fx_fma_f32(q, r, fx_splat_f32(0x1.555482p-3f));
    q = fx_fma_f32(q, r, fx_splat_f32(0x1.fffffcp-2f));
    *tp = t;
    return fx_fma_f32(r * r, q, r);
}

FX_INLINE fx_vf32 fx_expm_f32(fx_vf32 x)
{
    const float cutoff = -87.33654475f; /* ln(FLT_MIN) */
    /* Lanes below the cutoff are computed at 0 and zeroed at the end: n
       stays in [-126, 23] (x <= 16), so the exponent bits are valid, and no
       intermediate is subnormal (clamping to the cutoff instead made
       s * r subnormal, and exp of -inf or -100 ran 2.5x slower on Zen 3:
       padding lanes, masked logits). NaN compares false and stays NaN. */
#if defined(__AVX512F__)
    /* The two selects as zero-masking moves on the compare's mask: GCC
       made each generic select a mask-to-vector move, a NOT and an AND. */
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(cutoff), _CMP_NLT_UQ);
    const fx_vf32 xc = (fx_vf32)_mm512_maskz_mov_ps(keep, (__m512)x);
#else
    const fx_vi32 small = fx_lt_f32(x, fx_splat_f32(cutoff));
    const fx_vf32 xc = fx_sel_f32(small, fx_splat_f32(0.0f), x);
#endif
    fx_vf32 t;
    const fx_vf32 p = fx_expm1_core_f32(xc, &t);
    /* 2^n: the low bits of t hold n; adding the bias and shifting keeps the
       low 9 bits, (n + 127) mod 512, which is the exponent field. */
    const fx_vf32 s = (fx_vf32)(((fx_vu32)t + 127u) << 23);
    /* s (1 + p) rounded once. A subnormal result (n = -126, x at the
       cutoff) is inexact as a float, but s p + s is exact as a double
       (1 + p needs 43 bits there), which is all fx_fma_f32's emulation
       needs to round it once. */
    const fx_vf32 e = fx_fma_f32(s, p, s);
#if defined(__AVX512F__)
    return (fx_vf32)_mm512_maskz_mov_ps(keep, (__m512)e);
#else
    return fx_sel_f32(small, fx_splat_f32(0.0f), e);
#endif
}

/* exp(x) for terms that are only summed into a softmax denominator (loss,
   logsumexp): the same reduction and polynomial with 2^n applied last, to
   u = 1 + p computed unscaled, and x clamped at FX_EXPSUM_FLOOR instead
   of zeroed below the cutoff. Both selects go (one max instead of a
   compare and two masked moves or blends), and on AVX-512 vscalefps
   replaces the exponent-field arithmetic. Scaling by a power of two
   commutes with rounding while the result is normal, and fx_expm_f32's
   s (1 + p) is one rounding of the same value, so the result has
   fx_expm_f32's bits for every x from the floor up (every float32 in
   [-87.34, 16] compared; tests/test_expm.py), and the same bits on every
   ISA (vscalefps and u * 2^n are the same exact product). Below the
   floor every term is exp(-87) = 1.6e-38 rather than fx_expm_f32's
   smaller values or 0: a sum that holds its row maximum's term 1 absorbs
   them (a row of 2^31 such terms adds 3.5e-29, under half a double ulp
   of 1). Never for stored exponentials, whose -inf logits must give
   exactly 0. */
#define FX_EXPSUM_FLOOR -87.0f
FX_INLINE fx_vf32 fx_expsum_f32(fx_vf32 x)
{
    /* fx_vmax's rule keeps a NaN x (which NaN-poisons the sum). */
    const fx_vf32 xc = fx_vmax_f32(x, fx_splat_f32(FX_EXPSUM_FLOOR));
    fx_vf32 t;
    const fx_vf32 u = fx_splat_f32(1.0f) + fx_expm1_core_f32(xc, &t);
#if defined(__AVX512F__)
    const fx_vf32 n = t - fx_splat_f32(12582912.0f);
    return (fx_vf32)_mm512_scalef_ps((__m512)u, (__m512)n);
#else
    return u * (fx_vf32)(((fx_vu32)t + 127u) << 23);
#endif
}

FX_INLINE fx_vf64 fx_expm_f64(fx_vf64 x)
{
    const double cutoff = -708.39641853226408; /* ln(DBL_MIN) */
#if defined(__AVX512F__)
    const __mmask8 keep = _mm512_cmp_pd_mask((__m512d)x, _mm512_set1_pd(cutoff), _CMP_NLT_UQ);
    const fx_vf64 xc = (fx_vf64)_mm512_maskz_mov_pd(keep, (__m512d)x);
#else
    const fx_vi64 small = fx_lt_f64(x, fx_splat_f64(cutoff));
    const fx_vf64 xc = fx_sel_f64(small, fx_splat_f64(0.0), x);
#endif
    const fx_vf64 magic = fx_splat_f64(6755399441055744.0); /* 1.5 * 2^52 */
    const fx_vf64 t = xc * fx_splat_f64(1.4426950408889634) + magic;
    const fx_vf64 n = t - magic;
    fx_vf64 r = xc - n * fx_splat_f64(6.93147180369123816490e-01);
    r = r - n * fx_splat_f64(1.90821492927058770002e-10);
    const fx_vf64 s = (fx_vf64)(((fx_vu64)t + 1023u) << 52);
    fx_vf64 q = fx_splat_f64(1.0 / 6227020800.0); /* 1/13! */
    q = q * r + fx_splat_f64(1.0 / 479001600.0);
    q = q * r + fx_splat_f64(1.0 / 39916800.0);
    q = q * r + fx_splat_f64(1.0 / 3628800.0);
    q = q * r + fx_splat_f64(1.0 / 362880.0);
    q = q * r + fx_splat_f64(1.0 / 40320.0);
    q = q * r + fx_splat_f64(1.0 / 5040.0);
    q = q * r + fx_splat_f64(1.0 / 720.0);
    q = q * r + fx_splat_f64(1.0 / 120.0);
    q = q * r + fx_splat_f64(1.0 / 24.0);
    q = q * r + fx_splat_f64(1.0 / 6.0);
    q = q * r + fx_splat_f64(0.5);
    const fx_vf64 sr = s * r;
    const fx_vf64 e = s + (sr + (sr * r) * q);
#if defined(__AVX512F__)
    return (fx_vf64)_mm512_maskz_mov_pd(keep, (__m512d)e);
#else
    return fx_sel_f64(small, fx_splat_f64(0.0), e);
#endif
}

/* float64 sums keep fx_expm_f64: its 13-term polynomial, not the selects,
   sets its cost. */
FX_INLINE fx_vf64 fx_expsum_f64(fx_vf64 x)
{
    return fx_expm_f64(x);
}

#endif
