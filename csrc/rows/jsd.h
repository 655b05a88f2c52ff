/*
 * rows/jsd.h - Liger-Kernel's generalised Jensen-Shannon divergence, the
 * whole family.
 *
 * FX_JSD_PROBS, FX_JSD_LOG_PROBS, FX_JSD_LOGITS (jsd_probs, jsd_log_probs,
 * jsd_logits: one row kernel, jsd_rows, with the teacher's kind and the
 * beta case as parameters)
 *   IN   x[n_rows, n_cols] (x_ld)     the student's logits
 *        t[n_rows, n_cols] (t_ld, T)  the teacher: probabilities P,
 *                                     log-probabilities log P, or logits
 *                                     (P = softmax(t / T))
 *        labels[n_rows] or NULL       a row whose label is ignore_index
 *        ignore_index                 counts nothing (loss 0, gradient 0)
 *        beta                         in [0, 1]
 *        temperature                  T > 0
 *        gscale[r * gscale_step]      per-row gradient scale (with out)
 *   OUT  row_out[n_rows]              T^2 times the row's divergence (double)
 *        out[n_rows, n_cols] (out_ld) or NULL: the gradient; may equal x
 *
 * With X = log Q = log_softmax(x / T), Y = log P and M = beta Q + (1-beta) P,
 * a row's divergence and its gradient with respect to X (Liger's dX) are
 *   beta = 0:  sum P (Y - X)                                dX = -P
 *   beta = 1:  sum Q (X - Y)                                dX = Q (X - Y) + Q
 *   else:      sum beta Q (X - log M) + (1-beta) P (Y - log M)
 *                                                           dX = beta Q (X - log M)
 * (terms of probability 0 count 0), and through the log-softmax
 *   d(loss)/dx = gs T (dX - Q sum(dX)).
 * Visits: the maxima of x (and of t for teacher logits); the sums of
 * exponentials, keeping exp(x/T - max) in out for the next visit; the
 * divergence and sum(dX), keeping dX there for the last (float32/float64
 * gradients, not in place); the gradient. Every element's arithmetic is
 * lanewise in T with the vector exp (simd/expm.h) and log (simd/logm.h):
 * Q = exp(x/T - max) / s; log M of the vector log (M below the smallest
 * normal taken at it: its terms are below any rounding of the sums); log P
 * of probabilities and P of log-probabilities by the vector kernels, a
 * vector with a lane outside their domain element by element through the C
 * library. Sums in T within chunks, in double across them, in a fixed
 * order: the same bits for every ISA and thread count.
 */

#ifndef FX_JSD_ONCE
#define FX_JSD_ONCE
/* The beta case: the two limits have their own formulas. */
enum { FX_JSD_B0 = 0, FX_JSD_B1 = 1, FX_JSD_BMIX = 2 };
#endif

/* The divergence term of lanes (X, Q, Y, P), and *dx, their dX. */
FX_INLINE V NM(jsd_term)(int cs, V X, V q, V Y, V p, V vbeta, V vbeta1, V *dx)
{
    const V zero = SPLAT(0);
    if (cs == FX_JSD_B0) {
        *dx = zero - p;
        return SEL(SFX(fx_eq)(p, zero), zero, p * (Y - X));
    }
    const VI q0 = SFX(fx_eq)(q, zero);
    if (cs == FX_JSD_B1) {
        const V u = q * (X - Y);
        *dx = SEL(q0, zero, u + q);
        return SEL(q0, zero, u);
    }
    const V M = vbeta * q + vbeta1 * p;
    /* The floor keeps log's argument positive and normal where M
       underflows; fx_log_pos takes no NaN, and a NaN M (a NaN teacher) must
       give NaN, as the scalar path's log(M) does. */
    const V floor = SPLAT(sizeof(T) == 4 ? 0x1p-126f : 0x1p-1022);
    const V lm = SEL(SFX(fx_eq)(M, M), SFX(fx_log_pos)(VMAX(M, floor)), M);
    *dx = SEL(q0, zero, vbeta * q * (X - lm));
    return *dx + SEL(SFX(fx_eq)(p, zero), zero, vbeta1 * p * (Y - lm));
}

/* The teacher's lanes as (Y, P), from its row t at i (k lanes; padding
   lanes give P = 0, Y = -inf). lsb, vinv, vmb and inv_sb: logits only. */
FX_INLINE V NM(jsd_teacher)(int kind, const T *t, int64_t i, int64_t k, V vinv, V vmb, V lsb,
                            V inv_sb, V *p)
{
    const V zero = SPLAT(0), ninf = SPLAT(-INFINITY);
    if (kind == FX_KL_LOGITS) {
        const V zb = (k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vmb;
        *p = EXPM(zb) * inv_sb;
        return zb - lsb;
    }
    V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, kind == FX_KL_PROBS ? 0 : -INFINITY);
    if (kind == FX_KL_LOG_PROBS) {
        /* log P <= 0 (NaN fails too): exp by the vector kernel */
        if (!SFX(fx_any)(SFX(fx_lt)(zero, tv) | ~SFX(fx_eq)(tv, tv))) {
            *p = EXPM(tv);
        } else {
            *p = tv;
            for (int j = 0; j < VL; j++) (*p)[j] = (T)exp((double)tv[j]);
        }
        return tv;
    }
    /* probabilities: 0 (log -inf) or positive, normal and finite */
    const VI z0 = SFX(fx_eq)(tv, zero);
    const V ts = SEL(z0, SPLAT(1), tv);
    const VI ok = SFX(fx_lt)(ts, SPLAT(INFINITY)) & ~SFX(fx_lt)(ts, SPLAT(sizeof(T) == 4 ? 0x1p-126f : 0x1p-1022));
    *p = tv;
    if (!SFX(fx_any)(~ok)) return SEL(z0, ninf, SFX(fx_log_pos)(ts));
    V y = ninf;
    for (int j = 0; j < VL; j++) y[j] = (T)log((double)tv[j]);
    return y;
}

/* Element c of x (when x is not NULL) or of t, over T, in double. */
FX_INLINE double NM(jsd_at)(const XT *x, const T *t, int64_t c, double Tt)
{
    return (x ? (double)XGET(x, c) : (double)t[c]) / Tt;
}

/* log-sum-exp of the row of x (or t) over T in double: NaN when its max
   is not finite (inf - inf), as the reference's. */
static double NM(jsd_lse_scalar)(const XT *x, const T *t, int64_t n, double Tt)
{
    double m = -INFINITY, s = 0.0;
    for (int64_t c = 0; c < n; c++) m = fmax(m, NM(jsd_at)(x, t, c, Tt));
    for (int64_t c = 0; c < n; c++) s += exp(NM(jsd_at)(x, t, c, Tt) - m);
    return m + log(s);
}

/* Any row whose maxima are not finite: the formulas above, element by
   element in double, with IEEE rules. Rare, so plain and exact. */
static void NM(jsd_row_scalar)(const fx_job *job, int kind, const XT *x, const T *t, XT *out,
                               double gs, double *loss)
{
    const int64_t n = job->n_cols;
    const double Tt = job->temperature, beta = job->beta;
    const double lsa = NM(jsd_lse_scalar)(x, t, n, Tt);
    const double lsb = kind == FX_KL_LOGITS ? NM(jsd_lse_scalar)(NULL, t, n, Tt) : 0.0;
    double sum = 0.0, sdx = 0.0;
    for (int pass = 0; pass < (out ? 2 : 1); pass++) {
        for (int64_t c = 0; c < n; c++) {
            const double X = (double)XGET(x, c) / Tt - lsa, q = exp(X);
            double Y, p;
            if (kind == FX_KL_PROBS) { p = t[c]; Y = log(p); }
            else if (kind == FX_KL_LOG_PROBS) { Y = t[c]; p = exp(Y); }
            else { Y = (double)t[c] / Tt - lsb; p = exp(Y); }
            double term, dx;
            if (beta == 0.0) {
                term = p != 0 ? p * (Y - X) : 0.0;
                dx = -p;
            } else if (beta == 1.0) {
                term = q != 0 ? q * (X - Y) : 0.0;
                dx = q != 0 ? q * (X - Y) + q : 0.0;
            } else {
                const double M = beta * q + (1.0 - beta) * p, lm = log(M);
                dx = q != 0 ? beta * q * (X - lm) : 0.0;
                term = dx + (p != 0 ? (1.0 - beta) * p * (Y - lm) : 0.0);
            }
            if (pass == 0) {
                sum += term;
                sdx += dx;
            } else {
                XSET(out, c, (T)(gs * Tt * (dx - q * sdx)));
            }
        }
    }
    *loss = Tt * Tt * sum;
}

FX_INLINE void NM(jsd_rows)(const fx_job *job, int kind, int cs, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const double Tt = job->temperature;
    const T inv_t = (T)(1.0 / Tt);
    const V vinv = SPLAT(inv_t), zero = SPLAT(0);
    const V vbeta = SPLAT((T)job->beta), vbeta1 = SPLAT((T)(1.0 - job->beta));
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        const T *t = (const T *)job->t + r * job->t_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        if (job->labels && job->labels[r] == job->ignore_index) {
            job->row_out[r] = 0.0;
            if (out) NM(row_zero)(out, n);
            continue;
        }
        const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
        /* max(x / T) = max(x) / T: rounding is monotone. */
        const T ma = NM(row_max)(x, n) * inv_t;
#if X16
        const T mb = kind == FX_KL_LOGITS ? row_max_f32(t, n) * inv_t : 0;
#else
        const T mb = kind == FX_KL_LOGITS ? NM(row_max)(t, n) * inv_t : 0;
#endif
        if (!isfinite(ma) || !isfinite(mb)) {
            NM(jsd_row_scalar)(job, kind, x, t, out, gs, &job->row_out[r]);
            continue;
        }
        const V vma = SPLAT(ma), vmb = SPLAT(mb);
        /* out keeps exp(x/T - ma) from the sums to the divergence pass, then
           dX from there to the gradient pass (not in place: the gradient
           pass reads x; not 16-bit). */
        T *stash = NULL;
#if !X16
        if (out && (const void *)out != (const void *)x) stash = out;
#endif
        double sa = 0.0, sb = 0.0;
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t c1 = NM(chunk_end)(c0, n);
            ACC va = AINIT(zero), vb = va;
            FX_LANES(i, c0, c1, k, {
                const V ea = EXPM((k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY)) * vinv - vma);
                va = AADD(va, ea);
                if (stash) {
                    if (k == VL) STORE(stash + i, ea);
                    else STORE_TAIL(stash + i, ea, k);
                }
                if (kind == FX_KL_LOGITS)
                    vb = AADD(vb, EXPM((k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vmb));
            });
            sa += HSUM(AGET(va));
            sb += HSUM(AGET(vb));
        }
        const V lsa = SPLAT((T)log(sa)), inv_sa = SPLAT((T)(1.0 / sa));
        const V lsb = SPLAT(kind == FX_KL_LOGITS ? (T)log(sb) : 0);
        const V inv_sb = SPLAT(kind == FX_KL_LOGITS ? (T)(1.0 / sb) : 0);
        double loss = 0.0, sdx = 0.0;
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t c1 = NM(chunk_end)(c0, n);
            ACC vl = AINIT(zero), vd = vl;
            FX_LANES(i, c0, c1, k, {
                const V za = (k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY)) * vinv - vma;
                V ea;
                if (stash) ea = k == VL ? LOAD(stash + i) : LOAD_TAIL(stash + i, k, 0);
                else ea = EXPM(za);
                const V q = ea * inv_sa;
                V p, dx;
                const V Y = NM(jsd_teacher)(kind, t, i, k, vinv, vmb, lsb, inv_sb, &p);
                vl = AADD(vl, NM(jsd_term)(cs, za - lsa, q, Y, p, vbeta, vbeta1, &dx));
                vd = AADD(vd, dx);
                if (stash) {
                    if (k == VL) STORE(stash + i, dx);
                    else STORE_TAIL(stash + i, dx, k);
                }
            });
            loss += HSUM(AGET(vl));
            sdx += HSUM(AGET(vd));
        }
        job->row_out[r] = Tt * Tt * loss;
        if (!out) continue;
        const V vk = SPLAT((T)(gs * Tt)), vs = SPLAT((T)sdx);
        FX_LANES(i, 0, n, k, {
            const V za = (k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY)) * vinv - vma;
            const V q = EXPM(za) * inv_sa;
            V dx;
#if !X16
            if (stash) {
                dx = k == VL ? LOAD(stash + i) : LOAD_TAIL(stash + i, k, 0);
            } else
#endif
            {
                V p;
                const V Y = NM(jsd_teacher)(kind, t, i, k, vinv, vmb, lsb, inv_sb, &p);
                (void)NM(jsd_term)(cs, za - lsa, q, Y, p, vbeta, vbeta1, &dx);
            }
            const V g = (dx - q * vs) * vk;
            if (k == VL) XSTORE(out + i, g);
            else XSTORE_TAIL(out + i, g, k);
        });
    }
}

/* The beta case as a constant, so that each case compiles to its own loops. */
FX_INLINE void NM(jsd_kind)(const fx_job *job, int kind, int64_t r0, int64_t r1)
{
    if (job->beta == 0.0) NM(jsd_rows)(job, kind, FX_JSD_B0, r0, r1);
    else if (job->beta == 1.0) NM(jsd_rows)(job, kind, FX_JSD_B1, r0, r1);
    else NM(jsd_rows)(job, kind, FX_JSD_BMIX, r0, r1);
}

static void KFN(jsd_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(jsd_kind)(job, FX_KL_PROBS, r0, r1);
}
static void KFN(jsd_log_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(jsd_kind)(job, FX_KL_LOG_PROBS, r0, r1);
}
static void KFN(jsd_logits)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(jsd_kind)(job, FX_KL_LOGITS, r0, r1);
}
