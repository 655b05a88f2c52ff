/*
 * logm.h - log1p(y) for 0 <= y <= 1, the only range binary cross entropy
 * from logits needs (y = exp(-|x|)).
 *
 * Branch-free and lanewise, like expm.h. With u = 1 + y:
 *   u > sqrt(2):  log1p(y) = ln 2 + log1p(v),  v = (y - 1) / 2   (exact)
 *   otherwise:    log1p(y) = log1p(v),         v = y
 * so |v| <= sqrt(2) - 1, and with s = v / (2 + v), |s| <= 0.1716:
 *   log1p(v) = 2 atanh(s) = 2s + 2s z (1/3 + z/5 + z^2/7 + ...),  z = s^2
 * The series is cut where its remainder drops below the dtype's rounding
 * (z^4 in float32, z^9 in float64). NaN passes through. Small y keep their
 * relative accuracy (log1p(1e-30) is 1e-30), which is what keeps a tiny BCE
 * loss exact.
 */
#ifndef FASTXENT_LOGM_H
#define FASTXENT_LOGM_H

#include "vec.h"

/* log1p(v) = 2 atanh(s), s = v / (2 + v), for |v| <= sqrt(2) - 1. */
FX_INLINE fx_vf32 fx_log1p_series_f32(fx_vf32 v)
{
    const fx_vf32 s = v / (fx_splat_f32(2.0f) + v);
    const fx_vf32 z = s * s;
    fx_vf32 p = fx_splat_f32(1.0f / 9.0f);
    p = p * z + fx_splat_f32(1.0f / 7.0f);
    p = p * z + fx_splat_f32(1.0f / 5.0f);
    p = p * z + fx_splat_f32(1.0f / 3.0f);
    const fx_vf32 s2 = s + s;
    return s2 + (s2 * z) * p;
}

FX_INLINE fx_vf64 fx_log1p_series_f64(fx_vf64 v)
{
    const fx_vf64 s = v / (fx_splat_f64(2.0) + v);
    const fx_vf64 z = s * s;
    fx_vf64 p = fx_splat_f64(1.0 / 19.0);
    p = p * z + fx_splat_f64(1.0 / 17.0);
    p = p * z + fx_splat_f64(1.0 / 15.0);
    p = p * z + fx_splat_f64(1.0 / 13.0);
    p = p * z + fx_splat_f64(1.0 / 11.0);
    p = p * z + fx_splat_f64(1.0 / 9.0);
    p = p * z + fx_splat_f64(1.0 / 7.0);
    p = p * z + fx_splat_f64(1.0 / 5.0);
    p = p * z + fx_splat_f64(1.0 / 3.0);
    const fx_vf64 s2 = s + s;
    return s2 + (s2 * z) * p;
}

FX_INLINE fx_vf32 fx_log1p_unit_f32(fx_vf32 y)
{
    const fx_vi32 big = fx_lt_f32(fx_splat_f32(1.41421356f), y + fx_splat_f32(1.0f));
    const fx_vf32 v = fx_sel_f32(big, (y - fx_splat_f32(1.0f)) * fx_splat_f32(0.5f), y);
    return fx_log1p_series_f32(v) + fx_sel_f32(big, fx_splat_f32(0.693147180559945309f), fx_splat_f32(0.0f));
}

FX_INLINE fx_vf64 fx_log1p_unit_f64(fx_vf64 y)
{
    const fx_vi64 big = fx_lt_f64(fx_splat_f64(1.4142135623730951), y + fx_splat_f64(1.0));
    const fx_vf64 v = fx_sel_f64(big, (y - fx_splat_f64(1.0)) * fx_splat_f64(0.5), y);
    return fx_log1p_series_f64(v) + fx_sel_f64(big, fx_splat_f64(0.69314718055994530942), fx_splat_f64(0.0));
}

#endif

/*
 * log(x) for positive, normal, finite x (the row sums of the small-row
 * kernels, which are >= 1). x = 2^e m with m in [sqrt(2)/2, sqrt(2)), and
 * log(m) = log1p(m - 1) by the series above. Callers screen NaN, zero and
 * infinities themselves.
 */
FX_INLINE fx_vf32 fx_log_pos_f32(fx_vf32 x)
{
    const fx_vu32 bits = (fx_vu32)x;
    fx_vf32 m = (fx_vf32)((bits & 0x007FFFFFu) | 0x3F800000u); /* [1, 2) */
    fx_vi32 e = (fx_vi32)(bits >> 23) - 127;
    const fx_vi32 big = fx_lt_f32(fx_splat_f32(1.41421356f), m);
    m = fx_sel_f32(big, m * fx_splat_f32(0.5f), m);
    e = e - big; /* big is -1 where true */
    const fx_vf32 ef = __builtin_convertvector(e, fx_vf32);
    return ef * fx_splat_f32(0.693147180559945309f) + fx_log1p_series_f32(m - fx_splat_f32(1.0f));
}

/* *ps = p with its zeros replaced by 1; whether every lane of p is zero or
   positive, normal and finite, so that fx_log_pos_f64(*ps) is the log of
   every nonzero lane (callers give zero lanes their own value). */
FX_INLINE int fx_log_domain_f64(fx_vf64 p, fx_vf64 *ps)
{
    const fx_vi64 z0 = fx_eq_f64(p, fx_splat_f64(0.0));
    *ps = fx_sel_f64(z0, fx_splat_f64(1.0), p);
    const fx_vi64 ok = fx_lt_f64(*ps, fx_splat_f64(INFINITY)) & ~fx_lt_f64(*ps, fx_splat_f64(0x1p-1022));
    return !fx_any_f64(~ok);
}

FX_INLINE fx_vf64 fx_log_pos_f64(fx_vf64 x)
{
    const fx_vu64 bits = (fx_vu64)x;
    fx_vf64 m = (fx_vf64)((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    /* The biased exponent as a double without an int64 -> double convert
       (which AVX2 lacks): 2^52 + k has k in its low mantissa bits. */
    fx_vf64 e = (fx_vf64)((bits >> 52) | 0x4330000000000000ull) - fx_splat_f64(4503599627370496.0 + 1023.0);
    const fx_vi64 big = fx_lt_f64(fx_splat_f64(1.4142135623730951), m);
    m = fx_sel_f64(big, m * fx_splat_f64(0.5), m);
    e = e + fx_sel_f64(big, fx_splat_f64(1.0), fx_splat_f64(0.0));
    /* ln 2 split so that e * ln2_hi is exact. */
    return e * fx_splat_f64(6.93147180369123816490e-01) +
           (fx_log1p_series_f64(m - fx_splat_f64(1.0)) + e * fx_splat_f64(1.90821492927058770002e-10));
}
