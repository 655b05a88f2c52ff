/*
 * half.h - float16 and bfloat16 storage for the float32 kernels.
 *
 * 16-bit inputs are widened to float32 as they are loaded and results are
 * rounded to the storage type once, as they are stored (round to nearest
 * even, like NumPy's astype): the arithmetic is the float32 kernels'
 * exactly, so a 16-bit call gives the bits of the float32 call on the
 * widened input, rounded once. Integer vector operations only (GCC splits
 * those cleanly on every ISA); no F16C needed.
 */
#ifndef FASTXENT_HALF_H
#define FASTXENT_HALF_H

#include "vec.h"

typedef uint16_t fx_vh16 __attribute__((vector_size(FX_VBYTES / 2))); /* 16 lanes */

/* a < b for magnitudes (top bit clear), as signed integers by native
   parts (fx_lt_i32): GCC compares 64-byte integer vectors lane by lane,
   and log_softmax and gradients with 16-bit outputs ran 3-5x slower than
   float32. */
#define FX_MAG_LT(a, b) ((fx_vu32)fx_lt_i32((fx_vi32)(a), (fx_vi32){0} + (int32_t)(b)))
#define FX_MAG_GT(a, b) ((fx_vu32)fx_lt_i32((fx_vi32){0} + (int32_t)(b), (fx_vi32)(a)))

/* IEEE binary16 -> binary32, exact. The F16C / AVX-512 instruction where
   the build has it (same result: the conversion is exact); integer
   operations otherwise. */
#if defined(__AVX512F__)
#include <immintrin.h>
FX_INLINE fx_vf32 fx_f16_to_f32(fx_vh16 h) { return (fx_vf32)_mm512_cvtph_ps((__m256i)h); }
#elif defined(__F16C__)
#include <immintrin.h>
FX_INLINE fx_vf32 fx_f16_to_f32(fx_vh16 h)
{
    union { fx_vh16 v; __m128i q[2]; } u = {h};
    union { fx_vf32 v; __m256 h[2]; } r;
    r.h[0] = _mm256_cvtph_ps(u.q[0]);
    r.h[1] = _mm256_cvtph_ps(u.q[1]);
    return r.v;
}
#else
FX_INLINE fx_vf32 fx_f16_to_f32(fx_vh16 h)
{
    const fx_vu32 u = __builtin_convertvector(h, fx_vu32);
    const fx_vu32 sign = (u & 0x8000u) << 16;
    const fx_vu32 em = u & 0x7fffu;
    fx_vu32 o = (em << 13) + ((127u - 15u) << 23); /* normal: rebias */
    o += ~FX_MAG_LT(em, 0x7c00u) & ((128u - 16u) << 23); /* inf, NaN */
    const fx_vu32 sub = FX_MAG_LT(em, 0x0400u);           /* subnormal, 0 */
    const fx_vf32 subf = __builtin_convertvector((fx_vi32)em, fx_vf32) * fx_splat_f32(0x1p-24f);
    return (fx_vf32)(((sub & (fx_vu32)subf) | (~sub & o)) | sign);
}
#endif

/* binary32 -> binary16, round to nearest even; NaN -> quiet NaN. */
FX_INLINE fx_vh16 fx_f32_to_f16(fx_vf32 f)
{
    const fx_vu32 u = (fx_vu32)f;
    const fx_vu32 sign = (u >> 16) & 0x8000u;
    const fx_vu32 a = u & 0x7fffffffu;
    /* Subnormal results: adding 0.5 aligns the 10 mantissa bits at the
       bottom and the addition rounds to nearest even. */
    const fx_vf32 magic = fx_splat_f32(0.5f);
    const fx_vu32 sub = (fx_vu32)((fx_vf32)a + magic) - (fx_vu32)magic;
    const fx_vu32 nrm = (a + (((15u - 127u) << 23) + 0xfffu) + ((a >> 13) & 1u)) >> 13;
    const fx_vu32 big = ~FX_MAG_LT(a, (127u + 16u) << 23);
    /* NaN: quiet, payload truncated, as the hardware conversion does. */
    const fx_vu32 nan = FX_MAG_GT(a, 0x7f800000u);
    const fx_vu32 special = nan & (0x7e00u | ((a >> 13) & 0x3ffu));
    const fx_vu32 inf = ~nan & 0x7c00u;
    const fx_vu32 small = FX_MAG_LT(a, 113u << 23);
    fx_vu32 o = (small & sub) | (~small & nrm);
    o = (big & (special | inf)) | (~big & o);
    return __builtin_convertvector(o | sign, fx_vh16);
}

/* bfloat16 is the top half of a float32. */
FX_INLINE fx_vf32 fx_bf16_to_f32(fx_vh16 h)
{
    return (fx_vf32)(__builtin_convertvector(h, fx_vu32) << 16);
}

FX_INLINE fx_vh16 fx_f32_to_bf16(fx_vf32 f)
{
    const fx_vu32 u = (fx_vu32)f;
    const fx_vu32 nan = FX_MAG_GT(u & 0x7fffffffu, 0x7f800000u);
    const fx_vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const fx_vu32 quiet = (u >> 16) | 0x40u;
    return __builtin_convertvector((nan & quiet) | (~nan & rounded), fx_vh16);
}

/* Loads and stores of 16 lanes; tails convert then fill the other lanes. */
#define FX_DEFINE_H16_IO(NAME, TOF, FROMF)                                     \
    FX_INLINE fx_vf32 fx_load_##NAME(const uint16_t *p)                    \
    {                                                                          \
        fx_vh16 h;                                                             \
        memcpy(&h, p, sizeof h);                                               \
        return TOF(h);                                                         \
    }                                                                          \
    FX_INLINE fx_vf32 fx_load_tail_##NAME(const uint16_t *p, int64_t n, float fill) \
    {                                                                          \
        fx_vh16 h = {0};                                                       \
        for (int64_t j = 0; j < n; j++) h[j] = p[j];                           \
        fx_vf32 v = TOF(h);                                                    \
        for (int64_t j = n; j < 16; j++) v[j] = fill;                          \
        return v;                                                              \
    }                                                                          \
    FX_INLINE void fx_store_##NAME(uint16_t *p, fx_vf32 v)                 \
    {                                                                          \
        const fx_vh16 h = FROMF(v);                                            \
        memcpy(p, &h, sizeof h);                                               \
    }                                                                          \
    FX_INLINE void fx_store_tail_##NAME(uint16_t *p, fx_vf32 v, int64_t n) \
    {                                                                          \
        const fx_vh16 h = FROMF(v);                                            \
        for (int64_t j = 0; j < n; j++) p[j] = h[j];                           \
    }                                                                          \
    FX_INLINE float fx_get_##NAME(const uint16_t *p, int64_t i)            \
    {                                                                          \
        fx_vh16 h = {0};                                                       \
        h[0] = p[i];                                                           \
        return TOF(h)[0];                                                      \
    }                                                                          \
    FX_INLINE void fx_set_##NAME(uint16_t *p, int64_t i, float v)          \
    {                                                                          \
        fx_vf32 f = {0};                                                       \
        f[0] = v;                                                              \
        p[i] = FROMF(f)[0];                                                    \
    }

FX_DEFINE_H16_IO(f16, fx_f16_to_f32, fx_f32_to_f16)
FX_DEFINE_H16_IO(bf16, fx_bf16_to_f32, fx_f32_to_bf16)

#endif
