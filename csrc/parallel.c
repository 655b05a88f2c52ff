/*
 * parallel.c - the one threading layer.
 *
 * Rows are split into contiguous ranges, one per thread (a static
 * schedule). Each row is computed by exactly one thread with the same code,
 * so per-row results never depend on the thread count. Small jobs stay on
 * one thread: starting the team costs a few microseconds, the price of
 * about FX_GRAIN elements of work.
 *
 * This file is compiled once, for the baseline ISA: the parallel loop is
 * never duplicated per instruction set, only the row kernels are.
 */
#include <stddef.h>

#include "fastxent.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define FX_GRAIN 32768

extern const fx_isa *fx_active;

int fx_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fx_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void fx_set_omp_threads(int n)
{
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int fx_has_kernel(int op, int dtype)
{
    return op >= 0 && op < FX_NUM_OPS && dtype >= 0 && dtype < FX_NUM_DTYPES &&
           fx_active->fn[op][dtype] != NULL;
}

void fx_run(int op, int dtype, const fx_job *job, int num_threads)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_rows;
    const int64_t work = n * (job->n_cols > 0 ? job->n_cols : 1);
    int64_t nt = num_threads;
    if (nt > n) nt = n;
    if (nt > 1 + work / FX_GRAIN) nt = 1 + work / FX_GRAIN;
    if (nt <= 1) {
        if (n > 0) fn(job, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nt)
    {
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t r0 = n * t / team, r1 = n * (t + 1) / team;
        if (r0 < r1) fn(job, r0, r1);
    }
#else
    fn(job, 0, n);
#endif
}
