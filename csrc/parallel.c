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
 * never duplicated per instruction set, only the row kernels are. It holds
 * no op's arithmetic: a row split across threads is driven here, and its
 * maths comes from the op family through the ISA table.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "fastxent.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define FX_GRAIN 32768

/* This thread's number t in a team of team threads. */
#ifdef _OPENMP
#define FX_TEAM(t, team) const int64_t t = omp_get_thread_num(), team = omp_get_num_threads()
#else
#define FX_TEAM(t, team) const int64_t t = 0, team = 1
#endif

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
    return op >= 0 && op < FX_NUM_OPS && dtype >= 0 && dtype < FX_NUM_DTYPES;
}

/* Rows long enough to split across threads when there are fewer rows than
   threads: below this, one thread per row is as fast. */
#define FX_SPLIT_MIN 65536

static fx_split_fn fx_splitter(int op, int dtype, const fx_job *job, int num_threads)
{
    const fx_split_fn split = fx_active->split[op][dtype];
    if (job->n_rows >= num_threads || num_threads <= 1 || job->n_cols < FX_SPLIT_MIN || !split
        || !split(job, NULL, FX_SPLIT_JOB))
        return NULL;
    return split;
}

/* Threads for a job's rows: at most one a row, and one more for each
   FX_GRAIN elements of work. */
static int64_t fx_row_threads(const fx_job *job, int num_threads)
{
    const int64_t n = job->n_rows, work = n * (job->n_cols > 0 ? job->n_cols : 1);
    int64_t nt = num_threads;
    if (nt > n) nt = n;
    if (nt > 1 + work / FX_GRAIN) nt = 1 + work / FX_GRAIN;
    return nt;
}

/* The write pass of a split row and the family's last touches: over even
   ranges, or, with bases (one-pass rows with kept exponentials), group by
   group, each group's coefficient rescaled from the row base B as
   group_write rescales it; ok 0: a row without a softmax, written NaN as
   the row kernels write it (its values may be gone: out may be x). */
static void fx_split_write(fx_split_fn split, const fx_job *job, fx_split *sp, int dtype,
                           const void *x, void *out, int nt, const double *bases, double B, int ok)
{
    const int64_t n = job->n_cols, ng = (n + FX_LSE_GROUP - 1) / FX_LSE_GROUP;
    if (split(job, sp, FX_SPLIT_FINISH)) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        {
            FX_TEAM(t, team);
            if (!bases) {
                const int64_t c0 = n * t / team, c1 = n * (t + 1) / team;
                if (c0 < c1) fx_active->range_write[dtype](x, out, c0, c1, sp);
            } else {
                for (int64_t g = ng * t / team; g < ng * (t + 1) / team; g++) {
                    const int64_t c0 = g * FX_LSE_GROUP;
                    fx_split sg = *sp;
                    sg.m = bases[g];
                    sg.k1 = ok ? fx_lse_rescale(sp->k1, bases[g], B) : NAN;
                    sg.nan = !ok;
                    fx_active->range_write[dtype](x, out, c0, c0 + FX_LSE_GROUP < n ? c0 + FX_LSE_GROUP : n, &sg);
                }
            }
        }
    }
    split(job, sp, FX_SPLIT_END);
}

/* A one-pass family's split row: each group's (base, sum, max) from its
   thread, merged in group order by fx_lse_merge, as row_lse1 merges them;
   a row row_lse1 refuses goes to the row kernel when x is intact (no
   kept exponentials). sums holds 3 nchunks doubles (groups are whole
   chunks). */
static void fx_run_split_onepass(int op, int dtype, fx_split_fn split, const fx_job *job,
                                 int64_t r, int nt, double *sums, fx_split *sp)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_cols, ng = (n + FX_LSE_GROUP - 1) / FX_LSE_GROUP;
    const size_t isz = dtype == FX_F64 ? 8 : dtype == FX_F32 ? 4 : 2;
    const void *x = (const char *)job->x + (size_t)(r * job->x_ld) * isz;
    void *out = job->out ? (char *)job->out + (size_t)(r * job->out_ld) * isz : NULL;
    double *bases = sums + ng, *maxes = sums + 2 * ng;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        FX_TEAM(t, team);
        const int64_t g0 = ng * t / team, g1 = ng * (t + 1) / team;
        if (g0 < g1)
            fx_active->group_lse[dtype](x, n, g0, g1, bases, sums, maxes, sp->stash ? out : NULL);
    }
    double B = -INFINITY, S = 0.0, M = -INFINITY;
    for (int64_t g = 0; g < ng; g++) {
        fx_lse_merge(&B, &S, bases[g], sums[g]);
        if (maxes[g] > M) M = maxes[g];
    }
    const int ok = isfinite(B) && S > 0 && S < INFINITY;
    if (!ok && !sp->stash) { /* x is intact: the row kernel's rules */
        fn(job, r, r + 1);
        return;
    }
    sp->m = ok ? B : NAN;
    sp->s = ok ? S : NAN;
    sp->mx = M;
    /* Kept exponentials (gradient, softmax) are scaled group by group;
       log_softmax's write needs no per-group scale. */
    fx_split_write(split, job, sp, dtype, x, out, nt, sp->stash ? bases : NULL, B, ok);
}

/*
 * One row over several threads: the max of each range, merged (exact);
 * the chunk sums of exp(x - max), added in chunk order by one thread (the
 * row kernel's own order); the family's scalars from (max, sum); then the
 * write pass over ranges. Every number is the one the row kernel computes,
 * so the row's bits do not depend on the split.
 */
static void fx_run_split_row(int op, int dtype, fx_split_fn split, const fx_job *job, int64_t r,
                             int nt, double *sums)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_cols, nchunks = (n + FX_CHUNK - 1) / FX_CHUNK;
    const size_t isz = dtype == FX_F64 ? 8 : dtype == FX_F32 ? 4 : 2;
    const void *x = (const char *)job->x + (size_t)(r * job->x_ld) * isz;
    void *out = job->out ? (char *)job->out + (size_t)(r * job->out_ld) * isz : NULL;
    fx_split sp = {.r = r};
    if (!split(job, &sp, FX_SPLIT_BEGIN)) {
        fn(job, r, r + 1);
        return;
    }
    if (sp.onepass) {
        fx_run_split_onepass(op, dtype, split, job, r, nt, sums, &sp);
        return;
    }
    double part[64];
    if (nt > 64) nt = 64;
    double m = -INFINITY;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        FX_TEAM(t, team);
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
            fx_active->chunk_sums[dtype](x, n, k0, k1, m, sums, sp.stash ? out : NULL);
        }
    }
    if (!isfinite(m)) { /* the row kernel's IEEE rules for this row */
        fn(job, r, r + 1);
        return;
    }
    double s = 0.0;
    for (int64_t k = 0; k < nchunks; k++) s += sums[k];
    sp.m = m;
    sp.s = s;
    fx_split_write(split, job, &sp, dtype, x, out, nt, NULL, 0.0, 1);
}

void fx_run(int op, int dtype, const fx_job *job, int num_threads)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_rows;
    const fx_split_fn split = fx_splitter(op, dtype, job, num_threads);
    if (split) {
        const int64_t nchunks = (job->n_cols + FX_CHUNK - 1) / FX_CHUNK;
        double *sums = malloc((size_t)(3 * nchunks) * sizeof(double));
        if (sums) {
            for (int64_t r = 0; r < n; r++)
                fx_run_split_row(op, dtype, split, job, r, num_threads, sums);
            free(sums);
            return;
        }
    }
    const int64_t nt = fx_row_threads(job, num_threads);
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

/* Rows [r0, r1) of a labelled job by the blocks of FX_SUM_BLOCK rows (or
   the parts of them) in the range: each one's labels checked before it
   runs (4 KiB at most, from L1), a whole block's row values summed after
   (from L1) into sums[block]. A bad label stops the range: *bad takes the
   smallest bad row found (each range stops at its own first, so the
   smallest is the job's first); *counted gains the range's unignored
   labels. */
static void fx_labelled_range(fx_rows_fn fn, const fx_job *job, int64_t r0, int64_t r1,
                              double *sums, int64_t *bad, int64_t *counted)
{
    const int64_t *lab = job->labels, n = job->n_rows;
    int64_t k = 0;
    for (int64_t b0 = r0, b1; b0 < r1; b0 = b1) {
        const int64_t blk = b0 / FX_SUM_BLOCK, end = (blk + 1) * FX_SUM_BLOCK;
        b1 = end < r1 ? end : r1;
        int64_t c = 0;
        const int64_t e = fx_active->check_labels(lab + b0, b1 - b0, job->n_cols,
                                                  job->ignore_index, &c);
        if (e >= 0) {
            int64_t cur = __atomic_load_n(bad, __ATOMIC_RELAXED);
            while (b0 + e < cur &&
                   !__atomic_compare_exchange_n(bad, &cur, b0 + e, 0, __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED)) {
            }
            return;
        }
        k += c;
        fn(job, b0, b1);
        if (b0 == blk * FX_SUM_BLOCK && b1 == (end < n ? end : n))
            sums[blk] = fx_sum_block_f64(job->row_out + b0, b1 - b0);
    }
    __atomic_fetch_add(counted, k, __ATOMIC_RELAXED);
}

int64_t fx_run_labelled(int op, int dtype, const fx_job *job, int num_threads, int64_t *counted,
                        double *total)
{
    const fx_rows_fn fn = fx_active->fn[op][dtype];
    const int64_t n = job->n_rows, nb = (n + FX_SUM_BLOCK - 1) / FX_SUM_BLOCK;
    int64_t bad = INT64_MAX, k = 0;
    *counted = 0;
    *total = 0.0;
    double *sums = NULL;
    if (!fx_splitter(op, dtype, job, num_threads)) sums = malloc((size_t)nb * sizeof(double));
    if (!sums) { /* rows fx_run splits, or no memory: the plain order */
        const int64_t e = fx_check_labels(job->labels, n, job->n_cols, job->ignore_index, counted);
        if (e >= 0) return e;
        fx_run(op, dtype, job, num_threads);
        *total = fx_sum_f64(job->row_out, n);
        return -1;
    }
    const int64_t nt = fx_row_threads(job, num_threads);
    if (nt <= 1) {
        fx_labelled_range(fn, job, 0, n, sums, &bad, &k);
    } else {
#ifdef _OPENMP
        int64_t used = 1;
#pragma omp parallel num_threads((int)nt)
        {
            FX_TEAM(t, team);
            if (t == 0) used = team;
            const int64_t r0 = n * t / team, r1 = n * (t + 1) / team;
            if (r0 < r1) fx_labelled_range(fn, job, r0, r1, sums, &bad, &k);
        }
        /* The blocks that two ranges share, from wherever they are now
           (at most one per thread). */
        if (bad == INT64_MAX)
            for (int64_t t = 1; t < used; t++) {
                const int64_t r = n * t / used, blk = r / FX_SUM_BLOCK, b0 = blk * FX_SUM_BLOCK;
                if (r != b0)
                    sums[blk] = fx_sum_block_f64(job->row_out + b0,
                                                 n - b0 < FX_SUM_BLOCK ? n - b0 : FX_SUM_BLOCK);
            }
#else
        fx_labelled_range(fn, job, 0, n, sums, &bad, &k);
#endif
    }
    if (bad == INT64_MAX) {
        double s = 0.0;
        for (int64_t b = 0; b < nb; b++) s += sums[b];
        *total = s;
        *counted = k;
    }
    free(sums);
    return bad == INT64_MAX ? -1 : bad;
}
