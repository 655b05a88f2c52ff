/*
 * rows/stats.h - the row statistics every family starts from: the row max,
 * the chunked sums of exponentials, rows in pairs, and the prefetch of the
 * next row.
 *
 * Each row kernel reads one row of n contiguous elements; a row is visited
 * at most three times (max, sum of exponentials, write) and stays in cache
 * between visits. Rows over PAIR_BYTES skip the max visit before the sums
 * (one_pass, group_lse below): their sums are taken against a base, not
 * the max (log_softmax reads the max afterwards, from cache). Nothing is
 * allocated and no N x C temporary exists:
 * losses come from the row statistics
 *     m = max_c x_c,   s = sum_c exp(x_c - m)
 * as  -log p_y = log(s) - (x_y - m)      (never lse - x_y, which loses all
 * the digits of the loss when every logit shares a large offset), and
 * log-softmax as (x_c - m) - log(s), in that order.
 *
 * Sums run in T within chunks of CHUNK elements (each lane then adds at
 * most CHUNK / (2*VL) terms) and the chunk totals are added in double, so a
 * float32 row of 10^5 classes sums as accurately as a short one.
 */

#ifndef FX_ROW_LOG_ONCE
#define FX_ROW_LOG_ONCE
/* log(s) of a row's sum (and exp(x_y - m) of cross entropy's label), as
   one lane of logm.h's and expm.h's float64 vector kernels: libm's log,
   one call per row, was 11% of the time of float32 cross entropy on
   32768 x 128 (AVX-512, measured by leaving it out), and the kernels
   batch rows (fx_log_batch, ce.h's fx_ce_batch) to take eight at once.
   A row alone (split across threads, or on a path that does not batch)
   takes the same lane, so its bits do not depend on its batch. Lanes
   outside the kernels' ranges (s not a positive normal: a NaN row;
   x_y - m above 16) take libm's value. */
FX_INLINE int fx_row_log_ok(double s) { return s >= 0x1p-1022 && s < INFINITY; }
FX_INLINE int fx_row_exp_ok(double d) { return d <= 16.0; }

static inline double fx_row_log(double s)
{
    return fx_row_log_ok(s) ? fx_log_pos_f64(fx_splat_f64(s))[0] : log(s);
}

static inline double fx_row_exp(double d)
{
    return fx_row_exp_ok(d) ? fx_expm_f64(fx_splat_f64(d))[0] : exp(d);
}

/* l[j] = fx_row_log(s[j]) for j < k <= FX_LOG_BATCH, one vector for all. */
#define FX_LOG_BATCH ((int)(FX_VBYTES / sizeof(double)))
static inline void fx_row_logs(const double *s, int k, double *l)
{
    fx_vf64 sv;
    for (int j = 0; j < FX_LOG_BATCH; j++) sv[j] = j < k && fx_row_log_ok(s[j]) ? s[j] : 1.0;
    const fx_vf64 lv = fx_log_pos_f64(sv);
    for (int j = 0; j < k; j++) l[j] = fx_row_log_ok(s[j]) ? lv[j] : log(s[j]);
}

/* e[j] = fx_row_exp(d[j]) for j < k <= FX_LOG_BATCH, likewise. */
static inline void fx_row_exps(const double *d, int k, double *e)
{
    fx_vf64 dv;
    for (int j = 0; j < FX_LOG_BATCH; j++) dv[j] = j < k && fx_row_exp_ok(d[j]) ? d[j] : 0.0;
    const fx_vf64 ev = fx_expm_f64(dv);
    for (int j = 0; j < k; j++) e[j] = fx_row_exp_ok(d[j]) ? ev[j] : exp(d[j]);
}

/* Row values waiting for their logs: v + log(s) (logsumexp, v = m) or,
   with sub, log(s) - v (entropy, v = q/s): each in the order of the
   scalar form, which decides which NaN a NaN row gets. */
typedef struct fx_log_batch {
    int64_t r[FX_LOG_BATCH];
    double v[FX_LOG_BATCH], s[FX_LOG_BATCH];
    int k, sub;
} fx_log_batch;

static inline void fx_log_flush(const fx_job *job, fx_log_batch *b)
{
    double l[FX_LOG_BATCH];
    fx_row_logs(b->s, b->k, l);
    for (int j = 0; j < b->k; j++) job->row_out[b->r[j]] = b->sub ? l[j] - b->v[j] : b->v[j] + l[j];
    b->k = 0;
}

/* Out of line for entropy: inlined, the flush doubled the size of its row
   loop, which then ran 1.03x the time on AVX2 (float32, 128 and 1000
   classes). logsumexp's pair loop keeps it inline. */
static __attribute__((noinline)) void fx_log_flush_ool(const fx_job *job, fx_log_batch *b)
{
    fx_log_flush(job, b);
}

static inline void fx_log_push(const fx_job *job, fx_log_batch *b, int64_t r, double v, double s,
                               int ool)
{
    b->r[b->k] = r;
    b->v[b->k] = v;
    b->s[b->k] = s;
    if (++b->k == FX_LOG_BATCH) {
        if (ool) fx_log_flush_ool(job, b);
        else fx_log_flush(job, b);
    }
}
#endif

FX_INLINE int64_t NM(chunk_end)(int64_t c0, int64_t n)
{
    return c0 + CHUNK < n ? c0 + CHUNK : n;
}

/* Eight elements widened to double, for the kernels that take logs or
   exps of their inputs in double (entropy of probabilities, KL targets,
   BCE from probabilities). */
typedef T NM(t8) __attribute__((vector_size(8 * sizeof(T))));

FX_INLINE fx_vf64 NM(load8)(const T *p)
{
    NM(t8) v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, fx_vf64);
}

/* max_c x_c, skipping NaN; -inf for an empty or all-NaN row. */
FX_INLINE T NM(row_max)(const XT *x, int64_t n)
{
    ACC a0 = AINIT(SPLAT(-INFINITY)), a1 = a0;
    int64_t i = 0;
    for (; i + 2 * VL <= n; i += 2 * VL) {
        a0 = AMAX(a0, XLOAD(x + i));
        a1 = AMAX(a1, XLOAD(x + i + VL));
    }
    for (; i + VL <= n; i += VL) a0 = AMAX(a0, XLOAD(x + i));
    if (i < n) a1 = AMAX(a1, XLOAD_TAIL(x + i, n - i, -INFINITY));
    /* + 0 turns a -0 max into +0, so the max does not depend on which lane
       saw which zero (a row split across threads gets the same one). */
    return HMAX(VMAX(AGET(a0), AGET(a1))) + (T)0;
}

/* Weights of lanes [i, i+k), k <= VL: all 1 when w is NULL; padding 0. */
FX_INLINE V NM(wload)(const T *w, int64_t i, int64_t k)
{
    if (w) return k == VL ? LOAD(w + i) : LOAD_TAIL(w + i, k, 0);
    V v = SPLAT(0);
    for (int64_t j = 0; j < k; j++) v[j] = 1;
    return v;
}

/* Lanes [i, i+k) of x minus m, padding lanes -inf (their exp is 0). */
FX_INLINE V NM(zload_exp)(const XT *x, int64_t i, int64_t k, V vm)
{
    return (k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY)) - vm;
}

/* Sums of x_c - m (label smoothing's d, soft targets' a) run in T scaled
   by 2^-D_SHIFT: a float32 difference reaches 2 FLT_MAX (logits of both
   signs near the range's end) and a chunk's total CHUNK times that, where
   unscaled they overflowed to inf. x s - m s rounds to exactly s times
   x - m above the subnormal range (|x - m| >= 2^-114 in float32), so every
   sum is the unscaled one times s, rounding included, until it would have
   overflowed; the caller scales the double total back (D_UNSCALE). */
#define D_SHIFT 12 /* 2^12 >= 4 CHUNK: the lane terms and a rebase's shift */
#define D_SCALE ((T)1 / (T)(1 << D_SHIFT))
#define D_UNSCALE ((double)(1 << D_SHIFT))

/* Lanes [i, i+k) of (x - m) 2^-D_SHIFT, given vs = SPLAT(D_SCALE) and
   vms = SPLAT(m D_SCALE), for any m; padding lanes 0 (they add nothing). */
FX_INLINE V NM(zload_lin_s)(const XT *x, int64_t i, int64_t k, V vs, V vms, T m)
{
    return (k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, m)) * vs - vms;
}

/* Rows up to this many bytes are prefetched into L2 while the row before
   them is in its sum-of-exponentials pass, which is bound by arithmetic, not
   memory: the next row's max pass then reads L2 instead of main memory.
   Two such rows fit in the L2 of current x86 cores (512 KiB and up). */
#define PF_BYTES (192 << 10)

/* What to prefetch alongside row r of [r0, r1), element for element: the
   next row, or NULL for the last. A row longer than PF_BYTES is prefetched
   PF_BYTES ahead of itself instead (and at its end, past it: the next row
   of a contiguous array): without it the one-pass sums of 512 x 128256
   float32 ran at 1.4x the read+exp bound on Zen 4, behind the hardware
   prefetcher alone. A prefetch does not fault, so the address may run past
   the array. */
FX_INLINE const char *NM(next_row)(const fx_job *job, int64_t r, int64_t r1)
{
    const XT *row = (const XT *)job->x + r * job->x_ld;
    if (job->n_cols * (int64_t)sizeof(XT) > PF_BYTES) return (const char *)((uintptr_t)row + PF_BYTES);
    if (r + 1 >= r1) return NULL;
    return (const char *)(row + job->x_ld);
}

/* What a one-pass row (row_lse1 and its kin: the row read once, from
   memory) prefetches alongside itself: the element PF_AHEAD bytes on,
   running past its end into the next row of a contiguous array (a
   prefetch does not fault), or, for a row no longer than that, the next
   row as next_row does. The first pass's loads then meet L2: on a Xeon
   (AVX-512, float32, 1 thread) the read+exp loop over main memory took
   0.32-0.33 ns per element at 2-3 KiB ahead, 0.29 ns from L1, 0.83 ns
   with no prefetch, 0.42-0.43 ns at 4-24 KiB and at 128-192 KiB ahead
   (next_row's distance for long rows, which serves the passes that reread
   a cached row); over data in L3, 0.29 ns from 3 KiB on, 0.30 at 2 KiB. */
#define PF_AHEAD 3072

FX_INLINE const char *NM(ahead)(const fx_job *job, int64_t r, int64_t r1)
{
    if (job->n_cols * (int64_t)sizeof(XT) <= PF_AHEAD) return NM(next_row)(job, r, r1);
    return (const char *)((uintptr_t)((const XT *)job->x + r * job->x_ld) + PF_AHEAD);
}

/* Prefetch for writing the line PF_AHEAD bytes past st + i: a one-pass
   row's stash (the gradient's out) is written in the same pass, and its
   lines come from memory (write-allocate) as x's do. */
FX_INLINE void NM(prefetch_st)(const T *st, int64_t i)
{
    for (int b = 0; b < VL * (int)sizeof(T); b += 64)
        __builtin_prefetch((const void *)((uintptr_t)(st + i) + (uintptr_t)(PF_AHEAD + b)), 1, 2);
}

/* As prefetch, into L1: one-pass rows prefetch no more than PF_AHEAD
   ahead, which L1 holds. */
FX_INLINE void NM(prefetch_l1)(const char *pf, int64_t i)
{
    for (int b = 0; b < VL * (int)sizeof(XT); b += 64)
        __builtin_prefetch((const void *)((uintptr_t)pf + (uintptr_t)(i * (int64_t)sizeof(XT) + b)), 0, 3);
}

/* Prefetch the VL elements of row pf that match x + i (L2 only). */
FX_INLINE void NM(prefetch)(const char *pf, int64_t i)
{
    for (int b = 0; b < VL * (int)sizeof(XT); b += 64)
        __builtin_prefetch((const void *)((uintptr_t)pf + (uintptr_t)(i * (int64_t)sizeof(XT) + b)), 0, 2);
}

/* The sum of exp(x_c - m) over one chunk [c0, c1) (c1 - c0 <= CHUNK), as
   one double: the unit that rows split across threads add in order. pf,
   when not NULL, is the row to prefetch, element for element alongside x.
   Row groups (group_stats) take the same operations lane for lane, so a
   row gives the same bits alone or grouped (which a thread split
   decides). */
FX_INLINE double NM(chunk_sumexp_)(const XT *x, int64_t c0, int64_t c1, V vm, T *st,
                                   const char *pf)
{
    ACC a0 = AINIT(SPLAT(0)), a1 = a0;
    int64_t i = c0;
    for (; i + 2 * VL <= c1; i += 2 * VL) {
        if (pf) {
            NM(prefetch)(pf, i);
            NM(prefetch)(pf, i + VL);
        }
        const V z0 = XLOAD(x + i) - vm, z1 = XLOAD(x + i + VL) - vm;
        const V e0 = st ? EXPM(z0) : EXPS(z0), e1 = st ? EXPM(z1) : EXPS(z1);
        a0 = AADD(a0, e0);
        a1 = AADD(a1, e1);
        if (st) { /* see fx_store_union */
            SFX(fx_store_union)(st + i, e0);
            SFX(fx_store_union)(st + i + VL, e1);
        }
    }
    for (; i < c1; i += VL) {
        const int64_t k = c1 - i < VL ? c1 - i : VL;
        const V z = NM(zload_exp)(x, i, k, vm), e = st ? EXPM(z) : EXPS(z);
        a0 = AADD(a0, e);
        if (st) {
            if (k == VL) STORE(st + i, e);
            else STORE_TAIL(st + i, e, k);
        }
    }
    return HSUM(AGET(a0) + AGET(a1));
}

/* Two copies, so the loop that does not stash has no stores to test. */
FX_INLINE double NM(chunk_sumexp)(const XT *x, int64_t c0, int64_t c1, V vm, T *st,
                                  const char *pf)
{
    if (st) return NM(chunk_sumexp_)(x, c0, c1, vm, st, pf);
    return NM(chunk_sumexp_)(x, c0, c1, vm, NULL, pf);
}

/* ------------------------------------------------------------------------
 * One-pass statistics. A row read twice (its max from memory, then its
 * exponentials from cache) costs the read plus the exps, where the bound is
 * the larger of the two. Here each group of FX_LSE_GROUP elements sums
 * exp(x - b) for a base b, first the max of its first vector, raised (and
 * the partial sums and kept exponentials multiplied by exp(b_old - b_new))
 * only when an element exceeds it by more than FX_LSE_T: on any group
 * whose elements rise less than FX_LSE_T above its first vector, never.
 * Every term stays below exp(FX_LSE_T), far from overflow; losses and
 * logsumexp are exact for any base (log s - (x_y - b)). A base is always
 * one of the row's values, so a row whose other classes are all -inf still
 * sums exp(0) = 1 exactly. Within a group the sums run in chunks of CHUNK,
 * as everywhere. The base and every rescale depend only on the group's
 * values, and groups are merged in order (fx_lse_merge), so the bits are
 * the same on every ISA and for any split of the row across threads (which
 * splits at group boundaries).
 * ---------------------------------------------------------------------- */

/* The floor under a base's candidates: a group whose candidates are all
   -inf gets the lowest finite value, so that exp(x - b) of a -inf element
   is 0 and any finite one raises the base. */
FX_INLINE V NM(lse_floor)(void)
{
    return SPLAT(sizeof(T) == 4 ? (T)-FLT_MAX : (T)-DBL_MAX);
}

/* The new base when some element of x0, x1 exceeds b by more than
   FX_LSE_T, with the vector sums a0, a1, the group's double sum *s and the
   exponentials kept in st[g0, i) scaled to it. A NaN never raises (it
   compares false); +inf makes the base +inf, whose row the callers send to
   row_max's rules.
   Each raise rescales the exponentials kept so far in the group: a row
   rising by more than FX_LSE_T every vector pair (a span of thousands)
   costs up to a multiply per kept element per raise; real logits raise a
   few times per row at most. The factor is formed in T: terms more than
   87 below the new base (float32) become 0, so probabilities below about
   1e-31 may be flushed on these rows (1e-38 on the two-pass rows). */
FX_INLINE T NM(lse_raise)(T b, V x0, V x1, ACC *a0, ACC *a1, double *s, T *st, int64_t g0,
                          int64_t i, ACC *q0, ACC *q1, double *q)
{
    const V lo = NM(lse_floor)();
    const T nb = HMAX(VMAX(VMAX(lo, x0), x1));
    const V f = EXPM(SPLAT(b - nb));
    if (q) {
        /* Entropy's sums of e (x - b) move to the new base as
           f (q + (b - nb) a), before a is scaled; a factor of 0 (a raise
           by more than 87, float32) leaves nothing of the old terms, and
           (b - nb) a could overflow on the way. */
        if (f[0] == 0) {
            *q0 = AINIT(SPLAT(0));
            *q1 = *q0;
            *q = 0.0;
        } else {
            const V dv = SPLAT(b - nb);
            *q0 = AINIT((AGET(*q0) + dv * AGET(*a0)) * f);
            *q1 = AINIT((AGET(*q1) + dv * AGET(*a1)) * f);
            *q = (*q + ((double)b - (double)nb) * *s) * (double)f[0];
        }
    }
    *a0 = AINIT(AGET(*a0) * f);
    *a1 = AINIT(AGET(*a1) * f);
    *s *= (double)f[0];
    if (st)
        for (int64_t j = g0; j < i; j++) st[j] *= f[0];
    return nb;
}

/* Label smoothing's d = sum_c (x_c - b) (unit weights; its lanes d0
   scaled as zload_lin_s's) moved from base b to lse_raise's new base nb:
   the vector terms so far in chunk [c0, i) (i - c0 elements, (i - c0) / VL
   per lane, all whole vectors) and the group's earlier chunks [g0, c0)
   each shift by b - nb. */
FX_INLINE void NM(d_rebase)(T b, T nb, ACC *d0, double *d, int64_t g0, int64_t c0, int64_t i)
{
    const T sh = b * D_SCALE - nb * D_SCALE;
    *d0 = AINIT(AGET(*d0) + SPLAT(sh) * SPLAT((T)((i - c0) / VL)));
    *d += ((double)b - (double)nb) * (double)(c0 - g0);
}

/* Elements [i, i + 2 VL) of x into *x0, *x1 for group_lse_q's loops:
   their prefetches (pf ahead in x, and in st for writing when st is not
   NULL) and, when mx is not NULL, the group's running max. */
FX_INLINE void NM(lse_load2)(const XT *x, int64_t i, const char *pf, const T *st, ACC *mx, V *x0,
                             V *x1)
{
    if (pf) {
        NM(prefetch_l1)(pf, i);
        NM(prefetch_l1)(pf, i + VL);
        if (st) {
            NM(prefetch_st)(st, i);
            NM(prefetch_st)(st, i + VL);
        }
    }
    *x0 = XLOAD(x + i);
    *x1 = XLOAD(x + i + VL);
    if (mx) *mx = AMAX(AMAX(*mx, *x0), *x1);
}

/* s = sum of exp(x_c - *b) over group [g0, g1) (g1 - g0 <= FX_LSE_GROUP),
   with its base *b (see above); st, when not NULL, keeps exp(x_c - *b);
   mp, when not NULL, gets the group's max (row_max's rule: NaN skipped);
   qp, when not NULL, gets entropy's sum_c e_c (x_c - *b), a term with
   e_c = 0 counting 0. pf: the row to prefetch, or NULL.
   With qp the base is raised at FX_ENT_T instead of FX_LSE_T: a term's
   product e_c (x_c - b) is rounded relative to x_c - b, so the heaviest
   terms, which sit up to the threshold above b, carried an absolute error
   of threshold x 2^-24 into q / s (float32 entropies of peaked rows were
   off by 12 float32 ulps of 1 at FX_LSE_T; base = max has none). */
FX_INLINE double NM(group_lse_q)(const XT *x, int64_t g0, int64_t g1, T *bp, T *mp, T *st,
                                 const char *pf, double *qp, double *dp)
{
    const T thr = qp ? (T)FX_ENT_T : (T)FX_LSE_T;
    double d = 0.0;
    const V lo = NM(lse_floor)();
    const int64_t k0 = g1 - g0 < VL ? g1 - g0 : VL;
    const V first = k0 == VL ? XLOAD(x + g0) : XLOAD_TAIL(x + g0, k0, -INFINITY);
    T b = HMAX(VMAX(lo, first));
    V vb = SPLAT(b);
    const V vs = SPLAT(D_SCALE);
    V vbs = SPLAT(b * D_SCALE);
    ACC mx = AINIT(SPLAT(-INFINITY));
    double s = 0.0, q = 0.0;
    /* Exponentials only summed (expm.h's fx_expsum): entropy's q needs
       exact zeros, st keeps them. */
    const int sums = !st && !qp;
    /* The max of x - b over the group, for sums: fx_expsum gives -inf a
       term of 1.6e-38, not 0, so a group of -inf (and NaN) elements is
       told by this, not by s == 0 (row_lse1's test of a row without a
       softmax). */
    ACC zall = AINIT(SPLAT(-INFINITY));
    for (int64_t c0 = g0; c0 < g1; c0 += CHUNK) {
        const int64_t c1 = c0 + CHUNK < g1 ? c0 + CHUNK : g1;
        ACC a0 = AINIT(SPLAT(0)), a1 = a0, q0 = a0, q1 = a0, d0 = a0;
        int64_t i = c0;
        if (sums) {
            /* Sums alone: the chunk's exponentials against the base with
               no test per vector, only a running max of x - b, checked
               once; a chunk that would raise the base is taken again from
               its start by the loop below, which raises it where it
               always has. That loop and the tail keep fx_expm: st or qp
               is not known to be NULL there at compile time, and a select
               between two exps could cost the loops that keep them. */
            ACC zm = AINIT(SPLAT(-INFINITY));
            for (; i + 2 * VL <= c1; i += 2 * VL) {
                V x0, x1;
                NM(lse_load2)(x, i, pf, NULL, mp ? &mx : NULL, &x0, &x1);
                const V z0 = x0 - vb, z1 = x1 - vb;
                zm = AMAX(AMAX(zm, z0), z1);
                a0 = AADD(a0, EXPS(z0));
                a1 = AADD(a1, EXPS(z1));
                if (dp) d0 = AADD(d0, (x0 * vs - vbs) + (x1 * vs - vbs));
            }
            zall = AMAX(zall, AGET(zm));
            if (__builtin_expect(SFX(fx_any_above2)(AGET(zm), AGET(zm), thr), 0)) {
                i = c0;
                a0 = a1 = d0 = AINIT(SPLAT(0));
            }
        }
        for (; i + 2 * VL <= c1; i += 2 * VL) {
            V x0, x1;
            NM(lse_load2)(x, i, pf, st, mp ? &mx : NULL, &x0, &x1);
            V z0 = x0 - vb, z1 = x1 - vb;
            if (__builtin_expect(SFX(fx_any_above2)(z0, z1, thr), 0)) {
                const T ob = b;
                b = NM(lse_raise)(b, x0, x1, &a0, &a1, &s, st, g0, i, &q0, &q1, qp ? &q : NULL);
                if (dp) NM(d_rebase)(ob, b, &d0, &d, g0, c0, i);
                vb = SPLAT(b);
                vbs = SPLAT(b * D_SCALE);
                z0 = x0 - vb;
                z1 = x1 - vb;
            }
            const V e0 = EXPM(z0), e1 = EXPM(z1);
            if (qp || dp) {
                /* One accumulator per sum, pairs added first: with two per
                   sum the AVX2 loop ran out of registers (entropy 1.2x,
                   smoothed gradients 1.15x the time of two passes). The
                   floor makes e z of a -inf element 0 * -max = -0, not
                   NaN: one max for a compare and a select (e > 0 only
                   above the exp's cutoff). */
                a0 = AADD(a0, e0 + e1);
                if (qp) q0 = AADD(q0, e0 * VMAX(z0, lo) + e1 * VMAX(z1, lo));
            } else {
                a0 = AADD(a0, e0);
                a1 = AADD(a1, e1);
            }
            if (dp) d0 = AADD(d0, (x0 * vs - vbs) + (x1 * vs - vbs));
            if (st) { /* see fx_store_union */
                SFX(fx_store_union)(st + i, e0);
                SFX(fx_store_union)(st + i + VL, e1);
            }
        }
        for (; i < c1; i += VL) {
            const int64_t k = c1 - i < VL ? c1 - i : VL;
            const V xv = k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY);
            if (mp) mx = AMAX(mx, xv);
            V z = xv - vb;
            if (SFX(fx_any_above2)(z, z, thr)) {
                const T ob = b;
                b = NM(lse_raise)(b, xv, lo, &a0, &a1, &s, st, g0, i, &q0, &q1, qp ? &q : NULL);
                if (dp) NM(d_rebase)(ob, b, &d0, &d, g0, c0, i);
                vb = SPLAT(b);
                vbs = SPLAT(b * D_SCALE);
                z = xv - vb;
            }
            const V e = EXPM(z);
            if (sums) zall = AMAX(zall, z);
            a0 = AADD(a0, e);
            if (qp) q0 = AADD(q0, e * VMAX(z, lo));
            if (dp) d0 = AADD(d0, k == VL ? xv * vs - vbs : NM(zload_lin_s)(x, i, k, vs, vbs, b));
            if (st) {
                if (k == VL) STORE(st + i, e);
                else STORE_TAIL(st + i, e, k);
            }
        }
        s += HSUM(AGET(a0) + AGET(a1));
        if (qp) q += HSUM(AGET(q0) + AGET(q1));
        if (dp) d += HSUM(AGET(d0)) * D_UNSCALE;
    }
    if (sums && !(HMAX(AGET(zall)) > -INFINITY)) s = 0.0;
    *bp = b;
    if (qp) *qp = q;
    if (dp) *dp = d;
    if (mp) *mp = HMAX(AGET(mx)) + (T)0;
    return s;
}

FX_INLINE double NM(group_lse)(const XT *x, int64_t g0, int64_t g1, T *bp, T *mp, T *st,
                               const char *pf)
{
    return NM(group_lse_q)(x, g0, g1, bp, mp, st, pf, NULL, NULL);
}

/* One-pass (m, s) of a row: s = sum_c exp(x_c - m) for a base m (one of
   the row's values, within FX_LSE_T of its max), groups merged by
   fx_lse_merge in order. st, when not NULL (rows of up to
   FX_LSE_MAX_GROUPS groups), keeps each group's exp(x - b_g) and bases[g]
   gets b_g. Returns 0 for a row without a finite base and a positive
   finite sum (a +inf, NaN or all -inf row: one without a softmax): the
   forward callers take row_max's path there, whose IEEE rules they
   document; with st, which may be x itself, the row's values may be gone,
   and the caller writes the no-softmax output (NaN) without reading them.
   d, when not NULL, gets label smoothing's sum_c (x_c - m) (unit
   weights; -inf with a -inf element, as row_sumexp's); q, when not NULL
   (entropy, no st), sum_c exp(x_c - m) (x_c - m), a term of exponential
   0 counting 0, and a row whose q is not finite also returns 0. */
FX_INLINE int NM(row_lse1_qd)(const XT *x, int64_t n, T *m, double *s, T *st, T *bases,
                              const char *pf, double *q, double *d)
{
    double B = -INFINITY, S = 0.0, D = 0.0, Q = 0.0;
    for (int64_t g0 = 0; g0 < n; g0 += FX_LSE_GROUP) {
        const int64_t g1 = g0 + FX_LSE_GROUP < n ? g0 + FX_LSE_GROUP : n;
        T b;
        double gd = 0.0, gq = 0.0;
        const double gs = NM(group_lse_q)(x, g0, g1, &b, NULL, st, pf, q ? &gq : NULL,
                                          d ? &gd : NULL);
        if (bases) bases[g0 / FX_LSE_GROUP] = b;
        /* d to the running base: the earlier groups' g0 terms or this
           group's g1 - g0 shift by the difference of the bases. */
        if (d) {
            if ((double)b > B) D = (g0 > 0 ? D + (B - (double)b) * (double)g0 : 0.0) + gd;
            else D += gd + ((double)b - B) * (double)(g1 - g0);
        }
        if (q) fx_ent_merge(&B, &S, &Q, (double)b, gs, gq);
        else fx_lse_merge(&B, &S, (double)b, gs);
    }
    if (!(isfinite(B) && S > 0 && S < INFINITY) || (q && !isfinite(Q))) return 0;
    *m = (T)B;
    *s = S;
    if (q) *q = Q;
    if (d) *d = D;
    return 1;
}

FX_INLINE int NM(row_lse1)(const XT *x, int64_t n, T *m, double *s, T *st, T *bases,
                           const char *pf)
{
    return NM(row_lse1_qd)(x, n, m, s, st, bases, pf, NULL, NULL);
}

/* Rows of up to PAIR_BYTES are taken in groups (group_stats) by the
   forward row kernels: at these lengths the latency of one row's max ->
   exp -> sum -> log chain is about as long as its arithmetic, and
   independent rows in one loop overlap what one row cannot (pairs, float32,
   64-256 classes: 0.77-0.94x the time of single rows). Longer rows gained
   nothing, and at 2 KiB (float32 512, float64 256 classes) lost up to
   10%. */
#define PAIR_BYTES 1024 /* <= CHUNK elements */

/* Whether op's rows go in groups: rows of up to PAIR_BYTES, except that
   log_softmax pairs only rows below it (at float32 256 classes, 1 KiB, with
   16 MiB of logits, log_softmax was 1.07-1.1x slower paired). */
FX_INLINE int NM(paired)(const fx_job *job, int op)
{
    const int64_t bytes = job->n_cols * (int64_t)sizeof(XT);
    return op == FX_LOG_SOFTMAX ? bytes < PAIR_BYTES : bytes <= PAIR_BYTES;
}

/* Whether a row's statistics come from one pass (row_lse1): rows longer
   than PAIR_BYTES. A shorter row's second pass reads L1, so one pass saves
   little, and it would lose the pairs' overlap of two rows' chains and the
   exact max (float32 32768 x 128, one pass: loss 1.07x, log_softmax 1.19x
   the time of pairs). Every path of a row (alone, paired, split) decides
   the same way, from n alone. */
FX_INLINE int NM(one_pass)(int64_t n)
{
    return n * (int64_t)sizeof(XT) > PAIR_BYTES;
}

/* Whether a row with an output (gradient, softmax) takes the one pass:
   its group bases must fit row_lse1's stack array. The split driver's
   onepass flags ask the same. */
FX_INLINE int NM(one_pass_out)(int64_t n)
{
    return NM(one_pass)(n) && n <= FX_LSE_MAX_GROUPS * FX_LSE_GROUP;
}

/* Rows of up to PAIR_BYTES go FX_GROUP_ROWS at a time, then in pairs:
   with AVX-512's 32 vector registers four rows' chains (max -> exp -> sum)
   and accumulators fit, and what two rows leave of the chains' latency the
   other two fill; AVX2's 16 hold two. */
#if defined(__AVX512F__)
#define FX_GROUP_ROWS 4
#else
#define FX_GROUP_ROWS 2
#endif
/* (m, s) of rows [r, r + P) of [r0, r1), P = 2 or 4 (<= FX_GROUP_ROWS) a
   constant, when every max is finite (else 0, and the caller takes the
   rows one at a time). Each row takes row_max's max and chunk_sumexp_'s
   two accumulators and tail, lane for lane, so its bits are those of the
   row alone, whatever group a thread split puts it in. Never with a stash:
   gradients and softmax (which stash exponentials) were 1.05-1.3x slower
   paired. Row j's state is in named locals (GROUP_EACH pastes j into
   them): arrays of accumulators indexed by j, even in loops unrolled by
   pragma, stayed in memory on AVX2, whose vectors take two registers
   (2x the time). */
#define GROUP_EACH(S)                                                          \
    do {                                                                       \
        S(0) S(1)                                                              \
        if (P > 2) { S(2) S(3) }                                               \
    } while (0)
FX_INLINE int NM(group_stats)(const fx_job *job, int64_t r, int64_t r1, int P, T *m, double *s)
{
    const int64_t n = job->n_cols, ld = job->x_ld;
    const XT *x0 = (const XT *)job->x + r * ld, *x1 = x0 + ld;
    const XT *x2 = P > 2 ? x1 + ld : x1, *x3 = P > 2 ? x2 + ld : x1;
    ACC mx0 = AINIT(SPLAT(-INFINITY)), mx1 = mx0, mx2 = mx0, mx3 = mx0;
    int64_t i = 0;
#define GROUP_MAX(j) mx##j = AMAX(mx##j, XLOAD(x##j + i));
#define GROUP_MAX_TAIL(j) mx##j = AMAX(mx##j, XLOAD_TAIL(x##j + i, n - i, -INFINITY));
    for (; i + VL <= n; i += VL) GROUP_EACH(GROUP_MAX);
    if (i < n) GROUP_EACH(GROUP_MAX_TAIL);
    int finite = 1;
#define GROUP_M(j)                                                             \
    m[j] = HMAX(AGET(mx##j)) + (T)0;                                           \
    finite &= isfinite(m[j]) != 0;
    GROUP_EACH(GROUP_M);
    if (!finite) return 0;
    /* The maxima splatted where they are declared: assigned later, AVX2's
       two halves of each were held in two registers, and the loop spilled
       more (1.05-1.1x the time). */
    const V vm0 = SPLAT(m[0]), vm1 = SPLAT(m[1]), vm2 = SPLAT(P > 2 ? m[2] : (T)0),
            vm3 = SPLAT(P > 2 ? m[3] : (T)0);
    ACC a00 = AINIT(SPLAT(0)), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
        a31 = a00;
    /* The next group is prefetched during the sums. */
    const char *pf0, *pf1, *pf2 = NULL, *pf3 = NULL;
#define GROUP_PF_ROW(j) pf##j = NM(next_row)(job, r + P - 1 + j, r1);
    GROUP_EACH(GROUP_PF_ROW);
#define GROUP_PF(j)                                                            \
    if (pf##j) {                                                               \
        NM(prefetch)(pf##j, i);                                                \
        NM(prefetch)(pf##j, i + VL);                                           \
    }
#define GROUP_SUM(j)                                                           \
    {                                                                          \
        const V z0 = XLOAD(x##j + i) - vm##j, z1 = XLOAD(x##j + i + VL) - vm##j; \
        const V e0 = EXPS(z0), e1 = EXPS(z1);                                  \
        a##j##0 = AADD(a##j##0, e0);                                           \
        a##j##1 = AADD(a##j##1, e1);                                           \
    }
#define GROUP_SUM_TAIL(j) a##j##0 = AADD(a##j##0, EXPS(NM(zload_exp)(x##j, i, k, vm##j)));
#define GROUP_S(j) s[j] = HSUM(AGET(a##j##0) + AGET(a##j##1));
    for (i = 0; i + 2 * VL <= n; i += 2 * VL) {
        GROUP_EACH(GROUP_PF);
        GROUP_EACH(GROUP_SUM);
    }
    for (; i < n; i += VL) {
        const int64_t k = n - i < VL ? n - i : VL;
        GROUP_EACH(GROUP_SUM_TAIL);
    }
    GROUP_EACH(GROUP_S);
    return 1;
}
#undef GROUP_EACH
#undef GROUP_MAX
#undef GROUP_MAX_TAIL
#undef GROUP_M
#undef GROUP_PF_ROW
#undef GROUP_PF
#undef GROUP_SUM
#undef GROUP_SUM_TAIL
#undef GROUP_S

/* d = sum_c w_c (x_c - m) (row_sumexp's), its terms scaled as
   zload_lin_s's. A pass of its own over a row the max pass has just
   brought into cache, taken before row_sumexp's stash may overwrite x: in
   the exponentials' loop the scaled terms cost the AVX2 build its
   registers (float32 32768 x 128, smoothed loss 1.2x, with class weights
   1.45x the time of the unscaled loop); apart, 0.75-0.95x. On AVX-512
   either way costs 1.0-1.06x. */
FX_INLINE double NM(row_d)(const XT *x, const T *w, int64_t n, T m)
{
    const V zero = SPLAT(0), vs = SPLAT(D_SCALE), vms = SPLAT(m * D_SCALE);
    double dd = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        ACC b0 = AINIT(zero);
        FX_LANES(i, c0, NM(chunk_end)(c0, n), k, {
            const V wv = NM(wload)(w, i, k);
            b0 = AADD(b0, SEL(SFX(fx_eq)(wv, zero), zero, wv * NM(zload_lin_s)(x, i, k, vs, vms, m)));
        });
        dd += HSUM(AGET(b0));
    }
    return dd * D_UNSCALE;
}

/* Row statistics for a finite m:
     return  s = sum_c exp(x_c - m)
     *d      = sum_c w_c (x_c - m)          when d is not NULL (smoothing)
   and, when st is not NULL, st_c = exp(x_c - m) (st may be x itself: each
   element is read before it is overwritten), so that a gradient pass needs
   no second exp. pf: the row to prefetch (chunk_sumexp), or NULL. */
FX_INLINE double NM(row_sumexp)(const XT *x, const T *w, int64_t n, T m, double *d, T *st,
                                const char *pf)
{
    if (d) *d = NM(row_d)(x, w, n, m);
    const V vm = SPLAT(m);
    double s = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK)
        s += NM(chunk_sumexp)(x, c0, NM(chunk_end)(c0, n), vm, st, pf);
    return s;
}


/* (m, s) for any row. A row whose max is +inf, or whose entries are all
   -inf or NaN, has no softmax (inf - inf): s = NaN makes its log-softmax,
   softmax, losses, gradients and entropy NaN, as in torch. logsumexp
   handles that case itself. */
FX_INLINE double NM(row_stats)(const XT *x, int64_t n, T *m, const char *pf)
{
    *m = NM(row_max)(x, n);
    if (isfinite(*m)) return NM(row_sumexp)(x, NULL, n, *m, NULL, NULL, pf);
    return NAN;
}
