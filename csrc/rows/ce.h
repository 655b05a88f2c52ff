/*
 * rows/ce.h - cross entropy, the whole family.
 *
 * FX_CE_HARD (ce_hard: row kernel, pairs, small rows, split rows)
 *   IN   x[n_rows, n_cols] (x_ld)   logits
 *        labels[n_rows]             each in [0, n_cols) or ignore_index
 *        ignore_index
 *        w[n_cols] or NULL, w_sum   class weights (T) and their sum
 *        smoothing                  label smoothing eps in [0, 1]
 *        gscale[r * gscale_step]    per-row gradient scale (with out)
 *   OUT  row_out[n_rows]            per-row loss (double)
 *        out[n_rows, n_cols] (out_ld) or NULL: the gradient; may equal x
 * FX_CE_SOFT (ce_soft)
 *   IN   as FX_CE_HARD, with t[n_rows, n_cols] (t_ld, T) target
 *        probabilities instead of labels
 *   OUT  as FX_CE_HARD
 * FX_CE_PROBS_HARD, FX_CE_PROBS_SOFT (ce_probs)
 *   IN   x: probabilities; labels (hard) or t (soft); w, smoothing, gscale
 *   OUT  as FX_CE_HARD
 */

/* The per-row scalars of cross entropy with an integer label, from the
 * row's max m, sum s = sum_c exp(x_c - m), log(s) and, with label
 * smoothing, d = sum_c w_c (x_c - m):
 *   loss = (1-eps) w_y (log s - (x_y - m)) + eps/C (W log s - d)
 *   gradient = exp(x - m) k1 - k2 w, except at the true class: gy
 * The row, small-row and split-row kernels all take them from here. The
 * row and split-row kernels take log(s) and exp(x_y - m) from the float64
 * vector kernels (fx_row_log, fx_row_exp), the small-row kernel from the
 * dtype's vector kernels (a whole group at once): each path is
 * deterministic and the same on every ISA, but the last bit of the true
 * class's gradient may differ between a row short enough for the
 * small-row kernel and a longer one.
 *
 * The arithmetic is written once, as macros that take doubles or vectors
 * of doubles (one row per lane), so that the small-row kernel's lanewise
 * form of a group of plain rows gives the scalar form's bits. */
#ifndef FX_CE_ROW_ONCE
#define FX_CE_ROW_ONCE
#define FX_CE_LOSS(c1, logs, xy, m) ((c1) * ((logs) - ((xy) - (m))))
#define FX_CE_A(c1, ec, W) ((c1) + (ec) * (W))
#define FX_CE_K1(gs, A, s) ((gs) * (A) / (s))
#define FX_CE_K2(gs, ec) ((gs) * (ec))
#define FX_CE_GY(gs, exy, s, A, c1, ec, wy) ((gs) * ((exy) / (s) * (A) - (c1) - (ec) * (wy)))

typedef struct fx_ce_row {
    double loss, k1, k2, gy;
} fx_ce_row;

/* exy = exp(x_y - m), used only when grad is set: the small-row kernels
   evaluate it for a whole group of rows at once. */
static inline fx_ce_row fx_ce_hard_row_e(double xy, double wy, double m, double s, double logs,
                                         double d, double eps, int64_t n, double W, double gs,
                                         int grad, double exy)
{
    const double ec = eps / (double)n, c1 = (1.0 - eps) * wy;
    fx_ce_row o = {0.0, 0.0, 0.0, 0.0};
    /* A true class of coefficient 0 (eps == 1, or weight 0) costs 0 even at
       x_y = -inf (0 log 0 = 0); a NaN s (undefined softmax) still poisons. */
    o.loss = (c1 == 0 && xy == -INFINITY && !isnan(s)) ? 0.0 : FX_CE_LOSS(c1, logs, xy, m);
    if (eps > 0) o.loss += ec * (W * logs - d);
    if (grad) {
        const double A = FX_CE_A(c1, ec, W);
        o.k1 = FX_CE_K1(gs, A, s);
        o.k2 = FX_CE_K2(gs, ec);
        /* p_y - 1 formed in double from x_y, before any rounding. */
        o.gy = FX_CE_GY(gs, exy, s, A, c1, ec, wy);
    }
    return o;
}

static inline fx_ce_row fx_ce_hard_row(double xy, double wy, double m, double s, double logs,
                                       double d, double eps, int64_t n, double W, double gs,
                                       int grad)
{
    return fx_ce_hard_row_e(xy, wy, m, s, logs, d, eps, n, W, gs, grad,
                            grad ? fx_row_exp(xy - m) : 0.0);
}

/* Rows whose loss (and gradient at the label) wait for their log and exp
   (fx_row_log, fx_row_exp), taken a vector of rows at a time. The rest of
   a row's gradient is written at once: its coefficients k1, k2 need
   neither. */
#define FX_CE_BATCH FX_LOG_BATCH
typedef struct fx_ce_batch {
    int64_t r[FX_CE_BATCH], y[FX_CE_BATCH];
    double xy[FX_CE_BATCH], wy[FX_CE_BATCH], m[FX_CE_BATCH], s[FX_CE_BATCH], d[FX_CE_BATCH],
        gs[FX_CE_BATCH];
    int k;
} fx_ce_batch;

/* The paired rows' batch: losses alone, without smoothing or weights
   other than w_y. Its own struct and an inlined flush: the pair loop
   through fx_ce_batch's out-of-line flush kept 1.5% of the 7% (float32
   32768 x 128, AVX-512). */
typedef struct fx_ce_lbatch {
    int64_t r[FX_CE_BATCH];
    double xy[FX_CE_BATCH], wy[FX_CE_BATCH], m[FX_CE_BATCH], s[FX_CE_BATCH];
    int k;
} fx_ce_lbatch;

static inline void fx_ce_lflush(const fx_job *job, fx_ce_lbatch *b)
{
    double ls[FX_CE_BATCH];
    fx_row_logs(b->s, b->k, ls);
    for (int j = 0; j < b->k; j++)
        job->row_out[b->r[j]] =
            fx_ce_hard_row_e(b->xy[j], b->wy[j], b->m[j], b->s[j], ls[j], 0.0, 0.0, 1, 0.0, 0.0, 0, 0.0)
                .loss;
    b->k = 0;
}
#endif

/* Soft-target statistics for a finite m:
     return  s = sum_c exp(x_c - m)
     *a = sum_c w_c t_c (x_c - m)   (terms with w_c t_c == 0 count 0, even
                                     when x_c = -inf: a class of probability
                                     0 that the target never names costs 0)
     *b = sum_c w_c t_c
     *d = sum_c w_c (x_c - m)       (only needed with label smoothing) */
FX_INLINE double NM(row_soft)(const XT *x, const T *t, const T *w, int64_t n, T m,
                                   double *a, double *b, double *d)
{
    const V vm = SPLAT(m), zero = SPLAT(0), vsc = SPLAT(D_SCALE), vms = SPLAT(m * D_SCALE);
    double s = 0.0, aa = 0.0, bb = 0.0, dd = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = NM(chunk_end)(c0, n);
        ACC vs = AINIT(zero), va = vs, vb = vs, vd = vs;
        FX_LANES(i, c0, c1, k, {
            const V z = NM(zload_lin_s)(x, i, k, vsc, vms, m);
            const V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
            const V wv = NM(wload)(w, i, k);
            const V wt = wv * tv;
            vs = AADD(vs, EXPS(NM(zload_exp)(x, i, k, vm)));
            va = AADD(va, SEL(SFX(fx_eq)(wt, zero), zero, wt * z));
            vb = AADD(vb, wt);
            vd = AADD(vd, SEL(SFX(fx_eq)(wv, zero), zero, wv * z));
        });
        s += HSUM(AGET(vs));
        aa += HSUM(AGET(va));
        bb += HSUM(AGET(vb));
        dd += HSUM(AGET(vd));
    }
    *a = aa * D_UNSCALE;
    *b = bb;
    *d = dd * D_UNSCALE;
    return s;
}

/* The per-row gradient scales of rows [r, r + nr) of a group, other lanes 0. */
FX_INLINE void NM(group_gscale)(const fx_job *job, int64_t r, int64_t nr, double *gsv)
{
    for (int64_t j = 0; j < VL; j++)
        gsv[j] = j < nr ? job->gscale[job->gscale_step == 0 ? 0 : (r + j) * job->gscale_step] : 0.0;
}

/* The loss, and with out the gradient, of a plain group of small rows
   (plain_group; no weights, no smoothing) from its statistics m, sv, its
   log lv, x_y and labels, ebuf holding exp(x - m) when out is set: the
   operations, in the same order, of fx_ce_hard_row with wy = 1 and
   eps = 0, lanewise, so the same bits. */
FX_INLINE void NM(ce_small_plain)(const fx_job *job, int64_t r, int64_t n, V m, VW sv, VW lv,
                                  V xy, VI labv, T *ebuf, XT *out)
{
    const double ec = 0.0, c1 = 1.0, W = job->w_sum;
    const VW xw = __builtin_convertvector(xy, VW), mw = __builtin_convertvector(m, VW);
    VW c1w;
    for (int j = 0; j < (int)(sizeof(VW) / sizeof(double)); j++) c1w[j] = c1;
    NM(store_w)(job->row_out + r, FX_CE_LOSS(c1w, lv, xw, mw));
    if (!out) return;
    /* exp(x_y - m) of every row of the group by the vector kernel: a libm
       call per row cost more than the row's other arithmetic. */
    double d[VL], exy[VL], gsv[VL];
    NM(store_w)(d, xw - mw);
    for (int h = 0; h < VL / 8; h++) fx_store_f64(exy + 8 * h, fx_expm_f64(fx_load_f64(d + 8 * h)));
    NM(group_gscale)(job, r, VL, gsv);
    const double A = FX_CE_A(c1, ec, W);
    VW gw, ew;
    memcpy(&gw, gsv, sizeof gw);
    memcpy(&ew, exy, sizeof ew);
    const V vk1 = __builtin_convertvector(FX_CE_K1(gw, A, sv), V);
    const V vk2 = __builtin_convertvector(FX_CE_K2(gw, ec), V);
    const V vgy = __builtin_convertvector(FX_CE_GY(gw, ew, sv, A, c1, ec, 1.0), V);
    /* The true class's gradient goes into its column before the transpose:
       no per-row stores into the rows just written. The union store: GCC 12
       took the upper half of this select through memory lane by lane with
       fx_store (AVX2). */
    for (int64_t c = 0; c < n; c++) {
        const V g = NM(grad_v)(LOAD(ebuf + c * VL), vk1, vk2, NULL);
        SFX(fx_store_union)(ebuf + c * VL, SEL(NM(label_is)(labv, c), vgy, g));
    }
    NM(small_store)(ebuf, VL, n, out, job->out_ld);
}

/* Any group of rows [r, r + nr), nr <= VL: weights, smoothing, ignored
   rows, rows without a softmax. Not inlined: the pair loop stays small. */
static __attribute__((noinline)) void NM(ce_small_group)(const fx_job *job, int64_t r, int64_t nr, T *buf, T *ebuf)
{
    const int64_t n = job->n_cols;
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, W = job->w_sum;
    const XT *x = (const XT *)job->x + r * job->x_ld;
    XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
    NM(small_load)(x, job->x_ld, nr, n, buf);
    VW sv;
    const V m = NM(small_stats)(buf, n, &sv, out ? ebuf : NULL, NULL);
    const VW lv = NM(small_log)(sv);
    VI labv;
    V xy;
    if (nr == VL && !w && !(eps > 0)
        && NM(plain_group)(job->labels + r, job->ignore_index, buf, n, m, sv, &labv, &xy)) {
        NM(ce_small_plain)(job, r, n, m, sv, lv, xy, labv, ebuf, out);
        return;
    }
    VW dv = __builtin_convertvector(SPLAT(0), VW);
    if (eps > 0) {
        /* x - m scaled as stats.h's zload_lin_s: it overflows T at logits
           of both signs near the range's end. */
        const V vs = SPLAT(D_SCALE), ms = m * vs;
        ACCW adv = AWINIT(dv);
        for (int64_t c = 0; c < n; c++) {
            const T wc = w ? w[c] : 1;
            if (wc != 0)
                adv = AWADD(adv, __builtin_convertvector(SPLAT(wc) * (LOAD(buf + c * VL) * vs - ms),
                                                         VW));
        }
        dv = AWGET(adv) * D_UNSCALE;
    }
    double xyv[VL], mv[VL], exy[VL], gsv[VL], gy[VL];
    T k1[VL], k2[VL], nan_row[VL];
    for (int64_t j = 0; j < VL; j++) {
        const int64_t y = j < nr ? job->labels[r + j] : job->ignore_index;
        const int ok = y != job->ignore_index && isfinite(m[j]);
        xyv[j] = ok ? (double)buf[y * VL + j] : 0.0;
        mv[j] = ok ? (double)m[j] : 0.0;
    }
    if (out) {
        NM(group_gscale)(job, r, nr, gsv);
        for (int h = 0; h < VL / 8; h++)
            fx_store_f64(exy + 8 * h, fx_expm_f64(fx_load_f64(xyv + 8 * h) - fx_load_f64(mv + 8 * h)));
    }
    for (int64_t j = 0; j < VL; j++) {
        k1[j] = 0;
        k2[j] = 0;
        nan_row[j] = 0;
        if (j >= nr) continue;
        const int64_t y = job->labels[r + j];
        if (y == job->ignore_index) {
            job->row_out[r + j] = 0.0;
            continue;
        }
        const double s = isfinite(m[j]) ? (double)sv[j] : NAN;
        nan_row[j] = isnan(s);
        const fx_ce_row o = fx_ce_hard_row_e(
            xyv[j], w ? (double)w[y] : 1.0, (double)m[j], s, isnan(s) ? s : (double)lv[j],
            (double)dv[j], eps, n, W, out ? gsv[j] : 0.0, out != NULL, out ? exy[j] : 0.0);
        job->row_out[r + j] = o.loss;
        k1[j] = (T)o.k1;
        k2[j] = (T)o.k2;
        gy[j] = o.gy;
    }
    if (!out) return;
    const V vk1 = LOAD(k1), vk2 = LOAD(k2);
    /* Rows without a softmax (s NaN) get the quiet NaN: e and k1 are both
       NaN there, and which one's sign a product keeps depends on operand
       order, which the compiler chooses per ISA build. */
    const VI nosoftmax = SFX(fx_eq)(LOAD(nan_row), SPLAT(1));
    for (int64_t c = 0; c < n; c++) {
        const V e = LOAD(ebuf + c * VL);
        const V wc = SPLAT(w ? w[c] : 0);
        const V g = NM(grad_v)(e, vk1, vk2, w ? &wc : NULL);
        STORE(ebuf + c * VL, SEL(nosoftmax, SPLAT(NAN), g));
    }
    NM(small_store)(ebuf, nr, n, out, job->out_ld);
    for (int64_t j = 0; j < nr; j++) {
        const int64_t y = job->labels[r + j];
        XT *orow = out + j * job->out_ld;
        if (y == job->ignore_index) NM(row_zero)(orow, n);
        else XSET(orow, y, (T)gy[j]);
    }
}

#define SMALL_PAIR 16
/* Not inlined into ce_hard: the one-pass row code there changed the small
   loops' register allocation (65536 x 10 float32: 1.1x slower inlined). */
static __attribute__((noinline)) void NM(ce_hard_small)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    T ba[SMALL_C * VL], bb[SMALL_C * VL], ea[SMALL_C * VL], eb[SMALL_C * VL];
    int64_t r = r0;
    /* Without weights or smoothing, two groups at a time (small_stats2);
       a pair that is not plain leaves the loop for ce_small_group (a call
       inside the loop cost the loss 1.1x: vector registers saved around it). */
    if (!job->w && !(job->smoothing > 0) && n <= SMALL_PAIR)
        while (r + 2 * VL <= r1) {
            for (; r + 2 * VL <= r1; r += 2 * VL) {
                const XT *x = (const XT *)job->x + r * job->x_ld;
                XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
                /* The labels a block ahead, for fx_run_labelled's check of
                   the next block: spread over the groups, where a burst
                   of prefetches before the block waited for line buffers. */
                if (r + FX_SUM_BLOCK + 2 * VL <= job->n_rows)
                    for (int k = 0; k < 2 * VL; k += 8)
                        __builtin_prefetch(job->labels + r + FX_SUM_BLOCK + k, 0, 3);
                NM(small_load)(x, job->x_ld, VL, n, ba);
                NM(small_load)(x + VL * job->x_ld, job->x_ld, VL, n, bb);
                VW sa, sb;
                V ma, mb, xa, xb;
                VI la, lb;
                /* Two copies: the loop without outputs has no stores to test. */
                if (out) NM(small_stats2)(ba, bb, n, &ma, &mb, &sa, &sb, ea, eb);
                else NM(small_stats2)(ba, bb, n, &ma, &mb, &sa, &sb, NULL, NULL);
                if (!NM(plain_group)(job->labels + r, job->ignore_index, ba, n, ma, sa, &la, &xa) ||
                    !NM(plain_group)(job->labels + r + VL, job->ignore_index, bb, n, mb, sb, &lb,
                                     &xb))
                    break;
                const VW lva = NM(small_log)(sa), lvb = NM(small_log)(sb);
                NM(ce_small_plain)(job, r, n, ma, sa, lva, xa, la, ea, out);
                NM(ce_small_plain)(job, r + VL, n, mb, sb, lvb, xb, lb, eb,
                                   out ? out + VL * job->out_ld : NULL);
            }
            if (r + 2 * VL > r1) break;
            NM(ce_small_group)(job, r, VL, ba, ea);
            NM(ce_small_group)(job, r + VL, VL, ba, ea);
            r += 2 * VL;
        }
    for (; r < r1; r += VL) NM(ce_small_group)(job, r, r1 - r < VL ? r1 - r : VL, ba, ea);
}

/* ------------------------------------------------------------------------
 * Cross entropy from logits with integer labels.
 *   loss_r = (1-eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c)
 *          = (1-eps) w_y (log s - (x_y - m)) + eps/C (W log s - d)
 *   grad_c = gs [ p_c ((1-eps) w_y + eps/C W) - (1-eps) w_y [c == y] - eps/C w_c ]
 * Ignored rows: loss 0, gradient 0.
 * ---------------------------------------------------------------------- */
/* The batch's losses into row_out and, with out, each row's gradient at
   its label (out may be x: x_y was saved). Once per batch, so the job's
   scalars are read here rather than passed down the row loop. */
static void NM(ce_flush)(const fx_job *job, fx_ce_batch *b)
{
    if (!b->k) return;
    XT *out = (XT *)job->out;
    const double eps = job->smoothing, W = job->w_sum;
    double ls[FX_CE_BATCH], dy[FX_CE_BATCH] = {0}, e[FX_CE_BATCH] = {0};
    fx_row_logs(b->s, b->k, ls);
    for (int j = 0; j < b->k; j++) dy[j] = b->xy[j] - b->m[j];
    if (out) fx_row_exps(dy, b->k, e);
    for (int j = 0; j < b->k; j++) {
        const fx_ce_row o = fx_ce_hard_row_e(b->xy[j], b->wy[j], b->m[j], b->s[j], ls[j], b->d[j],
                                             eps, job->n_cols, W, b->gs[j], out != NULL, e[j]);
        job->row_out[b->r[j]] = o.loss;
        if (out) XSET(out + b->r[j] * job->out_ld, b->y[j], (T)o.gy);
    }
    b->k = 0;
}

FX_INLINE void NM(ce_push)(const fx_job *job, fx_ce_batch *b, int64_t r, int64_t y, double xy,
                           double wy, double m, double s, double d, double gs)
{
    const int k = b->k;
    b->r[k] = r;
    b->y[k] = y;
    b->xy[k] = xy;
    b->wy[k] = wy;
    b->m[k] = m;
    b->s[k] = s;
    b->d[k] = d;
    b->gs[k] = gs;
    if (++b->k == FX_CE_BATCH) NM(ce_flush)(job, b);
}

/* A labelled row with label smoothing and no class weights, in one pass:
   d = sum_c (x_c - m) goes along with the sums (stats.h, d_rebase). Out of
   line: inlined into ce_hard_row, its copies of the pass changed the
   allocation of ce_hard's other loops (plain gradients 1.09x the time on
   AVX2, paired losses 1.13x on AVX-512). Returns 0, having written
   nothing, where the row takes two passes (a forward row without a
   softmax; rows the one pass does not take). */
static __attribute__((noinline)) int NM(ce_smooth_row1)(const fx_job *job, int64_t r, int64_t r1,
                                                        int64_t n, int64_t y, double xy,
                                                        double eps, double W, T *scratch)
{
    const XT *x = (const XT *)job->x + r * job->x_ld;
    XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
    const char *pf = NM(ahead)(job, r, r1);
    T m;
    double s, d = 0.0;
    if (!out) {
        if (!NM(one_pass)(n) || !NM(row_lse1_qd)(x, n, &m, &s, NULL, NULL, pf, NULL, &d)) return 0;
        job->row_out[r] = fx_ce_hard_row(xy, 1.0, (double)m, s, fx_row_log(s), d, eps, n, W, 0.0, 0).loss;
        return 1;
    }
#if X16
    T *st = scratch;
#else
    T *st = out;
    (void)scratch;
#endif
    if (!st || !NM(one_pass_out)(n)) return 0;
    T bases[FX_LSE_MAX_GROUPS];
    const int ok = NM(row_lse1_qd)(x, n, &m, &s, st, bases, pf, NULL, &d);
    /* A row without a softmax: NaN (its values may be gone, out = x). */
    if (!ok) {
        m = NAN;
        s = NAN;
    }
    const fx_ce_row o = fx_ce_hard_row(xy, 1.0, (double)m, s, fx_row_log(s), d, eps, n, W,
                                       job->gscale[r * job->gscale_step], 1);
    job->row_out[r] = o.loss;
    if (ok) NM(group_write)(x, out, NULL, n, m, bases, o.k1, o.k2, st);
    else NM(row_nan)(out, n);
    XSET(out, y, (T)o.gy);
    return 1;
}

/* One row of ce_hard. n, w, eps and W come from the caller, which reads
   them once: reread here after each row's double store (row_out, which
   may alias them as far as the compiler knows), they kept GCC from
   specialising the row loop, and gradients ran 7% slower. scratch: a
   float32 row of n for 16-bit gradients' exponentials, or NULL. */
FX_INLINE void NM(ce_hard_row)(const fx_job *job, int64_t r, int64_t r1, int64_t n, const T *w,
                               double eps, double W, T *scratch, fx_ce_batch *b)
{
    const XT *x = (const XT *)job->x + r * job->x_ld;
    XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
    const int64_t y = job->labels[r];
    if (y == job->ignore_index) {
        job->row_out[r] = 0.0;
        if (out) NM(row_zero)(out, n);
        return;
    }
    const double xy = (double)XGET(x, y);
    const double wy = w ? (double)w[y] : 1.0;
    if (eps > 0 && !w && NM(ce_smooth_row1)(job, r, r1, n, y, xy, eps, W, scratch)) return;
    T m;
    double s, d = 0.0;
    /* The loss alone needs only (m, s), for any base m: one pass. */
    if (!out && !(eps > 0) && NM(one_pass)(n)
        && NM(row_lse1)(x, n, &m, &s, NULL, NULL, NM(ahead)(job, r, r1))) {
        NM(ce_push)(job, b, r, y, xy, wy, (double)m, s, 0.0, 0.0);
        return;
    }
    /* With the gradient (rows of up to FX_LSE_MAX_GROUPS groups), one pass
       keeps each group's exp(x - b_g) in the stash, which group_write
       scales by the group's coefficient. */
    T *st1 = NULL;
#if X16
    st1 = scratch;
#else
    st1 = out;
#endif
    if (out && st1 && !(eps > 0) && NM(one_pass_out)(n)) {
        T bases[FX_LSE_MAX_GROUPS];
        const double gs = job->gscale[r * job->gscale_step];
        const int ok = NM(row_lse1)(x, n, &m, &s, st1, bases, NM(ahead)(job, r, r1));
        /* A row without a softmax: NaN (its values may be gone, out = x). */
        if (!ok) {
            m = NAN;
            s = NAN;
        }
        /* k1, k2 need neither the log nor exp(x_y - m): the label's
           gradient and the loss come with the batch. */
        const fx_ce_row o = fx_ce_hard_row_e(xy, wy, (double)m, s, 0.0, 0.0, eps, n, W, gs, 1, 0.0);
        if (ok) NM(group_write)(x, out, w, n, m, bases, o.k1, o.k2, st1);
        else NM(row_nan)(out, n);
        NM(ce_push)(job, b, r, y, xy, wy, (double)m, s, 0.0, gs);
        return;
    }
    m = NM(row_max)(x, n);
    /* Gradients stash exp(x - m) on the way: in out for float32/float64,
       in scratch for 16-bit out. */
    T *stash = NULL;
#if X16
    if (out && isfinite(m)) stash = scratch;
#else
    if (out && isfinite(m)) stash = out;
    (void)scratch;
#endif
    if (isfinite(m))
        s = NM(row_sumexp)(x, w, n, m, eps > 0 ? &d : NULL, stash, NM(next_row)(job, r, r1));
    else s = NAN;
    const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
    /* A row without a softmax (s NaN) gets the quiet NaN, as the one-pass
       rows: e k1 - k2 w keeps one of the NaNs in x, k1 and the stash, which
       one by an operand order the compiler chooses per ISA build (smoothed
       gradients of such rows differed between AVX2 and AVX-512). */
    if (out && isnan(s)) NM(row_nan)(out, n);
    else if (out) {
        const fx_ce_row o = fx_ce_hard_row_e(xy, wy, (double)m, s, 0.0, d, eps, n, W, gs, 1, 0.0);
        const T k1 = (T)o.k1, k2 = (T)o.k2;
        if (stash) NM(grad_write)(x, out, w, n, m, k1, k2, stash);
        else NM(grad_write)(x, out, w, n, m, k1, k2, NULL);
    }
    NM(ce_push)(job, b, r, y, xy, wy, (double)m, s, d, gs);
}

/* The loss alone of rows [r, r1) in groups of P (group_stats), up to the
   last whole group: returns the first row not taken. */
FX_INLINE int64_t NM(ce_hard_groups)(const fx_job *job, int64_t r, int64_t r1, int P, const T *w,
                                     double eps, double W, T *scratch, fx_ce_batch *b,
                                     fx_ce_lbatch *lb)
{
    const int64_t n = job->n_cols;
    for (; r + P <= r1; r += P) {
        T m[FX_GROUP_ROWS];
        double s[FX_GROUP_ROWS];
        int plain = 1;
        for (int j = 0; j < P; j++) plain &= job->labels[r + j] != job->ignore_index;
        if (!plain || !NM(group_stats)(job, r, r1, P, m, s)) {
            for (int j = 0; j < P; j++) NM(ce_hard_row)(job, r + j, r1, n, w, eps, W, scratch, b);
            continue;
        }
        for (int j = 0; j < P; j++) {
            const XT *x = (const XT *)job->x + (r + j) * job->x_ld;
            const int64_t y = job->labels[r + j];
            lb->r[lb->k] = r + j;
            lb->xy[lb->k] = (double)XGET(x, y);
            lb->wy[lb->k] = w ? (double)w[y] : 1.0;
            lb->m[lb->k] = (double)m[j];
            lb->s[lb->k++] = s[j];
            if (lb->k == FX_CE_BATCH) fx_ce_lflush(job, lb);
        }
    }
    return r;
}

static void KFN(ce_hard)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    if (NM(small)(job)) {
        NM(ce_hard_small)(job, r0, r1);
        return;
    }
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, W = job->w_sum;
    /* 16-bit out cannot hold exp(x - m) losslessly, so its rows keep them
       in a float32 row instead, for rows that fit the cache (as split rows'
       stash): one exp per element instead of two, 0.5-0.6x the time of
       recomputing them (bfloat16 and float16, 4096 x 32000, Zen 4). No
       scratch (NULL from malloc) recomputes the same values. */
    T *scratch = NULL;
#if X16
    if (job->out && (double)n * sizeof(T) <= (double)FX_STREAM_BYTES)
        scratch = (T *)malloc((size_t)n * sizeof(T));
#endif
    int64_t r = r0;
    fx_ce_batch b;
    b.k = 0;
    /* The loss alone, without smoothing (a third sum): rows in pairs. */
    if (NM(paired)(job, FX_CE_HARD) && !job->out && !(eps > 0)) {
        fx_ce_lbatch lb;
        lb.k = 0;
#if FX_GROUP_ROWS > 2
        r = NM(ce_hard_groups)(job, r, r1, FX_GROUP_ROWS, w, eps, W, scratch, &b, &lb);
#endif
        r = NM(ce_hard_groups)(job, r, r1, 2, w, eps, W, scratch, &b, &lb);
        fx_ce_lflush(job, &lb);
    }
    for (; r < r1; r++) NM(ce_hard_row)(job, r, r1, n, w, eps, W, scratch, &b);
    NM(ce_flush)(job, &b);
    free(scratch);
}

/* One labelled row split across threads (parallel.c's driver, split.h's
   passes): float32/float64 rows without smoothing, whose (m, s) the driver
   forms from the row kernel's own chunk sums, in its order; the scalars
   then come from fx_ce_hard_row as in ce_hard_row, so the row's bits do
   not depend on the split. */
static int KFN(ce_hard_split)(const fx_job *job, fx_split *sp, int phase)
{
    const int64_t n = job->n_cols, r = sp ? sp->r : 0;
    const T *w = (const T *)job->w;
    XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
    switch (phase) {
    case FX_SPLIT_JOB:
        return !X16 && job->smoothing == 0;
    case FX_SPLIT_BEGIN: {
        const int64_t y = job->labels[r];
        if (y == job->ignore_index) return 0; /* the row kernel's zeros */
        /* x_y is read first: out may be x. As the row kernels, the sums pass
           keeps exp(x - m) in out (except for rows too big for the cache,
           whose kept exponentials would come back from memory). */
        sp->xy = (double)XGET((const XT *)job->x + r * job->x_ld, y);
        sp->stash = out && (double)n * sizeof(XT) <= (double)FX_STREAM_BYTES;
        /* As ce_hard_row (split rows are long, and stashed up to this). */
        sp->onepass = !out || NM(one_pass_out)(n);
        return 1;
    }
    case FX_SPLIT_FINISH: {
        const int64_t y = job->labels[r];
        const fx_ce_row o = fx_ce_hard_row(sp->xy, w ? (double)w[y] : 1.0, sp->m, sp->s,
                                           fx_row_log(sp->s), 0.0, job->smoothing, n, job->w_sum,
                                           out ? job->gscale[r * job->gscale_step] : 0.0,
                                           out != NULL);
        job->row_out[r] = o.loss;
        sp->k1 = o.k1;
        sp->k2 = o.k2;
        sp->gy = o.gy;
        sp->w = w;
        return out != NULL;
    }
    default: /* FX_SPLIT_END: the true class, from the saved x_y */
        if (out) XSET(out, job->labels[r], (T)sp->gy);
        return 0;
    }
}

/* ------------------------------------------------------------------------
 * Cross entropy from logits with probability targets t (used as given),
 * smoothed to t' = (1-eps) t + eps/C:
 *   loss_r = sum_c w_c t'_c (log s - (x_c - m)) = B' log s - A'
 *            with B' = (1-eps) b + eps/C W,  A' = (1-eps) a + eps/C d
 *   grad_c = gs [ p_c B' - w_c t'_c ]
 * ---------------------------------------------------------------------- */
static void KFN(ce_soft)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, ec = eps / (double)n, W = job->w_sum;
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        const T *t = (const T *)job->t + r * job->t_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        T m = NM(row_max)(x, n);
        double s, a = 0.0, b = 0.0, d = 0.0;
        if (isfinite(m)) s = NM(row_soft)(x, t, w, n, m, &a, &b, &d);
        else s = NAN;
        const double Bp = (1.0 - eps) * b + ec * W;
        double Ap = eps < 1 ? (1.0 - eps) * a : 0.0;
        if (eps > 0) Ap += ec * d;
        job->row_out[r] = Bp * log(s) - Ap;
        if (out) {
            const double gs = job->gscale[r * job->gscale_step];
            const V vm = SPLAT(m), k1 = SPLAT((T)(gs * Bp / s));
            const V k2 = SPLAT((T)(gs * (1.0 - eps))), k3 = SPLAT((T)(gs * ec));
            FX_LANES(i, 0, n, k, {
                const V e = EXPM(NM(zload_exp)(x, i, k, vm));
                const V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
                const V g = e * k1 - NM(wload)(w, i, k) * (tv * k2 + k3);
                if (k == VL) XSTORE(out + i, g);
                else XSTORE_TAIL(out + i, g, k);
            });
        }
    }
}

/* ------------------------------------------------------------------------
 * Cross entropy from probabilities p (from_logits=False): no softmax, no
 * renormalisation, no clipping.
 *   loss_r = -sum_c w_c t'_c log p_c   (terms of coefficient 0 count 0
 *   grad_c = -gs w_c t'_c / p_c         unless p_c is NaN)
 * Integer labels give t' = (1-eps) onehot(y) + eps/C. Not a hot path:
 * plain loops in double with the C library's log.
 * ---------------------------------------------------------------------- */
static void KFN(ce_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, ec = eps / (double)n;
    const int hard = job->labels != NULL;
    for (int64_t r = r0; r < r1; r++) {
        const XT *p = (const XT *)job->x + r * job->x_ld;
        const T *t = hard ? NULL : (const T *)job->t + r * job->t_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        const int64_t y = hard ? job->labels[r] : -1;
        if (hard && y == job->ignore_index) {
            job->row_out[r] = 0.0;
            if (out) NM(row_zero)(out, n);
            continue;
        }
        double loss = 0.0;
        if (hard) {
            const double coef = (1.0 - eps) * (w ? (double)w[y] : 1.0);
            loss = coef != 0 || isnan(XGET(p, y)) ? -coef * log((double)XGET(p, y)) : 0.0;
            if (eps > 0) {
                double acc = 0.0;
                for (int64_t c = 0; c < n; c++) {
                    const double wc = w ? (double)w[c] : 1.0;
                    if (wc != 0 || isnan(XGET(p, c))) acc += wc * log((double)XGET(p, c));
                }
                loss -= ec * acc;
            }
        } else {
            for (int64_t c = 0; c < n; c++) {
                const double coef = (w ? (double)w[c] : 1.0) * ((1.0 - eps) * (double)t[c] + ec);
                if (coef != 0 || isnan(XGET(p, c))) loss -= coef * log((double)XGET(p, c));
            }
        }
        job->row_out[r] = loss;
        if (out) {
            const double gs = job->gscale[r * job->gscale_step];
            const double py = hard ? (double)XGET(p, y) : 0.0;
            for (int64_t c = 0; c < n; c++) {
                const double tc = hard ? ec : (1.0 - eps) * (double)t[c] + ec;
                const double coef = (w ? (double)w[c] : 1.0) * tc;
                XSET(out, c, coef == 0 && !isnan(XGET(p, c)) ? (T)0 : (T)(-gs * coef / (double)XGET(p, c)));
            }
            if (hard) {
                const double coef = (w ? (double)w[y] : 1.0) * ((1.0 - eps) + ec);
                XSET(out, y, coef == 0 && !isnan(py) ? (T)0 : (T)(-gs * coef / py));
            }
        }
    }
}
