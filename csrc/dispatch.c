/*
 * dispatch.c - choose the instruction set once, at import.
 *
 * The best ISA the CPU (and OS) supports is used unless FASTXENT_ISA names
 * another that is compiled in and runnable. All ISAs give bitwise-identical
 * results (vec.h), so the choice only changes speed.
 */
#include <stdlib.h>
#include <string.h>

#include "fastxent.h"

static const fx_isa *fx_runnable[3];
static int fx_n_runnable = 0;
const fx_isa *fx_active = &fx_isa_baseline;

static int fx_cpu_has(const char *isa)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!strcmp(isa, "avx2"))
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (!strcmp(isa, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    (void)isa;
    return 0;
}

int fx_init(void)
{
    fx_n_runnable = 0;
    fx_runnable[fx_n_runnable++] = &fx_isa_baseline;
#if defined(FX_HAVE_AVX2)
    if (fx_cpu_has("avx2")) fx_runnable[fx_n_runnable++] = &fx_isa_avx2;
#endif
#if defined(FX_HAVE_AVX512)
    if (fx_cpu_has("avx512")) fx_runnable[fx_n_runnable++] = &fx_isa_avx512;
#endif
    fx_active = fx_runnable[fx_n_runnable - 1];
    const char *want = getenv("FASTXENT_ISA");
    if (want && *want) return fx_set_isa(want);
    return 0;
}

int fx_num_isas(void) { return fx_n_runnable; }

const char *fx_isa_name(int i)
{
    return i >= 0 && i < fx_n_runnable ? fx_runnable[i]->name : NULL;
}

int fx_set_isa(const char *name)
{
    for (int i = 0; i < fx_n_runnable; i++) {
        if (!strcmp(fx_runnable[i]->name, name)) {
            fx_active = fx_runnable[i];
            return 0;
        }
    }
    return -1;
}

const char *fx_get_isa(void) { return fx_active->name; }

void fx_expm_f32_array(const float *x, float *y, int64_t n) { fx_active->expm_f32(x, y, n); }
void fx_expm_f64_array(const double *x, double *y, int64_t n) { fx_active->expm_f64(x, y, n); }
void fx_expsum_f32_array(const float *x, float *y, int64_t n) { fx_active->expsum_f32(x, y, n); }
void fx_tanh_f32_array(const float *x, float *y, int64_t n) { fx_active->tanh_f32(x, y, n); }
void fx_tanh_f64_array(const double *x, double *y, int64_t n) { fx_active->tanh_f64(x, y, n); }
