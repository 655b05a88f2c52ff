/*
 * kernels_isa.h - one instruction set's copy of the row kernels.
 *
 * kernels_<isa>.c defines FX_ISA (the table's suffix) and includes this
 * file; setup.py compiles each with its own -m flags. The kernels are the
 * same source every time, and every function is static, so the copies never
 * merge at link time; only the table fx_isa_<isa> is exported.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastxent.h"
#include "ce_row.h"
#include "vec.h"
#include "expm.h"
#include "logm.h"
#include "half.h"
#include "tile.h"

#define FX_CAT3_(a, b, c) a##_##b##_##c
#define FX_CAT3(a, b, c) FX_CAT3_(a, b, c)
#define FX_CAT2_(a, b) a##_##b
#define FX_CAT2(a, b) FX_CAT2_(a, b)

#define T float
#define V fx_vf32
#define VI fx_vi32
#define VW fx_vw32
#define WSFX(f) f##_w32
#define VL 16
#define SFX(f) f##_f32

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
#include "kernels_impl.h"
#undef NM
#undef KFN
#undef X16
#undef XT
#undef XLOAD
#undef XLOAD_TAIL
#undef XSTORE
#undef XSTORE_TAIL
#undef XGET
#undef XSET

/* float16 and bfloat16 storage: the same float32 kernels, widening loads
   and rounding stores (half.h). */
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
#include "kernels_impl.h"
#undef NM
#undef KFN
#undef XLOAD
#undef XLOAD_TAIL
#undef XSTORE
#undef XSTORE_TAIL
#undef XGET
#undef XSET

#define XLOAD fx_load_bf16
#define XLOAD_TAIL fx_load_tail_bf16
#define XSTORE fx_store_bf16
#define XSTORE_TAIL fx_store_tail_bf16
#define XGET(p, i) fx_get_bf16(p, i)
#define XSET(p, i, v) fx_set_bf16(p, i, v)
#define NM(f) f##_bf16
#define KFN(f) FX_CAT3(f, bf16, FX_ISA)
#include "kernels_impl.h"
#undef NM
#undef KFN
#undef X16
#undef XT
#undef XLOAD
#undef XLOAD_TAIL
#undef XSTORE
#undef XSTORE_TAIL
#undef XGET
#undef XSET

#undef T
#undef V
#undef VI
#undef VW
#undef WSFX
#undef VL
#undef SFX

#define T double
#define V fx_vf64
#define VI fx_vi64
#define VW fx_vf64
#define WSFX(f) f##_f64
#define VL 8
#define SFX(f) f##_f64
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
#include "kernels_impl.h"
#undef NM
#undef KFN
#undef X16
#undef XT
#undef XLOAD
#undef XLOAD_TAIL
#undef XSTORE
#undef XSTORE_TAIL
#undef XGET
#undef XSET
#undef T
#undef V
#undef VI
#undef VW
#undef WSFX
#undef VL
#undef SFX

/* Every storage dtype, or float32/float64 only (16-bit inputs of those ops
   are widened by the Python layer). */
#define FX_ALL(op) {FX_CAT3(op, f32, FX_ISA), FX_CAT3(op, f64, FX_ISA), \
                    FX_CAT3(op, f16, FX_ISA), FX_CAT3(op, bf16, FX_ISA)}
#define FX_BOTH(op) {FX_CAT3(op, f32, FX_ISA), FX_CAT3(op, f64, FX_ISA), NULL, NULL}

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
    },
    .range_max = FX_ALL(range_max),
    .chunk_sums = FX_ALL(chunk_sums),
    .range_write = FX_ALL(range_write),
    .expm_f32 = FX_CAT3(expm_array, f32, FX_ISA),
    .expm_f64 = FX_CAT3(expm_array, f64, FX_ISA),
};
