/*
 * rows/all.h - the row kernels of one dtype, included by kernels_isa.h once
 * per storage dtype with the template parameters it documents (T, V, VL,
 * XT, XLOAD, NM, KFN, ...). This file adds the short names the kernels use
 * for the dtype's vec.h helpers, includes every family, and removes them
 * again so the next dtype starts clean.
 */

/* vec.h helpers of the compute dtype T: vectors V ... */
#define LOAD SFX(fx_load)
#define LOAD_TAIL SFX(fx_load_tail)
#define STORE SFX(fx_store)
#define STORE_TAIL SFX(fx_store_tail)
#define SPLAT SFX(fx_splat)
#define SEL SFX(fx_sel)
#define VMAX SFX(fx_vmax)
#define HSUM SFX(fx_hsum)
#define HMAX SFX(fx_hmax)
#define EXPM SFX(fx_expm)
#define EXPS SFX(fx_expsum) /* terms only summed (expm.h) */
/* ... and accumulators (vec.h): ACC for V, ACCW for VW. */
#define ACC SFX(fx_acc)
#define AINIT SFX(fx_acc_init)
#define AGET SFX(fx_acc_get)
#define AADD SFX(fx_acc_add)
#define AMAX SFX(fx_acc_max)
#define ACCW WSFX(fx_acc)
#define AWINIT WSFX(fx_acc_init)
#define AWGET WSFX(fx_acc_get)
#define AWADD WSFX(fx_acc_add)

/* Elements summed per chunk of a row (stats.h). */
#define CHUNK FX_CHUNK

/* A loop over lanes [lo, hi) in steps of VL whose body sees k, the lanes in
   this step: the body is expanded twice, so full vectors (k == VL, a
   constant) compile without the tail's partial loads, stores and branches.
   The braces around the body keep its commas away from the preprocessor. */
#define FX_LANES(i, lo, hi, k, ...)                                             \
    do {                                                                       \
        const int64_t hi_ = (hi);                                              \
        int64_t i = (lo);                                                      \
        for (; i + VL <= hi_; i += VL) {                                       \
            const int64_t k = VL;                                              \
            __VA_ARGS__                                                        \
        }                                                                      \
        if (i < hi_) {                                                         \
            const int64_t k = hi_ - i;                                         \
            __VA_ARGS__                                                        \
        }                                                                      \
    } while (0)

/* Shared row primitives, in dependency order ... */
#include "stats.h"   /* row max, chunked sums of exponentials, pairs, prefetch */
#include "write.h"   /* the output writers: log-softmax, gradient, scale, zero */
#include "small.h"   /* one row per lane for small rows */
#include "split.h"   /* the passes of a row split across threads */
/* ... and the op families, each whole. */
#include "ce.h"      /* cross entropy: logits or probabilities, hard or soft */
#include "softmax.h" /* logsumexp, log_softmax, softmax, entropy */
#include "kl.h"      /* KL divergence */
#include "bce.h"     /* binary cross entropy (elementwise) */
#include "shard.h"   /* cross entropy over a vocabulary split into shards */
#include "ce_opts.h" /* cross entropy with soft-capping, z-loss, statistics */
#include "jsd.h"     /* generalised Jensen-Shannon divergence */

#if !X16
static void KFN(expm_array)(const XT *x, T *y, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) STORE(y + i, EXPM(XLOAD(x + i)));
    if (i < n) STORE_TAIL(y + i, EXPM(XLOAD_TAIL(x + i, n - i, 0)), n - i);
}

#if VL == 16 /* float32 */
static void KFN(expsum_array)(const XT *x, T *y, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) STORE(y + i, EXPS(XLOAD(x + i)));
    if (i < n) STORE_TAIL(y + i, EXPS(XLOAD_TAIL(x + i, n - i, 0)), n - i);
}
#endif

#endif /* !X16 */


#undef LOAD
#undef LOAD_TAIL
#undef STORE
#undef STORE_TAIL
#undef SPLAT
#undef SEL
#undef VMAX
#undef HSUM
#undef HMAX
#undef EXPM
#undef EXPS
#undef ACC
#undef AINIT
#undef AGET
#undef AADD
#undef AMAX
#undef ACCW
#undef AWINIT
#undef AWGET
#undef AWADD
#undef CHUNK
#undef FX_LANES
#undef PF_BYTES
#undef PF_AHEAD
#undef D_SHIFT
#undef D_SCALE
#undef D_UNSCALE
#undef SMALL_C
#undef SMALL_SELECT
#undef SMALL_PAIR
#undef PAIR_BYTES
#undef X16
#undef XT
#undef XLOAD
#undef XLOAD_TAIL
#undef XSTORE
#undef XSTORE_TAIL
#undef XGET
#undef XSET
#undef NM
#undef KFN
