/*
 * vec.h - fixed-width vectors for the row kernels.
 *
 * Every kernel works on 64-byte vectors (16 floats or 8 doubles) written
 * with GCC/Clang vector extensions. The compiler lowers one such vector to
 * one zmm register (AVX-512), two ymm (AVX2) or four xmm (SSE2), but the
 * arithmetic of every lane is the same, and so is the order in which lanes
 * are combined. That is what makes every ISA build give bitwise-identical
 * results: the width of the hardware never changes the summation order.
 * (The build also turns off floating-point contraction for the same reason;
 * fused operations are written out with fx_fma_f32, which every ISA rounds
 * the same.)
 *
 * Loads and stores go through memcpy so that no alignment is assumed.
 */
#ifndef FASTXENT_VEC_H
#define FASTXENT_VEC_H

#include <stdint.h>
#include <string.h>
#include <float.h>
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

/* Stores by native parts taken with __builtin_shufflevector, which GCC
   maps onto the registers holding them. A 64-byte vector the ISA has no
   register for, stored whole (memcpy) or through a union of parts, went
   through the stack in 16- and 8-byte pieces, and a following 32-byte load
   of them could not be forwarded: the AVX2 gradient-scaling loops stalled
   on every vector. Only stores split this way: splitting operands (in
   fx_sel, for instance) made the exp kernel 1.1-1.4x slower. */
#define FX_I2(o) (o), (o) + 1
#define FX_I4(o) FX_I2(o), FX_I2((o) + 2)
#define FX_I8(o) FX_I4(o), FX_I4((o) + 4)
/* Part k (of L lanes, L = 2, 4 or 8) of v, as the native type NV. */
#define FX_PART(v, NV, L, k) ((NV)__builtin_shufflevector(v, v, FX_I##L((k) * L)))
/* v to p as 2 or 4 native parts of L lanes. */
#define FX_PUT_PART(p, v, NV, L, k)                                            \
    ({                                                                         \
        const NV q_ = FX_PART(v, NV, L, k);                                    \
        memcpy((p) + (k) * L, &q_, sizeof q_);                                 \
    })
#define FX_STORE2(p, v, NV, L) (FX_PUT_PART(p, v, NV, L, 0), FX_PUT_PART(p, v, NV, L, 1))
#define FX_STORE4(p, v, NV, L)                                                 \
    (FX_STORE2(p, v, NV, L), FX_PUT_PART(p, v, NV, L, 2), FX_PUT_PART(p, v, NV, L, 3))
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
/* Integer compares go the same way (the 16-bit stores' rounding). */
FX_DEFINE_CMP(i32, fx_vi32, fx_vi32, fx_ni32, fx_ni32, lt, <)

/* fx_vmax's rule on native vectors, b where a < b, else a: x86's max with
   its operands swapped, maxps(b, a), returns its second operand unless
   b > a, which is the same lane for lane (a NaN b leaves a, a NaN a stays,
   and of -0 and +0 a stays). One instruction where the compare and the
   select cost two or three (AVX-512: compare, mask to vector, ternlog). */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
FX_INLINE fx_nf32 fx_nmax_f32(fx_nf32 a, fx_nf32 b)
{
#if defined(__AVX512F__)
    return (fx_nf32)_mm512_max_ps((__m512)b, (__m512)a);
#elif defined(__AVX__)
    return (fx_nf32)_mm256_max_ps((__m256)b, (__m256)a);
#elif defined(__SSE2__)
    return (fx_nf32)_mm_max_ps((__m128)b, (__m128)a);
#else
    const fx_ni32 lt = a < b;
    return (fx_nf32)(((fx_ni32)a & ~lt) | ((fx_ni32)b & lt));
#endif
}
FX_INLINE fx_nf64 fx_nmax_f64(fx_nf64 a, fx_nf64 b)
{
#if defined(__AVX512F__)
    return (fx_nf64)_mm512_max_pd((__m512d)b, (__m512d)a);
#elif defined(__AVX__)
    return (fx_nf64)_mm256_max_pd((__m256d)b, (__m256d)a);
#elif defined(__SSE2__)
    return (fx_nf64)_mm_max_pd((__m128d)b, (__m128d)a);
#else
    const fx_ni64 lt = a < b;
    return (fx_nf64)(((fx_ni64)a & ~lt) | ((fx_ni64)b & lt));
#endif
}


/* Streaming (non-temporal) stores of a 64-byte vector to a 64-byte
   aligned address: large outputs are written without first reading their
   lines into the cache (no read-for-ownership), which is what bounds a
   gradient pass over main memory. Same bits as a normal store. */
#if defined(__x86_64__) || defined(__i386__)
FX_INLINE void fx_stream_f32(float *p, fx_vf32 v)
{
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(p, (__m256)FX_PART(v, fx_nf32, 8, 0));
    _mm256_stream_ps(p + 8, (__m256)FX_PART(v, fx_nf32, 8, 1));
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
    _mm256_stream_pd(p, (__m256d)FX_PART(v, fx_nf64, 4, 0));
    _mm256_stream_pd(p + 4, (__m256d)FX_PART(v, fx_nf64, 4, 1));
#else
    union { fx_vf64 v; __m128d q[4]; } u = {v};
    for (int k = 0; k < 4; k++) _mm_stream_pd(p + 2 * k, u.q[k]);
#endif
}
FX_INLINE void fx_stream_fence(void) { _mm_sfence(); }

/* Whether any lane of a comparison result (all bits set or none) is set:
   one test of the native parts (a lane loop was scalarised by GCC). */
FX_INLINE int fx_any_f32(fx_vi32 m)
{
#if defined(__AVX512F__)
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(__AVX2__)
    union { fx_vi32 v; __m256i h[2]; } u = {m};
    const __m256i o = _mm256_or_si256(u.h[0], u.h[1]);
    return !_mm256_testz_si256(o, o);
#else
    union { fx_vi32 v; __m128i q[4]; } u = {m};
    const __m128i o = _mm_or_si128(_mm_or_si128(u.q[0], u.q[1]), _mm_or_si128(u.q[2], u.q[3]));
    return _mm_movemask_epi8(o) != 0;
#endif
}
FX_INLINE int fx_any_f64(fx_vi64 m)
{
    return fx_any_f32((fx_vi32)m);
}

/* Whether any lane of a or b is above t (NaN never is), as one branch on
   the native compare masks: the generic fx_any of a compare result was
   scalarised by GCC into a chain of 16 extracts. */
FX_INLINE int fx_any_above2_f32(fx_vf32 a, fx_vf32 b, float t)
{
#if defined(__AVX512F__)
    const __m512 vt = _mm512_set1_ps(t);
    /* kortest on the two masks: OR-ing them in general registers cost
       three more instructions per pair. */
    return !_kortestz_mask16_u8(_mm512_cmp_ps_mask((__m512)a, vt, _CMP_GT_OQ),
                                _mm512_cmp_ps_mask((__m512)b, vt, _CMP_GT_OQ));
#elif defined(__AVX__)
    union { fx_vf32 v; __m256 h[2]; } ua = {a}, ub = {b};
    const __m256 vt = _mm256_set1_ps(t);
    const __m256 o = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(ua.h[0], vt, _CMP_GT_OQ), _mm256_cmp_ps(ua.h[1], vt, _CMP_GT_OQ)),
                                  _mm256_or_ps(_mm256_cmp_ps(ub.h[0], vt, _CMP_GT_OQ), _mm256_cmp_ps(ub.h[1], vt, _CMP_GT_OQ)));
    return _mm256_movemask_ps(o) != 0;
#else
    union { fx_vf32 v; __m128 q[4]; } ua = {a}, ub = {b};
    const __m128 vt = _mm_set1_ps(t);
    __m128 o = _mm_setzero_ps();
    for (int k = 0; k < 4; k++) o = _mm_or_ps(o, _mm_or_ps(_mm_cmpgt_ps(ua.q[k], vt), _mm_cmpgt_ps(ub.q[k], vt)));
    return _mm_movemask_ps(o) != 0;
#endif
}
FX_INLINE int fx_any_above2_f64(fx_vf64 a, fx_vf64 b, double t)
{
#if defined(__AVX512F__)
    const __m512d vt = _mm512_set1_pd(t);
    return !_kortestz_mask8_u8(_mm512_cmp_pd_mask((__m512d)a, vt, _CMP_GT_OQ),
                               _mm512_cmp_pd_mask((__m512d)b, vt, _CMP_GT_OQ));
#elif defined(__AVX__)
    union { fx_vf64 v; __m256d h[2]; } ua = {a}, ub = {b};
    const __m256d vt = _mm256_set1_pd(t);
    const __m256d o = _mm256_or_pd(_mm256_or_pd(_mm256_cmp_pd(ua.h[0], vt, _CMP_GT_OQ), _mm256_cmp_pd(ua.h[1], vt, _CMP_GT_OQ)),
                                   _mm256_or_pd(_mm256_cmp_pd(ub.h[0], vt, _CMP_GT_OQ), _mm256_cmp_pd(ub.h[1], vt, _CMP_GT_OQ)));
    return _mm256_movemask_pd(o) != 0;
#else
    union { fx_vf64 v; __m128d q[4]; } ua = {a}, ub = {b};
    const __m128d vt = _mm_set1_pd(t);
    __m128d o = _mm_setzero_pd();
    for (int k = 0; k < 4; k++) o = _mm_or_pd(o, _mm_or_pd(_mm_cmpgt_pd(ua.q[k], vt), _mm_cmpgt_pd(ub.q[k], vt)));
    return _mm_movemask_pd(o) != 0;
#endif
}
#else

/* Whether any lane of a comparison result is set. */
FX_INLINE int fx_any_f32(fx_vi32 m)
{
    int any = 0;
    for (int j = 0; j < 16; j++) any |= m[j] != 0;
    return any;
}
FX_INLINE int fx_any_f64(fx_vi64 m)
{
    int any = 0;
    for (int j = 0; j < 8; j++) any |= m[j] != 0;
    return any;
}

FX_INLINE int fx_any_above2_f32(fx_vf32 a, fx_vf32 b, float t)
{
    int any = 0;
    for (int j = 0; j < 16; j++) any |= (a[j] > t) | (b[j] > t);
    return any;
}
FX_INLINE int fx_any_above2_f64(fx_vf64 a, fx_vf64 b, double t)
{
    int any = 0;
    for (int j = 0; j < 8; j++) any |= (a[j] > t) | (b[j] > t);
    return any;
}

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

/* AVX-512: a broadcast as a shuffle of lane 0. GCC 12 builds the lane
   loop into a single broadcast only where its SLP pass sees the whole
   loop; in the big row kernels it became 16 masked broadcasts, one per
   lane, a chain of dependent instructions (about 15,000 of them in the
   build, in the path from each row's max to its exponentials). Not on
   narrower ISAs: there GCC lowers the shuffle of a vector wider than a
   register through memory (AVX2 rows of 128 classes 1.2-1.6x slower). */
#if defined(__AVX512F__) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FX_SPLAT_SHUFFLE 1
#endif
#endif
#ifdef FX_SPLAT_SHUFFLE
#define FX_SPLAT_IDX16 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
#define FX_SPLAT_IDX8 0, 0, 0, 0, 0, 0, 0, 0
#define FX_SPLAT_BODY(V, VL)                                                   \
    const V v = {s};                                                           \
    return __builtin_shufflevector(v, v, FX_SPLAT_IDX##VL);
#else
#define FX_SPLAT_BODY(V, VL)                                                   \
    V v;                                                                       \
    for (int j = 0; j < VL; j++) v[j] = s;                                     \
    return v;
#endif

#define FX_DEFINE_VEC_HELPERS(SFX, T, V, NV, VL)                                  \
    FX_INLINE V fx_splat_##SFX(T s) { FX_SPLAT_BODY(V, VL) }                       \
    FX_INLINE V fx_load_##SFX(const T *p)                                  \
    {                                                                          \
        V v;                                                                   \
        memcpy(&v, p, sizeof v);                                               \
        return v;                                                              \
    }                                                                          \

FX_DEFINE_VEC_HELPERS(f32, float, fx_vf32, fx_nf32, 16)
FX_DEFINE_VEC_HELPERS(f64, double, fx_vf64, fx_nf64, 8)

#if FX_NPARTS == 1
FX_INLINE void fx_store_f32(float *p, fx_vf32 v) { memcpy(p, &v, sizeof v); }
FX_INLINE void fx_store_f64(double *p, fx_vf64 v) { memcpy(p, &v, sizeof v); }
#elif FX_NPARTS == 2
FX_INLINE void fx_store_f32(float *p, fx_vf32 v) { FX_STORE2(p, v, fx_nf32, 8); }
FX_INLINE void fx_store_f64(double *p, fx_vf64 v) { FX_STORE2(p, v, fx_nf64, 4); }
#else
FX_INLINE void fx_store_f32(float *p, fx_vf32 v) { FX_STORE4(p, v, fx_nf32, 4); }
FX_INLINE void fx_store_f64(double *p, fx_vf64 v) { FX_STORE4(p, v, fx_nf64, 2); }
#endif

/* The union copy fx_store used before, kept for one loop: in the exp loop
   that stashes exponentials (chunk_sumexp_) GCC 12 schedules it better
   (gradients were 1.3x faster with it there). */
#define FX_DEFINE_STORE_UNION(SFX, T, V, NV)                                   \
    FX_INLINE void fx_store_union_##SFX(T *p, V v)                         \
    {                                                                          \
        union { V v; NV n[FX_NPARTS]; } u = {v};                               \
        for (int k = 0; k < FX_NPARTS; k++)                                    \
            memcpy((char *)p + k * FX_NBYTES, &u.n[k], FX_NBYTES);             \
    }
FX_DEFINE_STORE_UNION(f32, float, fx_vf32, fx_nf32)
FX_DEFINE_STORE_UNION(f64, double, fx_vf64, fx_nf64)

/* Horizontal sums and maxima as trees over halves: lanes j and j + h are
   combined for h = VL/2, VL/4, ..., 1. The order is fixed by lane
   numbers, so every ISA gives the same bits, and the dependency chain is
   log2(VL) operations instead of VL - 1 (a row's sum and max sit on its
   critical path: a 128-class row spent more time in them than in its
   exponentials). Sums are formed in double. */
typedef double fx_d8 __attribute__((vector_size(64)));
typedef double fx_d4 __attribute__((vector_size(32)));
typedef double fx_d2 __attribute__((vector_size(16)));
typedef float fx_f8 __attribute__((vector_size(32)));
typedef float fx_f4 __attribute__((vector_size(16)));
typedef float fx_f2 __attribute__((vector_size(8)));
typedef int32_t fx_i8 __attribute__((vector_size(32)));
typedef int32_t fx_i4 __attribute__((vector_size(16)));
typedef int32_t fx_i2 __attribute__((vector_size(8)));
typedef int64_t fx_l4 __attribute__((vector_size(32)));
typedef int64_t fx_l2 __attribute__((vector_size(16)));

/* Halve a vector of type W into two of type H and combine them with OP. */
#define FX_HALVE(W, H, v, OP) ({ union { W w; H h[2]; } u_ = {v}; OP(u_.h[0], u_.h[1]); })
#define FX_ADD2(a, b) ((a) + (b))
/* b replaces a where a < b (fx_vmax's rule). */
#define FX_MAX2(a, b, IT) ({ __typeof__(a) a_ = (a), b_ = (b); IT m_ = (IT)(a_ < b_);         \
                             (__typeof__(a))(((IT)a_ & ~m_) | ((IT)b_ & m_)); })
#define FX_MAX2_I8(a, b) FX_MAX2(a, b, fx_i8)
#define FX_MAX2_I4(a, b) FX_MAX2(a, b, fx_i4)
#define FX_MAX2_I2(a, b) FX_MAX2(a, b, fx_i2)
#define FX_MAX2_L4(a, b) FX_MAX2(a, b, fx_l4)
#define FX_MAX2_L2(a, b) FX_MAX2(a, b, fx_l2)

FX_INLINE double fx_hsum_f32(fx_vf32 v)
{
    const fx_d8 a = FX_HALVE(fx_vw32, fx_d8, __builtin_convertvector(v, fx_vw32), FX_ADD2);
    const fx_d4 b = FX_HALVE(fx_d8, fx_d4, a, FX_ADD2);
    const fx_d2 c = FX_HALVE(fx_d4, fx_d2, b, FX_ADD2);
    return c[0] + c[1];
}
FX_INLINE double fx_hsum_f64(fx_vf64 v)
{
    const fx_d4 b = FX_HALVE(fx_vf64, fx_d4, v, FX_ADD2);
    const fx_d2 c = FX_HALVE(fx_d4, fx_d2, b, FX_ADD2);
    return c[0] + c[1];
}
FX_INLINE float fx_hmax_f32(fx_vf32 v)
{
    const fx_f8 a = FX_HALVE(fx_vf32, fx_f8, v, FX_MAX2_I8);
    const fx_f4 b = FX_HALVE(fx_f8, fx_f4, a, FX_MAX2_I4);
    const fx_f2 c = FX_HALVE(fx_f4, fx_f2, b, FX_MAX2_I2);
    return c[0] < c[1] ? c[1] : c[0];
}
FX_INLINE double fx_hmax_f64(fx_vf64 v)
{
    const fx_d4 b = FX_HALVE(fx_vf64, fx_d4, v, FX_MAX2_L4);
    const fx_d2 c = FX_HALVE(fx_d4, fx_d2, b, FX_MAX2_L2);
    return c[0] < c[1] ? c[1] : c[0];
}

/* Row tails: the first n (0 <= n < VL) elements of p, the other lanes
   holding fill; and their store. Masked loads and stores where the ISA has
   them: a vector assembled lane by lane goes through memory, and its
   reload waits for every one of those stores (a store-forwarding stall;
   rows of 40 or 56 floats ran 2x slower per element than rows of 48).
   Masked-off lanes are never accessed, so nothing past p[n - 1] is read or
   written. */
#if defined(__AVX512F__)
FX_INLINE fx_vf32 fx_load_tail_f32(const float *p, int64_t n, float fill)
{
    return (fx_vf32)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1u), p);
}
FX_INLINE void fx_store_tail_f32(float *p, fx_vf32 v, int64_t n)
{
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
}
FX_INLINE fx_vf64 fx_load_tail_f64(const double *p, int64_t n, double fill)
{
    return (fx_vf64)_mm512_mask_loadu_pd(_mm512_set1_pd(fill), (__mmask8)((1u << n) - 1u), p);
}
FX_INLINE void fx_store_tail_f64(double *p, fx_vf64 v, int64_t n)
{
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1u), (__m512d)v);
}
#elif defined(__AVX2__)
/* Lanes [0, n - 8h) of part h. */
FX_INLINE __m256i fx_tail_mask32(int64_t n, int h)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - 8 * h)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FX_INLINE __m256i fx_tail_mask64(int64_t n, int h)
{
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n - 4 * h), _mm256_setr_epi64x(0, 1, 2, 3));
}
FX_INLINE fx_vf32 fx_load_tail_f32(const float *p, int64_t n, float fill)
{
    union { fx_vf32 v; __m256 h[2]; } u;
    for (int h = 0; h < 2; h++) {
        const __m256i m = fx_tail_mask32(n, h);
        u.h[h] = _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p + 8 * h, m),
                                  _mm256_castsi256_ps(m));
    }
    return u.v;
}
FX_INLINE void fx_store_tail_f32(float *p, fx_vf32 v, int64_t n)
{
    _mm256_maskstore_ps(p, fx_tail_mask32(n, 0), (__m256)FX_PART(v, fx_nf32, 8, 0));
    _mm256_maskstore_ps(p + 8, fx_tail_mask32(n, 1), (__m256)FX_PART(v, fx_nf32, 8, 1));
}
FX_INLINE fx_vf64 fx_load_tail_f64(const double *p, int64_t n, double fill)
{
    union { fx_vf64 v; __m256d h[2]; } u;
    for (int h = 0; h < 2; h++) {
        const __m256i m = fx_tail_mask64(n, h);
        u.h[h] = _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p + 4 * h, m),
                                  _mm256_castsi256_pd(m));
    }
    return u.v;
}
FX_INLINE void fx_store_tail_f64(double *p, fx_vf64 v, int64_t n)
{
    _mm256_maskstore_pd(p, fx_tail_mask64(n, 0), (__m256d)FX_PART(v, fx_nf64, 4, 0));
    _mm256_maskstore_pd(p + 4, fx_tail_mask64(n, 1), (__m256d)FX_PART(v, fx_nf64, 4, 1));
}
#else
#define FX_DEFINE_TAIL(SFX, T, V)                                              \
    FX_INLINE V fx_load_tail_##SFX(const T *p, int64_t n, T fill)          \
    {                                                                          \
        V v = fx_splat_##SFX(fill);                                            \
        for (int64_t j = 0; j < n; j++) v[j] = p[j];                           \
        return v;                                                              \
    }                                                                          \
    FX_INLINE void fx_store_tail_##SFX(T *p, V v, int64_t n)               \
    {                                                                          \
        for (int64_t j = 0; j < n; j++) p[j] = v[j];                           \
    }
FX_DEFINE_TAIL(f32, float, fx_vf32)
FX_DEFINE_TAIL(f64, double, fx_vf64)
#endif

/* Loop-carried vectors. A 64-byte vector that the ISA has no register for
   (AVX2, SSE2) is kept in memory by GCC whenever its value crosses a loop
   iteration, and every update goes through the stack and general registers
   (the AVX2 sum-of-exponentials loop ran 1.4x slower for it). Accumulators
   are therefore arrays of native vectors, which stay in registers; lane by
   lane the arithmetic is the same, so the bits are too. */
#define FX_DEFINE_ACC(SFX, V, NV, NP, NMAX)                                    \
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
        for (int k = 0; k < NP; k++) a.p[k] = NMAX(a.p[k], b.p[k]);            \
        return a;                                                              \
    }

FX_DEFINE_ACC(f32, fx_vf32, fx_nf32, FX_NPARTS, fx_nmax_f32)
FX_DEFINE_ACC(f64, fx_vf64, fx_nf64, FX_NPARTS, fx_nmax_f64)
FX_DEFINE_ACC(w32, fx_vw32, fx_nf64, 2 * FX_NPARTS, fx_nmax_f64)

/* Lanewise maximum that skips NaN in b, by native parts (fx_nmax); NaN
   rows are caught by the sum of exponentials, which NaN poisons. */
FX_INLINE fx_vf32 fx_vmax_f32(fx_vf32 a, fx_vf32 b)
{
    return fx_acc_get_f32(fx_acc_max_f32(fx_acc_init_f32(a), b));
}
FX_INLINE fx_vf64 fx_vmax_f64(fx_vf64 a, fx_vf64 b)
{
    return fx_acc_get_f64(fx_acc_max_f64(fx_acc_init_f64(a), b));
}

/* a * b + c rounded once, lane by lane: the same bits on every ISA, which
   contraction (left to the compiler, and off in the build) would not give.
   AVX2 and AVX-512 have the instruction. x86 without FMA forms it exactly
   from doubles: a * b is exact in a double (24 + 24 bits), and rounding
   a * b + c to double and then to float rounds once unless the double
   lands exactly halfway between two floats after an inexact addition,
   which goes to the C library's fmaf. (A float result in the subnormal
   range rounds at a higher bit, which the halfway test does not see: it
   is exact only where the double sum is, as for the exp's one such case,
   see expm.h. A new caller with inexact subnormal results needs a wider
   test.) Elsewhere the compiler's fmaf per lane is the
   hardware's. */
#if !defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
/* Out of line: inlined into every exp, it made the baseline build's
   kernels many times larger. */
static __attribute__((noinline, unused)) fx_vf32 fx_fma_f32_emul(fx_vf32 a, fx_vf32 b, fx_vf32 c)
{
    enum { H = (int)(FX_VBYTES / sizeof(double)) };
    fx_vf32 r;
    int hard = 0;
    for (int h = 0; h < 2; h++) {
        fx_vf64 A, B, C;
        for (int j = 0; j < H; j++) {
            A[j] = a[h * H + j];
            B[j] = b[h * H + j];
            C[j] = c[h * H + j];
        }
        const fx_vf64 P = A * B, S = P + C;
        const fx_vu64 u = (fx_vu64)S;
        const fx_vi64 mid = (fx_vi64)((u & 0x1fffffffull) == 0x10000000ull);
        const fx_vi64 exact = (S - P == C) & (S - C == P);
        hard |= fx_any_f64(mid & ~exact);
        for (int j = 0; j < H; j++) r[h * H + j] = (float)S[j];
    }
    if (__builtin_expect(hard, 0))
        for (int j = 0; j < (int)(FX_VBYTES / sizeof(float)); j++) r[j] = fmaf(a[j], b[j], c[j]);
    return r;
}
#endif
FX_INLINE fx_vf32 fx_fma_f32(fx_vf32 a, fx_vf32 b, fx_vf32 c)
{
#if defined(__AVX512F__)
    return (fx_vf32)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && defined(__AVX__)
    union { fx_vf32 v; __m256 h[FX_NPARTS]; } ua = {a}, ub = {b}, uc = {c}, r;
    for (int k = 0; k < FX_NPARTS; k++) r.h[k] = _mm256_fmadd_ps(ua.h[k], ub.h[k], uc.h[k]);
    return r.v;
#elif defined(__x86_64__) || defined(__i386__)
    return fx_fma_f32_emul(a, b, c);
#else
    fx_vf32 r;
    for (int j = 0; j < (int)(FX_VBYTES / sizeof(float)); j++) r[j] = __builtin_fmaf(a[j], b[j], c[j]);
    return r;
#endif
}

#endif
