/*
 * tanhm.h - tanh(x) for every x, lanewise: the soft-capping of logits
 * (softcap * tanh(x / softcap), rows/ce_opts.h).
 *
 * Branch-free per lane and built on expm.h, so it gives the same bits on
 * every ISA (no FMA: the build disables contraction). With a = |x|:
 *
 *   a < 0.625:  tanh(a) = a + a z P(z),  z = a^2
 *               P: a polynomial fitted (Chebyshev, near-minimax) to
 *               (tanh(a) - a) / a^3 on z in [0, 0.625^2]; degree 4 in
 *               float32 (fit error 4.3e-8, 1.7e-8 relative in tanh),
 *               11 in float64 (4e-18).
 *   otherwise:  tanh(a) = 1 - 2u / (1 + u),  u = exp(-2a) <= 0.287
 *               (expm.h's exp, whose contract is x <= 0); no cancellation:
 *               2u / (1 + u) <= 0.446 and the result is >= 0.555.
 *
 * and the sign of x is put back (tanh is odd; -0 stays -0). +-inf gives
 * +-1 (expm flushes exp(-inf) to 0), NaN stays NaN. The form 1 - 2/(e^2a+1)
 * alone loses all digits for small a (1 - u cancels), and logits divided by
 * a cap of 30 are mostly small: the polynomial is the common path, and when
 * no lane of a vector needs the other one it is skipped (each lane's value
 * is the same either way).
 *
 * Largest errors, in ulp of the result: float32 1.47 (every float32 in
 * [0, 12], against float64's tanh), float64 1.46 (a dense sweep of [0, 8],
 * against long double's); both near 0.63, in the exp form. The tests hold
 * both to 2 ulp on their sweeps (tests/test_ce_opts_kernel.py). The form is
 * chosen by each lane's own value, so no lane depends on its neighbours.
 */
#ifndef FASTXENT_TANHM_H
#define FASTXENT_TANHM_H

#include "vec.h"
#include "expm.h"

#define FX_TANH_SMALL 0.625

FX_INLINE fx_vf32 fx_tanh_poly_f32(fx_vf32 a)
{
    const fx_vf32 z = a * a;
    fx_vf32 p = fx_splat_f32(-0.0060967141659081975745f);
    p = p * z + fx_splat_f32(0.020997178999074750572f);
    p = p * z + fx_splat_f32(-0.053850909578513580828f);
    p = p * z + fx_splat_f32(0.13332769736976327858f);
    p = p * z + fx_splat_f32(-0.33333328944134254565f);
    return a + (a * z) * p;
}

FX_INLINE fx_vf64 fx_tanh_poly_f64(fx_vf64 a)
{
    const fx_vf64 z = a * a;
    fx_vf64 p = fx_splat_f64(6.48516348279311315e-6);
    p = p * z + fx_splat_f64(-0.000031201101425797400033);
    p = p * z + fx_splat_f64(0.000092571161295567682707);
    p = p * z + fx_splat_f64(-0.00023759064960555619551);
    p = p * z + fx_splat_f64(0.0005896606577757043347);
    p = p * z + fx_splat_f64(-0.0014557754120478055104);
    p = p * z + fx_splat_f64(0.0035921217511549622695);
    p = p * z + fx_splat_f64(-0.008863235103240877925);
    p = p * z + fx_splat_f64(0.021869488519008305756);
    p = p * z + fx_splat_f64(-0.05396825396789699169);
    p = p * z + fx_splat_f64(0.13333333333333041602);
    p = p * z + fx_splat_f64(-0.33333333333333332938);
    return a + (a * z) * p;
}

/* The exp form, and the selection with the sign put back. */
#define FX_DEFINE_TANH(SFX, V, VI, VU, SIGN)                                   \
    FX_INLINE V fx_tanh_exp_##SFX(V a)                                         \
    {                                                                          \
        const V u = fx_expm_##SFX(a * fx_splat_##SFX(-2));                     \
        const V one = fx_splat_##SFX(1);                                       \
        return one - (u + u) / (one + u);                                      \
    }                                                                          \
    FX_INLINE V fx_tanh_##SFX(V x)                                             \
    {                                                                          \
        const VU sign = (VU)x & SIGN;                                          \
        const V a = (V)((VU)x & ~SIGN);                                        \
        const VI small = fx_lt_##SFX(a, fx_splat_##SFX(FX_TANH_SMALL));        \
        V t;                                                                   \
        if (!fx_any_##SFX(~small)) t = fx_tanh_poly_##SFX(a);                 \
        else if (!fx_any_##SFX(small)) t = fx_tanh_exp_##SFX(a);              \
        else t = fx_sel_##SFX(small, fx_tanh_poly_##SFX(a), fx_tanh_exp_##SFX(a)); \
        return (V)((VU)t | sign);                                              \
    }

FX_DEFINE_TANH(f32, fx_vf32, fx_vi32, fx_vu32, 0x80000000u)
FX_DEFINE_TANH(f64, fx_vf64, fx_vi64, fx_vu64, 0x8000000000000000ull)

#endif
