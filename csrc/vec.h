/*
 * vec.h - fixed-width vectors for the row kernels.
 *
 * Every kernel works on 64-byte vectors (16 floats or 8 doubles) written
 * with GCC/Clang vector extensions. The compiler lowers one such vector to
 * one zmm register (AVX-512), two ymm (AVX2) or four xmm (SSE2), but the
 * arithmetic of every lane is the same, and so is the order in which lanes
 * are combined. That is what makes every ISA build give bitwise-identical
 * results: the width of the hardware never changes the summation order.
 * (The build also turns off floating-point contraction for the same reason.)
 *
 * Loads and stores go through memcpy so that no alignment is assumed.
 */
#ifndef FASTXENT_VEC_H
#define FASTXENT_VEC_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#define FX_VBYTES 64

/* The helpers and row functions must inline into the kernels: a call that
   passes 64-byte vectors goes through the stack, and GCC's unit-growth
   limits stop inlining in files that instantiate the kernels four times. */
#define FX_INLINE static inline __attribute__((always_inline))

typedef float fx_vf32 __attribute__((vector_size(FX_VBYTES)));
typedef int32_t fx_vi32 __attribute__((vector_size(FX_VBYTES)));
typedef uint32_t fx_vu32 __attribute__((vector_size(FX_VBYTES)));
typedef double fx_vf64 __attribute__((vector_size(FX_VBYTES)));
typedef int64_t fx_vi64 __attribute__((vector_size(FX_VBYTES)));
typedef uint64_t fx_vu64 __attribute__((vector_size(FX_VBYTES)));
/* 16 doubles: float32 lanes widened for accumulation. */
typedef double fx_vw32 __attribute__((vector_size(2 * FX_VBYTES)));

/* The widest vector this build's ISA has. Floating comparisons of a wider
   generic vector are scalarised by GCC (it splits arithmetic, not compares),
   so comparisons go through fx_lt/fx_eq, which split by hand. */
#if defined(__AVX512F__)
#define FX_NBYTES 64
#elif defined(__AVX__)
#define FX_NBYTES 32
#else
#define FX_NBYTES 16
#endif
#define FX_NPARTS (FX_VBYTES / FX_NBYTES)

typedef float fx_nf32 __attribute__((vector_size(FX_NBYTES)));
typedef int32_t fx_ni32 __attribute__((vector_size(FX_NBYTES)));
typedef double fx_nf64 __attribute__((vector_size(FX_NBYTES)));
typedef int64_t fx_ni64 __attribute__((vector_size(FX_NBYTES)));

#define FX_DEFINE_CMP(SFX, V, VI, NV, NVI, NAME, OP)                           \
    FX_INLINE VI fx_##NAME##_##SFX(V a, V b)                               \
    {                                                                          \
        union { V v; NV n[FX_NPARTS]; } ua = {a}, ub = {b};                    \
        union { VI v; NVI n[FX_NPARTS]; } r;                                   \
        for (int k = 0; k < FX_NPARTS; k++) r.n[k] = ua.n[k] OP ub.n[k];       \
        return r.v;                                                            \
    }

FX_DEFINE_CMP(f32, fx_vf32, fx_vi32, fx_nf32, fx_ni32, lt, <)
FX_DEFINE_CMP(f32, fx_vf32, fx_vi32, fx_nf32, fx_ni32, eq, ==)
FX_DEFINE_CMP(f64, fx_vf64, fx_vi64, fx_nf64, fx_ni64, lt, <)
FX_DEFINE_CMP(f64, fx_vf64, fx_vi64, fx_nf64, fx_ni64, eq, ==)

/* Streaming (non-temporal) stores of a 64-byte vector to a 64-byte
   aligned address: large outputs are written without first reading their
   lines into the cache (no read-for-ownership), which is what bounds a
   gradient pass over main memory. Same bits as a normal store. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FX_HAVE_STREAM 1
FX_INLINE void fx_stream_f32(float *p, fx_vf32 v)
{
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    union { fx_vf32 v; __m256 h[2]; } u = {v};
    _mm256_stream_ps(p, u.h[0]);
    _mm256_stream_ps(p + 8, u.h[1]);
#else
    union { fx_vf32 v; __m128 q[4]; } u = {v};
    for (int k = 0; k < 4; k++) _mm_stream_ps(p + 4 * k, u.q[k]);
#endif
}
FX_INLINE void fx_stream_f64(double *p, fx_vf64 v)
{
#if defined(__AVX512F__)
    _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
    union { fx_vf64 v; __m256d h[2]; } u = {v};
    _mm256_stream_pd(p, u.h[0]);
    _mm256_stream_pd(p + 4, u.h[1]);
#else
    union { fx_vf64 v; __m128d q[4]; } u = {v};
    for (int k = 0; k < 4; k++) _mm_stream_pd(p + 2 * k, u.q[k]);
#endif
}
FX_INLINE void fx_stream_fence(void) { _mm_sfence(); }
#else
#define FX_HAVE_STREAM 0
FX_INLINE void fx_stream_f32(float *p, fx_vf32 v) { memcpy(p, &v, sizeof v); }
FX_INLINE void fx_stream_f64(double *p, fx_vf64 v) { memcpy(p, &v, sizeof v); }
FX_INLINE void fx_stream_fence(void) {}
#endif

/* Lanewise m ? a : b, for a mask m from a vector comparison (all bits set
   or none). AVX2 has a one-instruction blend; the and/andnot/or form costs
   three, and the exp kernel selects twice per vector. */
#if defined(__AVX__) && !defined(__AVX512F__)
FX_INLINE fx_vf32 fx_sel_f32(fx_vi32 m, fx_vf32 a, fx_vf32 b)
{
    union { fx_vf32 v; __m256 h[2]; } ua = {a}, ub = {b}, r;
    union { fx_vi32 v; __m256 h[2]; } um = {m};
    for (int k = 0; k < 2; k++) r.h[k] = _mm256_blendv_ps(ub.h[k], ua.h[k], um.h[k]);
    return r.v;
}
FX_INLINE fx_vf64 fx_sel_f64(fx_vi64 m, fx_vf64 a, fx_vf64 b)
{
    union { fx_vf64 v; __m256d h[2]; } ua = {a}, ub = {b}, r;
    union { fx_vi64 v; __m256d h[2]; } um = {m};
    for (int k = 0; k < 2; k++) r.h[k] = _mm256_blendv_pd(ub.h[k], ua.h[k], um.h[k]);
    return r.v;
}
#else
FX_INLINE fx_vf32 fx_sel_f32(fx_vi32 m, fx_vf32 a, fx_vf32 b)
{
    return (fx_vf32)(((fx_vu32)a & (fx_vu32)m) | ((fx_vu32)b & ~(fx_vu32)m));
}
FX_INLINE fx_vf64 fx_sel_f64(fx_vi64 m, fx_vf64 a, fx_vf64 b)
{
    return (fx_vf64)(((fx_vu64)a & (fx_vu64)m) | ((fx_vu64)b & ~(fx_vu64)m));
}
#endif

#define FX_DEFINE_VEC_HELPERS(SFX, T, V, NV, VL)                                  \
    FX_INLINE V fx_splat_##SFX(T s)                                        \
    {                                                                          \
        V v;                                                                   \
        for (int j = 0; j < VL; j++) v[j] = s;                                 \
        return v;                                                              \
    }                                                                          \
    FX_INLINE V fx_load_##SFX(const T *p)                                  \
    {                                                                          \
        V v;                                                                   \
        memcpy(&v, p, sizeof v);                                               \
        return v;                                                              \
    }                                                                          \
    /* The first n (< VL) elements of p; the other lanes hold fill. */         \
    FX_INLINE V fx_load_tail_##SFX(const T *p, int64_t n, T fill)          \
    {                                                                          \
        V v = fx_splat_##SFX(fill);                                            \
        for (int64_t j = 0; j < n; j++) v[j] = p[j];                           \
        return v;                                                              \
    }                                                                          \
    /* By native parts: a whole-vector memcpy of a 64-byte vector the ISA  */ \
    /* has no register for goes through the stack and general registers.   */ \
    FX_INLINE void fx_store_##SFX(T *p, V v)                               \
    {                                                                          \
        union { V v; NV n[FX_NPARTS]; } u = {v};                               \
        for (int k = 0; k < FX_NPARTS; k++)                                    \
            memcpy((char *)p + k * FX_NBYTES, &u.n[k], FX_NBYTES);             \
    }                                                                          \
    FX_INLINE void fx_store_tail_##SFX(T *p, V v, int64_t n)               \
    {                                                                          \
        for (int64_t j = 0; j < n; j++) p[j] = v[j];                           \
    }                                                                          \
    /* Lanewise maximum that skips NaN in b; NaN rows are caught by the    */ \
    /* sum of exponentials, which NaN poisons.                              */ \
    FX_INLINE V fx_vmax_##SFX(V a, V b) { return fx_sel_##SFX(fx_lt_##SFX(a, b), b, a); } \
    /* Lanes combined in a fixed order, in double. */                          \
    FX_INLINE double fx_hsum_##SFX(V v)                                    \
    {                                                                          \
        double s = 0.0;                                                        \
        for (int j = 0; j < VL; j++) s += (double)v[j];                        \
        return s;                                                              \
    }                                                                          \
    FX_INLINE T fx_hmax_##SFX(V v)                                         \
    {                                                                          \
        T m = v[0];                                                            \
        for (int j = 1; j < VL; j++) m = v[j] > m ? v[j] : m;                  \
        return m;                                                              \
    }

FX_DEFINE_VEC_HELPERS(f32, float, fx_vf32, fx_nf32, 16)
FX_DEFINE_VEC_HELPERS(f64, double, fx_vf64, fx_nf64, 8)

/* Loop-carried vectors. A 64-byte vector that the ISA has no register for
   (AVX2, SSE2) is kept in memory by GCC whenever its value crosses a loop
   iteration, and every update goes through the stack and general registers
   (the AVX2 sum-of-exponentials loop ran 1.4x slower for it). Accumulators
   are therefore arrays of native vectors, which stay in registers; lane by
   lane the arithmetic is the same, so the bits are too. */
#define FX_DEFINE_ACC(SFX, V, NV, NP)                                          \
    typedef struct { NV p[NP]; } fx_acc_##SFX;                                 \
    FX_INLINE fx_acc_##SFX fx_acc_init_##SFX(V v)                              \
    {                                                                          \
        fx_acc_##SFX a;                                                        \
        memcpy(&a, &v, sizeof v);                                              \
        return a;                                                              \
    }                                                                          \
    FX_INLINE V fx_acc_get_##SFX(fx_acc_##SFX a)                               \
    {                                                                          \
        V v;                                                                   \
        memcpy(&v, &a, sizeof v);                                              \
        return v;                                                              \
    }                                                                          \
    FX_INLINE fx_acc_##SFX fx_acc_add_##SFX(fx_acc_##SFX a, V v)               \
    {                                                                          \
        const fx_acc_##SFX b = fx_acc_init_##SFX(v);                           \
        for (int k = 0; k < NP; k++) a.p[k] += b.p[k];                         \
        return a;                                                              \
    }                                                                          \
    /* fx_vmax's rule: b replaces a where a < b, so NaN in b is skipped. */   \
    FX_INLINE fx_acc_##SFX fx_acc_max_##SFX(fx_acc_##SFX a, V v)               \
    {                                                                          \
        const fx_acc_##SFX b = fx_acc_init_##SFX(v);                           \
        for (int k = 0; k < NP; k++) {                                         \
            const NV lt = (NV)(a.p[k] < b.p[k]);                               \
            a.p[k] = (NV)(((fx_nacc_bits)a.p[k] & ~(fx_nacc_bits)lt)           \
                          | ((fx_nacc_bits)b.p[k] & (fx_nacc_bits)lt));        \
        }                                                                      \
        return a;                                                              \
    }

typedef int64_t fx_nacc_bits __attribute__((vector_size(FX_NBYTES)));
FX_DEFINE_ACC(f32, fx_vf32, fx_nf32, FX_NPARTS)
FX_DEFINE_ACC(f64, fx_vf64, fx_nf64, FX_NPARTS)
FX_DEFINE_ACC(w32, fx_vw32, fx_nf64, 2 * FX_NPARTS)

#endif
