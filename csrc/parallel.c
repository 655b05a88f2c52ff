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
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "fastxent.h"
#include "ce_row.h"

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

/* Rows long enough to split across threads when there are fewer rows than
   threads: below this, one thread per row is as fast. */
#define FX_SPLIT_MIN 65536

static int fx_splittable(int op, int dtype, const fx_job *job)
{
    if (job->n_cols < FX_SPLIT_MIN) return 0;
    if (op == FX_LOGSUMEXP || op == FX_LOG_SOFTMAX || op == FX_SOFTMAX) return 1;
    return op == FX_CE_HARD && job->smoothing == 0 && (dtype == FX_F32 || dtype == FX_F64);
}

static double fx_get(int dtype, const void *x, int64_t i)
{
    return dtype == FX_F32 ? (double)((const float *)x)[i] : ((const double *)x)[i];
}

static void fx_set(int dtype, void *x, int64_t i, double v)
{
    if (dtype == FX_F32) ((float *)x)[i] = (float)v;
    else ((double *)x)[i] = v;
}

/*
 * One row over several threads: the max of each range, merged (exact);
 * the chunk sums of exp(x - max), added in chunk order by one thread (the
 * row kernel's own order); then the write pass over ranges. Every number is
 * the one the row kernel computes, so the row's bits do not depend on the
 * split. The scalar steps repeat the row kernels' expressions exactly.
 */
static void fx_run_split_row(int op, int dtype, const fx_job *job, int64_t r, int nt, double *sums)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_cols, nchunks = (n + FX_CHUNK - 1) / FX_CHUNK;
    const size_t isz = dtype == FX_F64 ? 8 : dtype == FX_F32 ? 4 : 2;
    const void *x = (const char *)job->x + (size_t)(r * job->x_ld) * isz;
    void *out = job->out ? (char *)job->out + (size_t)(r * job->out_ld) * isz : NULL;
    const int is_ce = op == FX_CE_HARD;
    const int64_t y = is_ce ? job->labels[r] : 0;
    if (is_ce && y == job->ignore_index) {
        fn(job, r, r + 1);
        return;
    }
    double part[64];
    if (nt > 64) nt = 64;
    double m = -INFINITY;
    /* As the row kernels: float32/float64 outputs keep exp(x - m) from the
       sums pass and are then scaled, one exp per element instead of two
       (except rows too big for the cache, whose kept exponentials would
       come back from memory). x_y is read first: out may be x. */
    const int stash = out && (op == FX_CE_HARD || op == FX_SOFTMAX)
                      && (dtype == FX_F32 || dtype == FX_F64)
                      && (double)n * isz <= (double)FX_STREAM_BYTES;
    const double xy = is_ce ? fx_get(dtype, x, y) : 0.0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int64_t t = 0, team = 1;
#endif
        /* Ranges in whole chunks, so each chunk is one thread's. */
        const int64_t k0 = nchunks * t / team, k1 = nchunks * (t + 1) / team;
        const int64_t c0 = k0 * FX_CHUNK, c1 = k1 * FX_CHUNK < n ? k1 * FX_CHUNK : n;
        part[t] = c0 < c1 ? fx_active->range_max[dtype](x, c0, c1) : -INFINITY;
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
        {
            for (int64_t i = 0; i < team; i++) m = part[i] > m ? part[i] : m;
        }
        if (isfinite(m)) {
            fx_active->chunk_sums[dtype](x, n, k0, k1, m, sums, stash ? out : NULL);
        }
    }
    if (!isfinite(m)) { /* the row kernel's IEEE rules for this row */
        fn(job, r, r + 1);
        return;
    }
    double s = 0.0;
    for (int64_t k = 0; k < nchunks; k++) s += sums[k];

    double k1 = 0.0, k2 = 0.0, gy = 0.0;
    const void *w = NULL;
    if (op == FX_LOGSUMEXP) {
        job->row_out[r] = m + log(s);
        return;
    } else if (op == FX_LOG_SOFTMAX) {
        k1 = log(s);
    } else if (op == FX_SOFTMAX) {
        k1 = 1.0 / s;
    } else { /* FX_CE_HARD, no smoothing: as ce_hard in kernels_impl.h */
        w = job->w;
        const fx_ce_row o = fx_ce_hard_row(xy, w ? fx_get(dtype, w, y) : 1.0, m, s,
                                           log(s), 0.0, job->smoothing, n, job->w_sum,
                                           out ? job->gscale[r * job->gscale_step] : 0.0,
                                           out != NULL);
        job->row_out[r] = o.loss;
        if (!out) return;
        k1 = o.k1;
        k2 = o.k2;
        gy = o.gy;
        if (dtype == FX_F32) { /* the kernel rounds its constants to float */
            k1 = (float)k1;
            k2 = (float)k2;
        }
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int64_t t = 0, team = 1;
#endif
        const int64_t c0 = n * t / team, c1 = n * (t + 1) / team;
        if (c0 < c1) fx_active->range_write[dtype](op, x, out, w, c0, c1, m, k1, k2, stash);
    }
    if (is_ce) fx_set(dtype, out, y, gy);
}

void fx_run(int op, int dtype, const fx_job *job, int num_threads)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_rows;
    const int64_t work = n * (job->n_cols > 0 ? job->n_cols : 1);
    if (n < num_threads && num_threads > 1 && fx_splittable(op, dtype, job)) {
        const int64_t nchunks = (job->n_cols + FX_CHUNK - 1) / FX_CHUNK;
        double *sums = malloc((size_t)nchunks * sizeof(double));
        if (sums) {
            for (int64_t r = 0; r < n; r++) fx_run_split_row(op, dtype, job, r, num_threads, sums);
            free(sums);
            return;
        }
    }
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
