/*
 * reduce.c - label checks and batch sums, shared by every call path.
 *
 * Batch reductions add the per-row float64 values here, in one fixed order
 * (four interleaved partial sums, then combined), whatever the thread count
 * and whichever Python path made the call, so that the same input always
 * gives the same bits.
 */
#include "fastxent.h"

double fx_sum_f64(const double *v, int64_t n)
{
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 += v[i];
        a1 += v[i + 1];
        a2 += v[i + 2];
        a3 += v[i + 3];
    }
    for (; i < n; i++) a0 += v[i];
    return (a0 + a1) + (a2 + a3);
}

extern const fx_isa *fx_active;

/* By the active ISA's table (kernels_isa.h): vector compares check a block
   of labels at once. */
int64_t fx_check_labels(const int64_t *labels, int64_t n, int64_t n_cols, int64_t ignore_index,
                        int64_t *counted)
{
    return fx_active->check_labels(labels, n, n_cols, ignore_index, counted);
}
