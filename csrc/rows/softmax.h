/*
 * rows/softmax.h - logsumexp, log_softmax, softmax and entropy: the row
 * values and normalised outputs of softmax(x), the whole family.
 *
 * FX_LOGSUMEXP (logsumexp: row kernel, pairs, small rows, split rows)
 *   IN   x[n_rows, n_cols] (x_ld)
 *   OUT  row_out[n_rows]              log(sum_c exp(x_c)) (double)
 * FX_LOG_SOFTMAX, FX_SOFTMAX (log_softmax, softmax: the same four paths)
 *   IN   x
 *   OUT  out[n_rows, n_cols] (out_ld) in x's storage dtype; may equal x
 * FX_ENTROPY (entropy: row kernel, small rows)
 *   IN   x                            logits
 *   OUT  row_out[n_rows]              entropy of softmax(x) (double)
 * FX_ENTROPY_PROBS (entropy_probs)
 *   IN   x                            probabilities, used as given
 *   OUT  row_out[n_rows]              -sum_c x_c log x_c (double)
 */

/* Entropy statistics for a finite m:
     return  s = sum_c exp(x_c - m),  *q = sum_c exp(x_c - m) (x_c - m)
   with 0 * log 0 = 0: a class of probability 0 adds nothing. */
FX_INLINE double NM(row_entropy)(const XT *x, int64_t n, T m, double *q, const char *pf)
{
    const V vm = SPLAT(m), zero = SPLAT(0);
    double s = 0.0, qq = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = NM(chunk_end)(c0, n);
        ACC vs = AINIT(zero), vq = vs;
        FX_LANES(i, c0, c1, k, {
            if (pf) NM(prefetch)(pf, i);
            const V z = NM(zload_exp)(x, i, k, vm);
            const V e = EXPM(z);
            vs = AADD(vs, e);
            vq = AADD(vq, SEL(SFX(fx_eq)(e, zero), zero, e * z));
        });
        s += HSUM(AGET(vs));
        qq += HSUM(AGET(vq));
    }
    *q = qq;
    return s;
}

/* logsumexp, log-softmax, softmax and entropy of small rows. */
/* Not inlined (as ce_hard_small): each family's row code leaves it alone. */
static __attribute__((noinline)) void NM(blocks_small)(const fx_job *job, int op, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    T buf[SMALL_C * VL], k[VL];
    for (int64_t r = r0; r < r1; r += VL) {
        const int64_t nr = r1 - r < VL ? r1 - r : VL;
        NM(small_load)((const XT *)job->x + r * job->x_ld, job->x_ld, nr, n, buf);
        VW sv;
        /* softmax: the exponentials replace x in buf */
        VW qv;
        const V m = NM(small_stats)(buf, n, &sv, op == FX_SOFTMAX ? buf : NULL,
                                    op == FX_ENTROPY ? &qv : NULL);
        const VW lv = NM(small_log)(sv);
        V vk;
        /* A full group of rows with finite m and s (as in plain_group):
           the per-row arithmetic of the loop below, lanewise (same bits). */
        if (nr == VL && NM(finite_group)(m, sv)) {
            if (op == FX_ENTROPY) {
                NM(store_w)(job->row_out + r, lv - qv / sv);
                continue;
            }
            if (op == FX_LOGSUMEXP) {
                NM(store_w)(job->row_out + r, __builtin_convertvector(m, VW) + lv);
                continue;
            }
            vk = op == FX_LOG_SOFTMAX
                     ? __builtin_convertvector(lv, V)
                     : __builtin_convertvector(__builtin_convertvector(SPLAT(1), VW) / sv, V);
        } else {
        for (int64_t j = 0; j < VL; j++) {
            const double s = j < nr && isfinite(m[j]) ? (double)sv[j] : NAN;
            const double logs = isnan(s) ? s : (double)lv[j];
            /* H = log s - q / s (NaN where the softmax is undefined) */
            if (op == FX_ENTROPY && j < nr) job->row_out[r + j] = logs - (double)qv[j] / s;
            if (op == FX_LOGSUMEXP && j < nr) {
                double v = (double)m[j] + logs;
                if (!isfinite(m[j])) { /* as the row kernel: inf, -inf or NaN */
                    v = m[j];
                    for (int64_t c = 0; c < n; c++)
                        if (isnan(buf[c * VL + j])) v = NAN;
                }
                job->row_out[r + j] = v;
            }
            k[j] = op == FX_LOG_SOFTMAX ? (T)logs : (T)(1.0 / s);
        }
        if (op == FX_LOGSUMEXP || op == FX_ENTROPY) continue;
        vk = LOAD(k);
        }
        for (int64_t c = 0; c < n; c++) {
            const V v = LOAD(buf + c * VL);
            /* A row without a softmax (k NaN) gets the quiet NaN: which
               NaN a product keeps depends on the operand order, which the
               compiler chooses per ISA build. */
            STORE(buf + c * VL, op == FX_LOG_SOFTMAX ? NM(lsm_v)(v, m, vk)
                                                     : SEL(SFX(fx_eq)(vk, vk), v * vk, SPLAT(NAN)));
        }
        NM(small_store)(buf, nr, n, (XT *)job->out + r * job->out_ld, job->out_ld);
    }
}

FX_INLINE void NM(logsumexp_row)(const fx_job *job, int64_t r, int64_t r1, fx_log_batch *lb)
{
    const XT *x = (const XT *)job->x + r * job->x_ld;
    T b;
    double s;
    if (NM(one_pass)(job->n_cols)
        && NM(row_lse1)(x, job->n_cols, &b, &s, NULL, NULL, NM(ahead)(job, r, r1))) {
        fx_log_push(job, lb, r, (double)b, s, 0);
        return;
    }
    const T m = NM(row_max)(x, job->n_cols);
    if (isfinite(m)) {
        fx_log_push(job, lb, r, (double)m,
                    NM(row_sumexp)(x, NULL, job->n_cols, m, NULL, NULL, NM(next_row)(job, r, r1)), 0);
        return;
    }
    /* +inf for a row holding +inf, -inf for a row of -inf; NaN poisons. */
    double v = m;
    for (int64_t c = 0; c < job->n_cols; c++)
        if (isnan(XGET(x, c))) v = NAN;
    job->row_out[r] = v;
}

/* Rows [r, r1) in groups of P (group_stats), up to the last whole group:
   returns the first row not taken. */
FX_INLINE int64_t NM(logsumexp_groups)(const fx_job *job, int64_t r, int64_t r1, int P,
                                       fx_log_batch *lb)
{
    for (; r + P <= r1; r += P) {
        T m[FX_GROUP_ROWS];
        double s[FX_GROUP_ROWS];
        if (NM(group_stats)(job, r, r1, P, m, s))
            for (int j = 0; j < P; j++) fx_log_push(job, lb, r + j, (double)m[j], s[j], 0);
        else
            for (int j = 0; j < P; j++) NM(logsumexp_row)(job, r + j, r1, lb);
    }
    return r;
}

static void KFN(logsumexp)(const fx_job *job, int64_t r0, int64_t r1)
{
    if (NM(small)(job)) {
        NM(blocks_small)(job, FX_LOGSUMEXP, r0, r1);
        return;
    }
    int64_t r = r0;
    fx_log_batch lb;
    lb.k = 0;
    lb.sub = 0;
    if (NM(paired)(job, FX_LOGSUMEXP)) {
#if FX_GROUP_ROWS > 2
        r = NM(logsumexp_groups)(job, r, r1, FX_GROUP_ROWS, &lb);
#endif
        r = NM(logsumexp_groups)(job, r, r1, 2, &lb);
    }
    for (; r < r1; r++) NM(logsumexp_row)(job, r, r1, &lb);
    fx_log_flush(job, &lb);
}

/* Row r's log-softmax (x - m) - l from its max m and l = log(sum_c
   exp(x_c - m)). */
FX_INLINE void NM(log_softmax_write)(const fx_job *job, int64_t r, T m, double l, int stream)
{
    NM(lsm_write)((const XT *)job->x + r * job->x_ld, (XT *)job->out + r * job->out_ld,
                  job->n_cols, m, (T)l, stream);
}

/* l from the one-pass base b, sum s and max mx: log(s) + (b - mx) (b - mx
   exact), so that x - mx stays exact for the largest logits. */
FX_INLINE double NM(lsm_log)(T b, double s, T mx)
{
    return log(s) + ((double)b - (double)mx);
}

FX_INLINE void NM(log_softmax_row)(const fx_job *job, int64_t r, int64_t r1, int stream)
{
    const XT *x = (const XT *)job->x + r * job->x_ld;
    T b, mx;
    double s;
    /* The max from a second read of the row, from cache: tracking it in
       the one pass cost more (AVX2, 8192 x 1000: 1.1x). */
    if (NM(one_pass)(job->n_cols)
        && NM(row_lse1)(x, job->n_cols, &b, &s, NULL, NULL, NM(ahead)(job, r, r1))) {
        mx = NM(row_max)(x, job->n_cols);
        NM(log_softmax_write)(job, r, mx, NM(lsm_log)(b, s, mx), stream);
        return;
    }
    const double s2 = NM(row_stats)(x, job->n_cols, &mx, NULL);
    NM(log_softmax_write)(job, r, mx, log(s2), stream);
}

/* As logsumexp_groups, for log_softmax. */
FX_INLINE int64_t NM(log_softmax_groups)(const fx_job *job, int64_t r, int64_t r1, int P,
                                         int stream)
{
    for (; r + P <= r1; r += P) {
        T m[FX_GROUP_ROWS];
        double s[FX_GROUP_ROWS];
        if (NM(group_stats)(job, r, r1, P, m, s))
            for (int j = 0; j < P; j++) NM(log_softmax_write)(job, r + j, m[j], log(s[j]), stream);
        else
            for (int j = 0; j < P; j++) NM(log_softmax_row)(job, r + j, r1, stream);
    }
    return r;
}

static void KFN(log_softmax)(const fx_job *job, int64_t r0, int64_t r1)
{
    if (NM(small_lsm)(job)) {
        NM(blocks_small)(job, FX_LOG_SOFTMAX, r0, r1);
        return;
    }
    int stream = 0;
#if !X16
    stream = NM(streaming)(job);
#endif
    int64_t r = r0;
    if (NM(paired)(job, FX_LOG_SOFTMAX)) {
#if FX_GROUP_ROWS > 2
        r = NM(log_softmax_groups)(job, r, r1, FX_GROUP_ROWS, stream);
#endif
        r = NM(log_softmax_groups)(job, r, r1, 2, stream);
    }
    for (; r < r1; r++) NM(log_softmax_row)(job, r, r1, stream);
#if !X16
    if (stream) fx_stream_fence();
#endif
}

static void KFN(softmax)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    if (NM(small)(job)) {
        NM(blocks_small)(job, FX_SOFTMAX, r0, r1);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        XT *out = (XT *)job->out + r * job->out_ld;
#if !X16
        /* One pass keeps each group's exp(x - b_g) in out; group_write
           scales them. A row without a softmax is NaN (out may be x). */
        if (NM(one_pass_out)(n)) {
            T bases[FX_LSE_MAX_GROUPS], b;
            double s;
            if (NM(row_lse1)(x, n, &b, &s, out, bases, NM(ahead)(job, r, r1)))
                NM(group_write)(x, out, NULL, n, b, bases, 1.0 / s, 0.0, out);
            else NM(row_nan)(out, n);
            continue;
        }
        /* Stash exp(x - m) in out, then scale: one exp per element. */
        const T mm = NM(row_max)(x, n);
        if (isfinite(mm)) {
            const double s = NM(row_sumexp)(x, NULL, n, mm, NULL, out, NM(next_row)(job, r, r1));
            if (isnan(s)) NM(row_nan)(out, n);
            else NM(grad_write)(x, out, NULL, n, mm, (T)(1.0 / s), 0, out);
            continue;
        }
#endif
        T m;
        const double s = NM(row_stats)(x, n, &m, NULL);
        if (isnan(s)) NM(row_nan)(out, n); /* as blocks_small */
        else NM(grad_write)(x, out, NULL, n, m, (T)(1.0 / s), 0, NULL);
    }
}

/* One row of logsumexp, log_softmax or softmax split across threads
   (parallel.c's driver, split.h's passes): the row kernels' scalar steps
   from the driver's (m, s), which are the row kernel's own. */
FX_INLINE int NM(blocks_split)(const fx_job *job, fx_split *sp, int phase, int op)
{
    switch (phase) {
    case FX_SPLIT_JOB:
        return 1;
    case FX_SPLIT_BEGIN:
        /* float32/float64 softmax keeps exp(x - m) in out, as the row
           kernel, except for rows too big for the cache. */
        sp->stash = op == FX_SOFTMAX && !X16
                    && (double)job->n_cols * sizeof(XT) <= (double)FX_STREAM_BYTES;
        /* As the row kernels: softmax in one pass where it stashes. */
        sp->onepass = op != FX_SOFTMAX
                      || (!X16 && NM(one_pass_out)(job->n_cols));
        return 1;
    case FX_SPLIT_FINISH:
        if (op == FX_LOGSUMEXP) {
            job->row_out[sp->r] = sp->m + fx_row_log(sp->s);
            return 0;
        }
        sp->lsm = op == FX_LOG_SOFTMAX;
        sp->k1 = sp->lsm ? NM(lsm_log)((T)sp->m, sp->s, (T)sp->mx) : 1.0 / sp->s;
        if (sp->lsm) sp->m = sp->mx;
        sp->k2 = 0.0;
        /* softmax of a row without a softmax: the quiet NaN, as the row
           kernel writes it (e k1 would keep the input NaN's sign). */
        if (op == FX_SOFTMAX && isnan(sp->s)) sp->nan = 1;
        return 1;
    default:
        return 0;
    }
}

static int KFN(logsumexp_split)(const fx_job *job, fx_split *sp, int phase)
{
    return NM(blocks_split)(job, sp, phase, FX_LOGSUMEXP);
}
static int KFN(log_softmax_split)(const fx_job *job, fx_split *sp, int phase)
{
    return NM(blocks_split)(job, sp, phase, FX_LOG_SOFTMAX);
}
static int KFN(softmax_split)(const fx_job *job, fx_split *sp, int phase)
{
    return NM(blocks_split)(job, sp, phase, FX_SOFTMAX);
}

/* Whether entropy's rows take the one pass (row_lse1_qd with q): rows
   over 3 KiB. Its loop carries a second sum through the raises, and on AVX2 rows of
   300-600 float32 classes that sat in cache took 1.04-1.09x the time of
   two passes (even from memory); at 1000 classes and up one pass took
   0.88-0.95x on AVX2 and 0.67-0.7x on AVX-512. */
FX_INLINE int NM(one_pass_ent)(int64_t n)
{
    return n * (int64_t)sizeof(XT) > 3072;
}

/* H = log s - (1/s) sum_c e_c (x_c - m), with e_c = exp(x_c - m). */
static void KFN(entropy)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    if (NM(small)(job)) {
        NM(blocks_small)(job, FX_ENTROPY, r0, r1);
        return;
    }
    fx_log_batch lb;
    lb.k = 0;
    lb.sub = 1;
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        const char *pf = NM(next_row)(job, r, r1);
        T m;
        double q, s;
        /* H = log s - q / s holds for any base m: one pass (stats.h). */
        if (NM(one_pass_ent)(n)
            && NM(row_lse1_qd)(x, n, &m, &s, NULL, NULL, NM(ahead)(job, r, r1), &q, NULL)) {
            fx_log_push(job, &lb, r, q / s, s, 1);
            continue;
        }
        m = NM(row_max)(x, n);
        if (!isfinite(m)) {
            /* softmax of a row whose max is +inf or whose entries are all
               -inf (or NaN) is undefined (inf - inf): NaN, as in torch. */
            job->row_out[r] = NAN;
            continue;
        }
        s = NM(row_entropy)(x, n, m, &q, pf);
        fx_log_push(job, &lb, r, q / s, s, 1);
    }
    fx_log_flush_ool(job, &lb);
}

/* H = -sum_c p_c log p_c (0 log 0 = 0), in double. Eight probabilities at
   a time with the project's double log (logm.h) where all eight are zero
   or normal and finite; other blocks, and 16-bit inputs, element by
   element with the C library. Lanes are added in a fixed order. */
static void KFN(entropy_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    for (int64_t r = r0; r < r1; r++) {
        const XT *p = (const XT *)job->x + r * job->x_ld;
        double h = 0.0;
        int64_t c = 0;
#if !X16
        const fx_vf64 zero = fx_splat_f64(0.0);
        fx_acc_f64 vh = fx_acc_init_f64(zero);
        for (; c + 8 <= n; c += 8) {
            const fx_vf64 pv = NM(load8)(p + c);
            fx_vf64 ps;
            if (!fx_log_domain_f64(pv, &ps)) {
                for (int j = 0; j < 8; j++)
                    if (pv[j] != 0) h -= pv[j] * log(pv[j]);
                continue;
            }
            vh = fx_acc_add_f64(vh, fx_sel_f64(fx_eq_f64(pv, zero), zero, pv * fx_log_pos_f64(ps)));
        }
        h -= fx_hsum_f64(fx_acc_get_f64(vh));
#endif
        for (; c < n; c++)
            if (XGET(p, c) != 0) h -= (double)XGET(p, c) * log((double)XGET(p, c));
        job->row_out[r] = h;
    }
}
