/*
 * rows/bce.h - binary cross entropy, elementwise: the whole family.
 *
 * FX_BCE_LOGITS, FX_BCE_PROBS (bce_logits, bce_probs)
 *   IN   x[n_rows, n_cols] (x_ld)     logits, or probabilities in [0, 1]
 *        t[n_rows, n_cols] (t_ld, T)  targets
 *        w (w_ld), pw (pw_ld), T, or NULL: weight and pos_weight, rows
 *                                     w_ld / pw_ld apart (0: one row for all)
 *        gscale[r * gscale_step]      per-row gradient scale (with out)
 *        gout (gout_ld, T) or NULL    elementwise grad_output
 *   OUT  row_out[n_rows]              each row's sum of losses (double)
 *        loss_out (loss_ld, T) or NULL: the elementwise losses
 *        out[n_rows, n_cols] (out_ld) or NULL: the gradient
 */

/* ------------------------------------------------------------------------
 * Binary cross entropy from logits, elementwise (torch's
 * binary_cross_entropy_with_logits), with lw = 1 + (pw - 1) t:
 *   loss = w [ (1 - t) x + lw (log1p(exp(-|x|)) + max(-x, 0)) ]
 *        = w [ (x >= 0 ? (1 - t) x : -pw t x) + lw log1p(exp(-|x|)) ]
 *   grad = gs gout w [ lw sigmoid(x) - pw t ]
 * exp(-|x|) <= 1 never overflows; log1p keeps tiny losses exact.
 * row_out gets each row's sum, loss_out (if any) the elements.
 * ---------------------------------------------------------------------- */
/* Row r's targets, weights, pos_weights, grad_output, elementwise losses
   and gradient (NULL where the job has none). */
#define FX_BCE_ROW(job, r)                                                         \
    const T *t = (const T *)(job)->t + (r) * (job)->t_ld;                          \
    const T *w = (job)->w ? (const T *)(job)->w + (r) * (job)->w_ld : NULL;        \
    const T *pw = (job)->pw ? (const T *)(job)->pw + (r) * (job)->pw_ld : NULL;    \
    const T *go = (job)->gout ? (const T *)(job)->gout + (r) * (job)->gout_ld : NULL; \
    T *lo = (job)->loss_out ? (T *)(job)->loss_out + (r) * (job)->loss_ld : NULL;  \
    XT *out = (job)->out ? (XT *)(job)->out + (r) * (job)->out_ld : NULL

static void KFN(bce_logits)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const V zero = SPLAT(0), one = SPLAT(1);
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        FX_BCE_ROW(job, r);
        const V gs = SPLAT(out ? (T)job->gscale[r * job->gscale_step] : 0);
        double total = 0.0;
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t c1 = NM(chunk_end)(c0, n);
            ACC acc = AINIT(zero);
            FX_LANES(i, c0, c1, k, {
                const V xv = k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, 0);
                const V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
                const V wv = w ? (k == VL ? LOAD(w + i) : LOAD_TAIL(w + i, k, 0)) : NM(wload)(NULL, 0, k);
                const V pv = pw ? (k == VL ? LOAD(pw + i) : LOAD_TAIL(pw + i, k, 1)) : one;
                const VI neg = SFX(fx_lt)(xv, zero);
                const V e = EXPM(SEL(neg, xv, -xv));
                const V lw = one + (pv - one) * tv;
                /* (1-t) x + lw max(-x, 0) folded per sign: x (1-t) for
                   x >= 0, -pw t x for x < 0; no cancellation of huge terms. */
                const V lin = SEL(neg, -(pv * tv) * xv, (one - tv) * xv);
                const V l = wv * (lin + lw * SFX(fx_log1p_unit)(e));
                acc = AADD(acc, l);
                if (lo) {
                    if (k == VL) STORE(lo + i, l);
                    else STORE_TAIL(lo + i, l, k);
                }
                if (out) {
                    const V sig = SEL(neg, e, one) / (one + e);
                    V g = gs * wv * (lw * sig - pv * tv);
                    if (go) g = g * (k == VL ? LOAD(go + i) : LOAD_TAIL(go + i, k, 0));
                    if (k == VL) XSTORE(out + i, g);
                    else XSTORE_TAIL(out + i, g, k);
                }
            });
            total += HSUM(AGET(acc));
        }
        job->row_out[r] = total;
    }
}

/* Binary cross entropy from probabilities (torch's binary_cross_entropy),
 * logs clamped at -100; the gradient is torch's backward formula
 *   grad = gs gout w (lw p - pw t) / max(p (1 - p), 1e-12).
 * Plain double loops with the C library's log and log1p. */
#if !X16
/* Every one of the 8 probabilities at p in [0, 1] (NaN is not). */
FX_INLINE int NM(bce_probs_covered)(const T *p)
{
    const fx_vf64 v = NM(load8)(p);
    const fx_vi64 bad = fx_lt_f64(v, fx_splat_f64(0.0)) | fx_lt_f64(fx_splat_f64(1.0), v)
                        | ~fx_eq_f64(v, v);
    return !fx_any_f64(bad);
}

/* log(x) for 0 <= x <= 1, clamped at -100 as torch does (e^-100 is about
   3.7e-44: smaller x, zero included, give -100). */
FX_INLINE fx_vf64 NM(log_clamped)(fx_vf64 x)
{
    const fx_vi64 tiny = fx_lt_f64(x, fx_splat_f64(3.720075976020836e-44));
    const fx_vf64 l = fx_log_pos_f64(fx_sel_f64(tiny, fx_splat_f64(1.0), x));
    return fx_sel_f64(tiny, fx_splat_f64(-100.0), l);
}

/* Eight elements of binary cross entropy from probabilities p in [0, 1],
   in double: the scalar loop's formulas, with the project's log
   (logm.h). log1p(-p): for p <= 1/2, u = 1 - p rounded and
   log1p(-p) = log(u) + ((-p) - (u - 1)) / u, which restores what the
   rounding of u lost (u is never below 1/2); for p > 1/2, 1 - p is exact.
   With g, the gradient (before grad_output) goes there. */
FX_INLINE fx_vf64 NM(bce_probs_8)(const T *pp, const T *tp, const T *wp, const T *pwp, fx_vf64 *g,
                                  double gs)
{
    const fx_vf64 one = fx_splat_f64(1.0);
    const fx_vf64 pc = NM(load8)(pp), tc = NM(load8)(tp);
    const fx_vf64 wc = wp ? NM(load8)(wp) : one, pwc = pwp ? NM(load8)(pwp) : one;
    const fx_vf64 lp = NM(log_clamped)(pc);
    const fx_vf64 u = one - pc;
    const fx_vi64 low = fx_lt_f64(pc, fx_splat_f64(0.5)) | fx_eq_f64(pc, fx_splat_f64(0.5));
    const fx_vf64 lu = NM(log_clamped)(u);
    const fx_vf64 corr = fx_sel_f64(low, (-pc - (u - one)) / u, fx_splat_f64(0.0));
    const fx_vf64 l1p = lu + corr;
    const fx_vf64 l = -wc * (pwc * tc * lp + (one - tc) * l1p);
    if (g) {
        const double eps = (double)1e-12f;
        const fx_vf64 lw = one + (pwc - one) * tc;
        const fx_vf64 den = pc * (one - pc);
        const fx_vf64 dm = fx_sel_f64(fx_lt_f64(den, fx_splat_f64(eps)), fx_splat_f64(eps), den);
        *g = fx_splat_f64(gs) * wc * (lw * pc - pwc * tc) / dm;
    }
    return l;
}
#endif

static void KFN(bce_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const double eps = (double)1e-12f;
    for (int64_t r = r0; r < r1; r++) {
        const XT *p = (const XT *)job->x + r * job->x_ld;
        FX_BCE_ROW(job, r);
        const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
        double total = 0.0;
        int64_t c = 0;
#if !X16
        fx_acc_f64 vtot = fx_acc_init_f64(fx_splat_f64(0.0));
        for (; c + 8 <= n; c += 8) {
            /* A block with a probability outside [0, 1] (or NaN) ends the
               vector loop: the rest of the row takes the C library. */
            if (!NM(bce_probs_covered)(p + c)) break;
            fx_vf64 g;
            const fx_vf64 l = NM(bce_probs_8)(p + c, t + c, w ? w + c : NULL, pw ? pw + c : NULL,
                                              out ? &g : NULL, gs);
            vtot = fx_acc_add_f64(vtot, l);
            if (lo) {
                const NM(t8) lt = __builtin_convertvector(l, NM(t8));
                memcpy(lo + c, &lt, sizeof lt);
            }
            if (out) {
                if (go) g = g * NM(load8)(go + c);
                const NM(t8) gt = __builtin_convertvector(g, NM(t8));
                memcpy(out + c, &gt, sizeof gt);
            }
        }
        total = fx_hsum_f64(fx_acc_get_f64(vtot));
#endif
        for (; c < n; c++) {
            const double pc = XGET(p, c), tc = t[c];
            const double wc = w ? (double)w[c] : 1.0, pwc = pw ? (double)pw[c] : 1.0;
            /* Clamped at -100 like torch; a NaN probability stays NaN (fmax
               would drop it). */
            double lp = log(pc), l1p = log1p(-pc);
            if (lp < -100.0) lp = -100.0;
            if (l1p < -100.0) l1p = -100.0;
            const double l = -wc * (pwc * tc * lp + (1.0 - tc) * l1p);
            total += l;
            if (lo) lo[c] = (T)l;
            if (out) {
                const double lw = 1.0 + (pwc - 1.0) * tc;
                const double g = gs * wc * (lw * pc - pwc * tc) / fmax(pc * (1.0 - pc), eps);
                XSET(out, c, (T)(go ? g * (double)go[c] : g));
            }
        }
        job->row_out[r] = total;
    }
}

#undef FX_BCE_ROW
