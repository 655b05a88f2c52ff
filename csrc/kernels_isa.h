/*
 * kernels_isa.h - one instruction set's copy of the row kernels.
 *
 * kernels_<isa>.c defines FX_ISA (the table's suffix) and FX_ISA_NAME and
 * includes this file; setup.py compiles each with its own -m flags. The
 * kernels are the same source every time, and every function is static, so
 * the copies never merge at link time; only the table fx_isa_<isa> is
 * exported.
 *
 * The row kernels (rows/<name>.h) are written once, as a template over the
 * storage dtype, and included here once per dtype (rows/all.h) with these
 * parameters, the only ones they use:
 *
 *   compute dtype (float32 for float32, float16 and bfloat16 rows):
 *   T            float or double: what the kernels compute in; weights,
 *                soft targets and the other per-class inputs are T arrays
 *   V            fx_vf32 / fx_vf64: a 64-byte vector of T (vec.h)
 *   VI           fx_vi32 / fx_vi64: V's comparison mask
 *   VW           a vector of VL doubles (fx_vw32 for float, two 64-byte
 *                halves; fx_vf64 for double): the small-row kernels' sums
 *   VL           lanes of V: 16 or 8
 *   SFX(f)       f##_f32 / f##_f64: T's vec.h / expm.h / logm.h helper
 *   WSFX(f)      f##_w32 / f##_f64: VW's accumulator helper
 *
 *   storage dtype of the rows x and out:
 *   X16          1 for float16 / bfloat16 storage, else 0
 *   XT           float, double or uint16_t: one stored element
 *   XLOAD(p)     VL elements at p as a V (16-bit rows widened, half.h)
 *   XLOAD_TAIL(p, k, fill)  k < VL elements, other lanes fill
 *   XSTORE(p, v) V to VL elements at p (16-bit: rounded to nearest even)
 *   XSTORE_TAIL(p, v, k)    its first k lanes
 *   XGET(p, i)   element i as a T;  XSET(p, i, v): store the T v there
 *
 *   names:
 *   NM(f)        f##_<dtype>: a static helper of this dtype
 *   KFN(f)       f_<dtype>_<isa>: a kernel that goes into the table
 *
 * rows/all.h undefines the storage parameters and the names after use;
 * the compute parameters stay until their last dtype is done.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastxent.h"
#include "simd/vec.h"
#include "simd/expm.h"
#include "simd/logm.h"
#include "simd/tanhm.h"
#include "simd/half.h"
#include "simd/tile.h"

#define FX_CAT3_(a, b, c) a##_##b##_##c
#define FX_CAT3(a, b, c) FX_CAT3_(a, b, c)
#define FX_CAT2_(a, b) a##_##b
#define FX_CAT2(a, b) FX_CAT2_(a, b)

/* ---- float32 compute: float32, float16 and bfloat16 storage ---------- */
#define T float
#define V fx_vf32
#define VI fx_vi32
#define VW fx_vw32
#define VL 16
#define SFX(f) f##_f32
#define WSFX(f) f##_w32

#define X16 0
#define XT float
#define XLOAD fx_load_f32
#define XLOAD_TAIL fx_load_tail_f32
#define XSTORE fx_store_f32
#define XSTORE_TAIL fx_store_tail_f32
#define XGET(p, i) ((p)[i])
#define XSET(p, i, v) ((p)[i] = (v))
#define NM(f) f##_f32
#define KFN(f) FX_CAT3(f, f32, FX_ISA)
#include "rows/all.h"

#define X16 1
#define XT uint16_t
#define XLOAD fx_load_f16
#define XLOAD_TAIL fx_load_tail_f16
#define XSTORE fx_store_f16
#define XSTORE_TAIL fx_store_tail_f16
#define XGET(p, i) fx_get_f16(p, i)
#define XSET(p, i, v) fx_set_f16(p, i, v)
#define NM(f) f##_f16
#define KFN(f) FX_CAT3(f, f16, FX_ISA)
#include "rows/all.h"

#define X16 1
#define XT uint16_t
#define XLOAD fx_load_bf16
#define XLOAD_TAIL fx_load_tail_bf16
#define XSTORE fx_store_bf16
#define XSTORE_TAIL fx_store_tail_bf16
#define XGET(p, i) fx_get_bf16(p, i)
#define XSET(p, i, v) fx_set_bf16(p, i, v)
#define NM(f) f##_bf16
#define KFN(f) FX_CAT3(f, bf16, FX_ISA)
#include "rows/all.h"

#undef T
#undef V
#undef VI
#undef VW
#undef VL
#undef SFX
#undef WSFX

/* ---- float64 compute and storage ------------------------------------- */
#define T double
#define V fx_vf64
#define VI fx_vi64
#define VW fx_vf64
#define VL 8
#define SFX(f) f##_f64
#define WSFX(f) f##_f64

#define X16 0
#define XT double
#define XLOAD fx_load_f64
#define XLOAD_TAIL fx_load_tail_f64
#define XSTORE fx_store_f64
#define XSTORE_TAIL fx_store_tail_f64
#define XGET(p, i) ((p)[i])
#define XSET(p, i, v) ((p)[i] = (v))
#define NM(f) f##_f64
#define KFN(f) FX_CAT3(f, f64, FX_ISA)
#include "rows/all.h"

/* fx_check_labels (reduce.c). The label by label loop stops at the first
   bad label. With vector compares (AVX2's 64-bit ones), blocks of labels
   are checked branch-free and a block with a bad label is checked again
   label by label: 65536 labels in 18 us against 37 (Xeon, AVX2 and
   AVX-512 alike). Without them the blocked loop took 48. */
static int64_t FX_CAT2(check_labels_scalar, FX_ISA)(const int64_t *labels, int64_t n,
                                                    int64_t n_cols, int64_t ig, int64_t *counted)
{
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t y = labels[i];
        if (y == ig) continue;
        if (y < 0 || y >= n_cols) return i;
        k++;
    }
    *counted = k;
    return -1;
}

static int64_t FX_CAT2(check_labels, FX_ISA)(const int64_t *labels, int64_t n, int64_t n_cols,
                                             int64_t ig, int64_t *counted)
{
#if defined(__AVX2__)
    enum { BLOCK = 256 };
    int64_t ignored = 0;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        const int64_t i1 = n - i0 < BLOCK ? n : i0 + BLOCK;
        int64_t bad = 0, g = 0, i = i0;
#if defined(__AVX512F__)
        /* Mask compares, one load per 8 labels: GCC's form of the loop
           below loaded each vector three times and turned its masks into
           vectors to add and or them (65536 x 10 loss, AVX-512, Xeon:
           0.95x the time with this loop). */
        {
            const __m512i vig = _mm512_set1_epi64(ig), vn = _mm512_set1_epi64(n_cols);
            __m512i gv = _mm512_setzero_si512();
            __mmask8 badm = 0;
            for (; i + 8 <= i1; i += 8) {
                const __m512i v = _mm512_loadu_si512((const void *)(labels + i));
                const __mmask8 mi = _mm512_cmpeq_epi64_mask(v, vig);
                badm |= _mm512_mask_cmpge_epu64_mask((__mmask8)~mi, v, vn);
                gv = _mm512_mask_sub_epi64(gv, mi, gv, _mm512_set1_epi64(-1));
            }
            bad = badm != 0;
            g = _mm512_reduce_add_epi64(gv);
        }
#endif
        for (; i < i1; i++) {
            const int64_t y = labels[i], is_ig = y == ig;
            g += is_ig;
            bad |= ((uint64_t)y >= (uint64_t)n_cols) & !is_ig;
        }
        if (bad) {
            int64_t unused;
            return i0 + FX_CAT2(check_labels_scalar, FX_ISA)(labels + i0, i1 - i0, n_cols, ig,
                                                             &unused);
        }
        ignored += g;
    }
    *counted = n - ignored;
    return -1;
#else
    return FX_CAT2(check_labels_scalar, FX_ISA)(labels, n, n_cols, ig, counted);
#endif
}

/* Every op has a kernel for every storage dtype. */
#define FX_ALL(op) {FX_CAT3(op, f32, FX_ISA), FX_CAT3(op, f64, FX_ISA), \
                    FX_CAT3(op, f16, FX_ISA), FX_CAT3(op, bf16, FX_ISA)}

const fx_isa FX_CAT2(fx_isa, FX_ISA) = {
    .name = FX_ISA_NAME,
    .fn = {
        [FX_CE_HARD] = FX_ALL(ce_hard),
        [FX_CE_SOFT] = FX_ALL(ce_soft),
        [FX_CE_PROBS_HARD] = FX_ALL(ce_probs),
        [FX_CE_PROBS_SOFT] = FX_ALL(ce_probs),
        [FX_LOGSUMEXP] = FX_ALL(logsumexp),
        [FX_LOG_SOFTMAX] = FX_ALL(log_softmax),
        [FX_SOFTMAX] = FX_ALL(softmax),
        [FX_ENTROPY] = FX_ALL(entropy),
        [FX_ENTROPY_PROBS] = FX_ALL(entropy_probs),
        [FX_KL_PROBS] = FX_ALL(kl_probs),
        [FX_KL_LOG_PROBS] = FX_ALL(kl_log_probs),
        [FX_KL_LOGITS] = FX_ALL(kl_logits),
        [FX_BCE_LOGITS] = FX_ALL(bce_logits),
        [FX_BCE_PROBS] = FX_ALL(bce_probs),
        [FX_SHARD_STATS] = FX_ALL(shard_stats),
        [FX_SHARD_GRAD] = FX_ALL(shard_grad),
        [FX_CE_OPTS_HARD] = FX_ALL(ce_opts_hard),
        [FX_CE_OPTS_SOFT] = FX_ALL(ce_opts_soft),
        [FX_JSD_PROBS] = FX_ALL(jsd_probs),
        [FX_JSD_LOG_PROBS] = FX_ALL(jsd_log_probs),
        [FX_JSD_LOGITS] = FX_ALL(jsd_logits),
    },
    .split = {
        [FX_CE_HARD] = FX_ALL(ce_hard_split),
        [FX_LOGSUMEXP] = FX_ALL(logsumexp_split),
        [FX_LOG_SOFTMAX] = FX_ALL(log_softmax_split),
        [FX_SOFTMAX] = FX_ALL(softmax_split),
    },
    .range_max = FX_ALL(range_max),
    .chunk_sums = FX_ALL(chunk_sums),
    .group_lse = FX_ALL(group_lse),
    .range_write = FX_ALL(range_write),
    .expm_f32 = FX_CAT3(expm_array, f32, FX_ISA),
    .expm_f64 = FX_CAT3(expm_array, f64, FX_ISA),
    .expsum_f32 = FX_CAT3(expsum_array, f32, FX_ISA),
    .tanh_f32 = FX_CAT3(tanh_array, f32, FX_ISA),
    .tanh_f64 = FX_CAT3(tanh_array, f64, FX_ISA),
    .check_labels = FX_CAT2(check_labels, FX_ISA),
};
