/*
 * reduce.c - label checks and batch sums, shared by every call path.
 *
 * Batch reductions add the per-row float64 values here, in one fixed order
 * (blocks of sixteen interleaved partial sums), whatever the thread count
 * and whichever Python path made the call, so that the same input always
 * gives the same bits.
 */
#include <string.h>

#include "fastxent.h"

/* One block's sum: sixteen partial sums, lane k of a[k / 2] summing
   v[16 i + k], so that the adds overlap (four chains waited on the add's
   latency). */
double fx_sum_block_f64(const double *v, int64_t n)
{
    typedef double v2 __attribute__((vector_size(16)));
    v2 a[8];
    for (int k = 0; k < 8; k++) a[k] = (v2){0.0, 0.0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 8; k++) {
            v2 t;
            memcpy(&t, v + i + 2 * k, sizeof t);
            a[k] += t;
        }
    for (int k = 0; k < 4; k++) a[k] += a[k + 4];
    a[0] += a[2];
    a[1] += a[3];
    a[0] += a[1];
    double s = a[0][0] + a[0][1];
    for (; i < n; i++) s += v[i];
    return s;
}

/* Blocks of FX_SUM_BLOCK values, their sums added in order: a runner that
   sums each block while it is in L1 (fx_run_labelled) gets the same bits
   as this pass over values that are back in L3 by then. */
double fx_sum_f64(const double *v, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i += FX_SUM_BLOCK)
        s += fx_sum_block_f64(v + i, n - i < FX_SUM_BLOCK ? n - i : FX_SUM_BLOCK);
    return s;
}

extern const fx_isa *fx_active;

/* By the active ISA's table (kernels_isa.h): vector compares check a block
   of labels at once. */
int64_t fx_check_labels(const int64_t *labels, int64_t n, int64_t n_cols, int64_t ignore_index,
                        int64_t *counted)
{
    return fx_active->check_labels(labels, n, n_cols, ignore_index, counted);
}
