/*
 * rows/ce_opts.h - cross entropy from logits with the language-model
 * options: soft-capping, z-loss and the row statistics, the whole family.
 *
 * FX_CE_OPTS_HARD (ce_opts_hard), FX_CE_OPTS_SOFT (ce_opts_soft)
 *   IN   x[n_rows, n_cols] (x_ld)      logits
 *        labels[n_rows], ignore_index  (hard) or t[n_rows, n_cols] (t_ld, T)
 *                                      target probabilities (soft)
 *        w[n_cols] or NULL, w_sum, smoothing   as FX_CE_HARD / FX_CE_SOFT
 *        softcap                       > 0: the logits become
 *                                      z = softcap tanh(x / softcap); 0: z = x
 *        z_loss                        >= 0
 *        gscale[r * gscale_step],      (with out) per-row factors of the
 *        zscale[r]                     gradient of the cross entropy part
 *                                      and of the z-loss part
 *   OUT  row_out[n_rows]               the cross entropy part of z (class-
 *                                      weighted, smoothed; 0 at ignored rows)
 *        lse_out[n_rows] or NULL       log-sum-exp of z, every row (double)
 *        argmax_out[n_rows] or NULL    the index of the largest x, the lowest
 *                                      on ties, the first NaN if any (NumPy)
 *        out[n_rows, n_cols] (out_ld) or NULL: the gradient; may equal x
 *
 * The z-loss itself, z_loss lse^2 per counted row, is formed by the caller
 * from lse_out; its gradient enters here:
 *   grad_c = [ gs (p_c A - coef_c) + B p_c ] dz_c
 *   p_c = exp(z_c - m) / s,  B = 2 z_loss zscale lse (0 at ignored rows),
 *   dz_c = 1 - tanh(x_c / softcap)^2 (1 without soft-capping)
 * with coef and A those of rows/ce.h: hard labels coef_c = eps/C w_c +
 * (1-eps) w_y [c == y], A = (1-eps) w_y + eps/C W; soft labels coef_c =
 * w_c ((1-eps) t_c + eps/C), A = sum_c coef_c.
 *
 * Counted hard-label rows without soft-capping or the argmax (the z-loss
 * alone, smoothing without class weights) take cross entropy's one pass
 * (opts_row1); the gradient in place (out = x) keeps the visits below.
 * The visits to a row are those of rows/ce.h: the max of x (z's max is the
 * capped max of x: tanh is monotone); the chunked sums of exp(z - m), with
 * the argmax and the label's sums on the way, keeping exp(z - m) in out
 * (float32/float64) for the gradient pass; the gradient. tanh is the vector
 * kernel of simd/tanhm.h, evaluated again in the gradient pass rather than
 * kept (the polynomial of the common small |x / softcap| is cheaper than a
 * second exp); in place under soft-capping nothing is kept (x is still
 * needed) and the gradient pass recomputes both, with the same bits. Sums
 * run lanewise in T within chunks of CHUNK elements and in double across
 * chunks, in a fixed order: the same bits for every ISA and thread count.
 */

#ifndef FX_CE_OPTS_ONCE
#define FX_CE_OPTS_ONCE
/* The scalars of a hard-label row from its sums (double throughout). */
typedef struct fx_opts_row {
    double loss, k1, k2, gy;
} fx_opts_row;

/* zy: the label's (capped) logit; dzy its dz; exy = exp(zy - m); B the
   z-loss factor. As rows/ce.h's fx_ce_hard_row, plus B p_c. */
static inline fx_opts_row fx_opts_hard_row(double zy, double wy, double m, double s, double d,
                                           double eps, int64_t n, double W, double gs,
                                           double B, double dzy, int grad)
{
    const double ec = eps / (double)n, c1 = (1.0 - eps) * wy, logs = log(s);
    fx_opts_row o = {0.0, 0.0, 0.0, 0.0};
    o.loss = (c1 == 0 && zy == -INFINITY && !isnan(s)) ? 0.0 : c1 * (logs - (zy - m));
    if (eps > 0) o.loss += ec * (W * logs - d);
    if (grad) {
        const double A = c1 + ec * W, exy = exp(zy - m);
        o.k1 = (gs * A + B) / s;
        o.k2 = gs * ec;
        o.gy = (gs * (exy / s * A - c1 - ec * wy) + B * exy / s) * dzy;
    }
    return o;
}
#endif

/* Lanes of x as z: x itself, or softcap tanh(x / softcap) with *th the tanh. */
FX_INLINE V NM(opts_z)(V xv, int cap, V vinv, V vcap, V *th)
{
    if (!cap) return xv;
    *th = SFX(fx_tanh)(xv * vinv);
    return *th * vcap;
}

/* The first k lanes set. */
FX_INLINE VI NM(opts_head)(int64_t k)
{
    VI h;
    for (int j = 0; j < VL; j++) h[j] = j < k ? -1 : 0;
    return h;
}

/* The first c in [c0, c1) with x_c == v, or c0. */
FX_INLINE int64_t NM(opts_first_eq)(const XT *x, int64_t c0, int64_t c1, V v)
{
    for (int64_t i = c0; i < c1; i += VL) {
        const int64_t k = c1 - i < VL ? c1 - i : VL;
        const VI eq = SFX(fx_eq)(k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, NAN), v);
        if (SFX(fx_any)(eq))
            for (int j = 0; j < VL; j++)
                if (eq[j]) return i + j;
    }
    return c0;
}

/* The sums of a row for a finite max m of z (xm that of x):
     return  s = sum_c exp(z_c - m)      (st != NULL: st_c = exp(z_c - m))
     *a = sum_c w_c t_c (z_c - m),  *b = sum_c w_c t_c       (soft only)
     *d = sum_c w_c (z_c - m)                                (smooth only)
     *am = the first c with x_c == xm                        (am != NULL)
   st may be x itself (each element is read before it is written). cap and
   st are constants at every call, so each use compiles to its own loop. */
FX_INLINE double NM(opts_sums)(const XT *x, const T *t, const T *w, int64_t n, T m, T xm,
                               int cap, V vinv, V vcap, int soft, int smooth, T *st,
                               int64_t *am, double *a, double *b, double *d, const char *pf)
{
    const V vm = SPLAT(m), vxm = SPLAT(xm), zero = SPLAT(0);
    double s = 0.0, aa = 0.0, bb = 0.0, dd = 0.0;
    int64_t found = am ? -1 : 0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = NM(chunk_end)(c0, n);
        ACC vs = AINIT(zero), va = vs, vb = vs, vd = vs;
        FX_LANES(i, c0, c1, k, {
            if (pf) NM(prefetch)(pf, i);
            const V xv = k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY);
            V th = zero;
            const V z = NM(opts_z)(xv, cap, vinv, vcap, &th);
            V e = EXPM(z - vm);
            /* padding lanes: z = -softcap under soft-capping */
            if (cap && k < VL) e = SEL(NM(opts_head)(k), e, zero);
            vs = AADD(vs, e);
            /* before st, which may be x, is written */
            if (found < 0) {
                const VI eq = SFX(fx_eq)(xv, vxm);
                if (SFX(fx_any)(eq))
                    for (int j = 0; j < VL; j++)
                        if (eq[j]) {
                            found = i + j;
                            break;
                        }
            }
            if (soft || smooth) {
                const V wv = NM(wload)(w, i, k), zm = z - vm;
                vd = AADD(vd, SEL(SFX(fx_eq)(wv, zero), zero, wv * zm));
                if (soft) {
                    const V wt = wv * (k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0));
                    va = AADD(va, SEL(SFX(fx_eq)(wt, zero), zero, wt * zm));
                    vb = AADD(vb, wt);
                }
            }
            if (st) {
                if (k == VL) STORE(st + i, e);
                else STORE_TAIL(st + i, e, k);
            }
        });
        s += HSUM(AGET(vs));
        aa += HSUM(AGET(va));
        bb += HSUM(AGET(vb));
        dd += HSUM(AGET(vd));
    }
    if (am) *am = found;
    *a = aa;
    *b = bb;
    *d = dd;
    return s;
}

/* The gradient of a row: out_c = (e_c k1 - k2 w_c) dz_c (hard labels; the
   label's entry is the caller's) or (e_c k1 - w_c (t_c k2 + k3)) dz_c
   (soft), e_c = exp(z_c - m) from out (stashed) or computed. */
FX_INLINE void NM(opts_grad)(const XT *x, const T *t, XT *out, const T *w, int64_t n, T m,
                             int cap, V vinv, V vcap, int soft, int stashed, T k1, T k2, T k3)
{
    const V vm = SPLAT(m), v1 = SPLAT(k1), v2 = SPLAT(k2), v3 = SPLAT(k3), one = SPLAT(1);
    FX_LANES(i, 0, n, k, {
        V e = one, th = one;
        if (!stashed || cap) {
            const V xv = k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY);
            const V z = NM(opts_z)(xv, cap, vinv, vcap, &th);
            if (!stashed) e = EXPM(z - vm);
        }
#if !X16
        if (stashed) e = k == VL ? LOAD(out + i) : LOAD_TAIL(out + i, k, 0);
#endif
        V g;
        if (soft) {
            const V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
            g = e * v1 - NM(wload)(w, i, k) * (tv * v2 + v3);
        } else if (w) {
            g = e * v1 - v2 * (k == VL ? LOAD(w + i) : LOAD_TAIL(w + i, k, 0));
        } else {
            g = e * v1 - v2;
        }
        if (cap) g = g * (one - th * th);
        if (k == VL) XSTORE(out + i, g);
        else XSTORE_TAIL(out + i, g, k);
    });
}

/* The first NaN of a row, or -1. */
FX_INLINE int64_t NM(opts_first_nan)(const XT *x, int64_t n)
{
    for (int64_t c = 0; c < n; c++)
        if (isnan((double)XGET(x, c))) return c;
    return -1;
}

/* A counted hard-label row without soft-capping or the argmax, and
   without class weights if smoothed: cross entropy's sums, so its one pass
   (stats.h: row_lse1, row_lse1_qd; lse = b + log s for the base b). With
   out (float32/float64, out != x) the exponentials are kept there and
   group_write scales them. Returns 0, having written nothing the caller's
   two passes do not rewrite, for a row without a softmax: x is intact. */
FX_INLINE int NM(opts_row1)(const fx_job *job, int64_t r, int64_t r1, const XT *x, XT *out,
                            int64_t y, T xy, const T *w, double eps, double W)
{
    const int64_t n = job->n_cols;
    const char *pf = NM(ahead)(job, r, r1);
    T m, bases[FX_LSE_MAX_GROUPS];
    T *st = NULL;
#if !X16
    st = (T *)out;
#endif
    double s, d = 0.0;
    int ok;
    if (eps > 0) {
        if (st) ok = NM(row_lse1_qd)(x, n, &m, &s, st, bases, pf, NULL, &d);
        else ok = NM(row_lse1_qd)(x, n, &m, &s, NULL, NULL, pf, NULL, &d);
    } else {
        if (st) ok = NM(row_lse1)(x, n, &m, &s, st, bases, pf);
        else ok = NM(row_lse1)(x, n, &m, &s, NULL, NULL, pf);
    }
    if (!ok) return 0;
    const double lse = (double)m + log(s);
    if (job->lse_out) job->lse_out[r] = lse;
    const double gs = st ? job->gscale[r * job->gscale_step] : 0.0;
    const double B = st && job->z_loss > 0 ? 2.0 * job->z_loss * job->zscale[r] * lse : 0.0;
    const fx_opts_row o = fx_opts_hard_row((double)xy, w ? (double)w[y] : 1.0, (double)m, s, d,
                                           eps, n, W, gs, B, 1.0, st != NULL);
    job->row_out[r] = o.loss;
    if (!st) return 1;
    NM(group_write)(x, out, w, n, m, bases, o.k1, o.k2, st);
    XSET(out, y, (T)o.gy);
    return 1;
}

/* One row. A row whose max is +inf, or whose entries are all -inf or NaN,
   has no softmax without soft-capping (rows/stats.h): its loss and
   gradient are NaN (0 if ignored), its lse the max (NaN with a NaN). */
FX_INLINE void NM(opts_row)(const fx_job *job, int soft, int64_t r, int64_t r1, const T *w,
                            double eps, double W, int cap, V vinv, V vcap)
{
    const int64_t n = job->n_cols;
    const XT *x = (const XT *)job->x + r * job->x_ld;
    const T *t = soft ? (const T *)job->t + r * job->t_ld : NULL;
    XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
    const int64_t y = soft ? 0 : job->labels[r];
    const int counted = soft || y != job->ignore_index;
    const int stats = job->lse_out || job->argmax_out;
    if (!counted) job->row_out[r] = 0.0;
    if (!counted && !stats) {
        if (out) NM(row_zero)(out, n);
        return;
    }
    /* Read before out (which may be x) is written. */
    const T xy = soft || !counted ? 0 : XGET(x, y);
    if (!cap && !soft && counted && !job->argmax_out && (!(eps > 0) || !w)
        && (out ? !X16 && (const void *)out != (const void *)x && NM(one_pass_out)(n)
                : NM(one_pass)(n))
        && NM(opts_row1)(job, r, r1, x, out, y, xy, w, eps, W))
        return;
    V thy = SPLAT(0);
    const T zy = soft || !counted ? 0 : NM(opts_z)(SPLAT(xy), cap, vinv, vcap, &thy)[0];
    const T xm = NM(row_max)(x, n);
    V thm = SPLAT(0);
    const T m = cap ? NM(opts_z)(SPLAT(xm), cap, vinv, vcap, &thm)[0] : xm;
    int64_t am = 0;
    if (!isfinite(m)) {
        if (job->lse_out) job->lse_out[r] = NM(opts_first_nan)(x, n) >= 0 ? NAN : (double)m;
        if (job->argmax_out) {
            am = NM(opts_first_nan)(x, n);
            job->argmax_out[r] = am >= 0 ? am : NM(opts_first_eq)(x, 0, n, SPLAT(xm));
        }
        if (counted) job->row_out[r] = NAN;
        if (out) {
            for (int64_t c = 0; c < n; c++) XSET(out, c, counted ? (T)NAN : (T)0);
        }
        return;
    }
    /* exp(z - m) kept in out for the gradient pass, unless x is still
       needed there (soft-capping in place) or out is 16-bit. */
    T *stash = NULL;
#if !X16
    if (out && counted && !(cap && (const void *)out == (const void *)x)) stash = out;
#endif
    double a = 0.0, b = 0.0, d = 0.0;
    int64_t *pam = job->argmax_out ? &am : NULL;
    const char *pf = NM(next_row)(job, r, r1);
    const int smooth = eps > 0;
    double s;
    if (cap) {
        if (stash) s = NM(opts_sums)(x, t, w, n, m, xm, 1, vinv, vcap, soft, smooth, stash, pam, &a, &b, &d, pf);
        else s = NM(opts_sums)(x, t, w, n, m, xm, 1, vinv, vcap, soft, smooth, NULL, pam, &a, &b, &d, pf);
    } else {
        if (stash) s = NM(opts_sums)(x, t, w, n, m, xm, 0, vinv, vcap, soft, smooth, stash, pam, &a, &b, &d, pf);
        else s = NM(opts_sums)(x, t, w, n, m, xm, 0, vinv, vcap, soft, smooth, NULL, pam, &a, &b, &d, pf);
    }
    const double lse = (double)m + log(s);
    if (job->lse_out) job->lse_out[r] = lse;
    if (job->argmax_out) {
        /* A NaN makes s NaN; out, if it kept exp(x - m) in place of x,
           holds NaN exactly where x did. */
        const int64_t nan_at = isnan(s) ? NM(opts_first_nan)(stash && (const void *)stash == (const void *)x ? (const XT *)stash : x, n) : -1;
        job->argmax_out[r] = nan_at >= 0 ? nan_at : am;
    }
    if (!counted) {
        if (out) NM(row_zero)(out, n);
        return;
    }
    const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
    const double B = out && job->z_loss > 0 ? 2.0 * job->z_loss * job->zscale[r] * lse : 0.0;
    T k1 = 0, k2 = 0, k3 = 0;
    fx_opts_row o = {0.0, 0.0, 0.0, 0.0};
    if (soft) {
        const double ec = eps / (double)n, Bp = (1.0 - eps) * b + ec * W;
        double Ap = eps < 1 ? (1.0 - eps) * a : 0.0;
        if (eps > 0) Ap += ec * d;
        job->row_out[r] = Bp * log(s) - Ap;
        k1 = (T)((gs * Bp + B) / s);
        k2 = (T)(gs * (1.0 - eps));
        k3 = (T)(gs * ec);
    } else {
        const double dzy = cap ? 1.0 - (double)thy[0] * (double)thy[0] : 1.0;
        o = fx_opts_hard_row((double)zy, w ? (double)w[y] : 1.0, (double)m, s, d, eps, n, W, gs,
                             B, dzy, out != NULL);
        job->row_out[r] = o.loss;
        k1 = (T)o.k1;
        k2 = (T)o.k2;
    }
    if (!out) return;
    if (cap) {
        if (stash) NM(opts_grad)(x, t, out, w, n, m, 1, vinv, vcap, soft, 1, k1, k2, k3);
        else NM(opts_grad)(x, t, out, w, n, m, 1, vinv, vcap, soft, 0, k1, k2, k3);
    } else {
        if (stash) NM(opts_grad)(x, t, out, w, n, m, 0, vinv, vcap, soft, 1, k1, k2, k3);
        else NM(opts_grad)(x, t, out, w, n, m, 0, vinv, vcap, soft, 0, k1, k2, k3);
    }
    if (!soft) XSET(out, y, (T)o.gy);
}

FX_INLINE void NM(opts_rows)(const fx_job *job, int soft, int64_t r0, int64_t r1)
{
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, W = job->w_sum;
    const int cap = job->softcap > 0;
    const V vinv = SPLAT(cap ? (T)(1.0 / job->softcap) : (T)1);
    const V vcap = SPLAT(cap ? (T)job->softcap : (T)1);
    for (int64_t r = r0; r < r1; r++) NM(opts_row)(job, soft, r, r1, w, eps, W, cap, vinv, vcap);
}

static void KFN(ce_opts_hard)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(opts_rows)(job, 0, r0, r1);
}

static void KFN(ce_opts_soft)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(opts_rows)(job, 1, r0, r1);
}

#if !X16
/* The tanh kernel over n values, for its accuracy tests. */
static void KFN(tanh_array)(const XT *x, T *y, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) STORE(y + i, SFX(fx_tanh)(XLOAD(x + i)));
    if (i < n) STORE_TAIL(y + i, SFX(fx_tanh)(XLOAD_TAIL(x + i, n - i, 0)), n - i);
}
#endif
