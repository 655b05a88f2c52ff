/*
 * rows/split.h - the passes of one row split across threads.
 *
 * parallel.c's driver runs them over ranges of the row, in whole chunks:
 * range_max on each range (the maxima merged there, exactly), chunk_sums
 * (one double per chunk, which the driver adds in chunk order), or, for
 * the one-pass families, group_lse (each group's base, sum and max, merged
 * in order as the row kernel merges them), then the
 * family's split function (ce.h, softmax.h) turns (m, s) into the row's
 * scalars and range_write writes each range. Each pass is the row kernel's
 * own code on part of the row, so a split row gets the unsplit row's bits.
 */

static double KFN(range_max)(const void *x, int64_t c0, int64_t c1)
{
    return (double)NM(row_max)((const XT *)x + c0, c1 - c0);
}

/* sums[k] for chunks [k0, k1) of the row of n; st: where to keep
   exp(x - m) (the row's output), or NULL. */
static void KFN(chunk_sums)(const void *x, int64_t n, int64_t k0, int64_t k1, double m, double *sums,
                            void *st)
{
    const V vm = SPLAT((T)m);
#if X16
    (void)st; /* 16-bit outputs are not stashed (no family asks) */
    T *stp = NULL;
#else
    T *stp = (T *)st;
#endif
    for (int64_t k = k0; k < k1; k++)
        sums[k] = NM(chunk_sumexp)((const XT *)x, k * CHUNK, NM(chunk_end)(k * CHUNK, n), vm, stp, NULL);
}

/* The one-pass statistics of groups [g0, g1) of the row of n: each
   group's base, sum and max (group_lse), for fx_lse_merge in order; st:
   where to keep exp(x - b) (the row's output), or NULL. */
static void KFN(group_lse)(const void *x, int64_t n, int64_t g0, int64_t g1, double *bases,
                           double *sums, double *maxes, void *st)
{
#if X16
    (void)st; /* 16-bit outputs are not stashed (no family asks) */
    T *stp = NULL;
#else
    T *stp = (T *)st;
#endif
    for (int64_t g = g0; g < g1; g++) {
        const int64_t c0 = g * FX_LSE_GROUP, c1 = c0 + FX_LSE_GROUP < n ? c0 + FX_LSE_GROUP : n;
        T b, mx;
        /* PF_AHEAD on, as a one-pass row (stats.h, ahead). */
        sums[g] = NM(group_lse)((const XT *)x, c0, c1, &b, &mx, stp,
                                (const char *)x + PF_AHEAD);
        bases[g] = (double)b;
        maxes[g] = (double)mx;
    }
}

/* Elements [c0, c1) of the row's output, as the family's split function
   set it up: log-softmax (sp->lsm) or exp(x - m) k1 - k2 w. */
static void KFN(range_write)(const void *xv, void *outv, int64_t c0, int64_t c1, const fx_split *sp)
{
    const XT *x = (const XT *)xv + c0;
    XT *out = (XT *)outv + c0;
    const T *w = sp->w ? (const T *)sp->w + c0 : NULL;
    const int64_t n = c1 - c0;
    if (sp->nan) NM(row_nan)(out, n);
    else if (sp->lsm) NM(lsm_write)(x, out, n, (T)sp->m, (T)sp->k1, 0);
#if !X16
    else if (sp->stash) NM(grad_write)(x, out, w, n, (T)sp->m, (T)sp->k1, (T)sp->k2, out);
#endif
    else NM(grad_write)(x, out, w, n, (T)sp->m, (T)sp->k1, (T)sp->k2, NULL);
}
