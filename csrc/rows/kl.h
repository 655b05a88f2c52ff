/*
 * rows/kl.h - KL divergence KL(P || Q), Q = softmax(z / T), the whole family.
 *
 * FX_KL_PROBS, FX_KL_LOG_PROBS, FX_KL_LOGITS (kl_probs, kl_log_probs,
 * kl_logits: one row kernel, kl_rows, with the target kind as a parameter)
 *   IN   x[n_rows, n_cols] (x_ld)     the student's logits z
 *        t[n_rows, n_cols] (t_ld, T)  the target: probabilities P,
 *                                     log-probabilities log P, or teacher
 *                                     logits (P = softmax(t / T))
 *        temperature                  T > 0
 *        gscale[r * gscale_step]      per-row gradient scale (with out)
 *   OUT  row_out[n_rows]              T^2 KL(P || Q) per row (double)
 *        out[n_rows, n_cols] (out_ld) or NULL: the gradient; may equal x
 */

/* ------------------------------------------------------------------------
 * KL divergence KL(P || Q), Q = softmax(z / T), times T^2.
 *   loss_r = T^2 [ sum_c P_c (log P_c - za_c) + (sum_c P_c) log sa ]
 *            with za_c = z_c / T - max(z / T), sa = sum_c exp(za_c)
 *   grad_c = gs T [ Q_c sum_k P_k - P_c ]
 * Terms with P_c == 0 count 0 (0 log 0 = 0, also for a -inf log-target).
 * ---------------------------------------------------------------------- */

/* Any row whose maxima are not finite: the formulas above, element by
   element in double, with IEEE rules. Rare, so plain and exact. */
static void NM(kl_row_scalar)(const fx_job *job, int kind, const XT *z, const T *t, XT *out,
                               double gs, double *loss)
{
    const int64_t n = job->n_cols;
    const double Tt = job->temperature;
    double ma = -INFINITY, mb = -INFINITY, sa = 0.0, sb = 0.0;
    for (int64_t c = 0; c < n; c++) {
        ma = fmax(ma, (double)XGET(z, c) / Tt);
        mb = fmax(mb, (double)t[c] / Tt);
    }
    for (int64_t c = 0; c < n; c++) {
        sa += exp((double)XGET(z, c) / Tt - ma);
        sb += exp((double)t[c] / Tt - mb);
    }
    const double lsa = log(sa), lsb = log(sb);
    double acc = 0.0, psum = 0.0;
    for (int64_t c = 0; c < n; c++) {
        const double lq = (double)XGET(z, c) / Tt - ma - lsa;
        double p, lp;
        if (kind == FX_KL_PROBS) { p = t[c]; lp = log(p); }
        else if (kind == FX_KL_LOG_PROBS) { lp = t[c]; p = exp(lp); }
        else { lp = (double)t[c] / Tt - mb - lsb; p = exp(lp); }
        psum += p;
        if (p != 0) acc += p * (lp - lq);
    }
    *loss = Tt * Tt * acc;
    if (!out) return;
    for (int64_t c = 0; c < n; c++) {
        const double q = exp((double)XGET(z, c) / Tt - ma - lsa);
        double p;
        if (kind == FX_KL_PROBS) p = t[c];
        else if (kind == FX_KL_LOG_PROBS) p = exp((double)t[c]);
        else p = exp((double)t[c] / Tt - mb - lsb);
        XSET(out, c, (T)(gs * Tt * (q * psum - p)));
    }
}

/* The target's terms of a KL row with a probability (or log-probability)
   target, in double:
     return  sum_c p_c,   *acc = sum_c p_c (log p_c - za_c)  (p_c = 0: 0)
   with za_c = z_c / T - ma rounded to the compute dtype. Eight lanes at a
   time with the project's double log and exp (logm.h, expm.h: about 1 ulp);
   a block with a target they do not cover (zero is covered; subnormal,
   negative, infinite or NaN p, or log p > 0) and the row's last n % 8
   elements go through the C library, element by element. Lanes are added
   in a fixed order, so the bits do not depend on the ISA. */
FX_INLINE double NM(kl_target_terms)(int kind, const XT *z, const T *t, int64_t n, T inv_t, T ma,
                                     double *acc_out)
{
    const fx_vf64 zero = fx_splat_f64(0.0);
    fx_acc_f64 vacc = fx_acc_init_f64(zero), vps = vacc;
    double acc = 0.0, psum = 0.0;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const fx_vf64 tv = NM(load8)(t + c);
#if X16
        fx_vf64 za;
        for (int j = 0; j < 8; j++) za[j] = (double)(XGET(z, c + j) * inv_t - ma);
#else
        NM(t8) z8v;
        memcpy(&z8v, z + c, sizeof z8v);
        const fx_vf64 za = __builtin_convertvector(z8v * inv_t - ma, fx_vf64);
#endif
        fx_vf64 p, lp;
        if (kind == FX_KL_PROBS) {
            p = tv;
            fx_vf64 ps;
            if (!fx_log_domain_f64(p, &ps)) goto scalar;
            lp = fx_log_pos_f64(ps);
        } else {
            lp = tv;
            /* log p <= 0 (NaN fails too): exp(log p) by the vector kernel */
            if (fx_any_f64(fx_lt_f64(zero, lp) | ~fx_eq_f64(lp, lp))) goto scalar;
            p = fx_expm_f64(lp);
        }
        vps = fx_acc_add_f64(vps, p);
        vacc = fx_acc_add_f64(vacc, fx_sel_f64(fx_eq_f64(p, zero), zero, p * (lp - za)));
        continue;
    scalar:
        for (int j = 0; j < 8; j++) {
            double pj, lpj;
            if (kind == FX_KL_PROBS) { pj = tv[j]; lpj = log(pj); }
            else { lpj = tv[j]; pj = exp(lpj); }
            psum += pj;
            if (pj != 0) acc += pj * (lpj - za[j]);
        }
    }
    for (; c < n; c++) {
        const double za = (double)(XGET(z, c) * inv_t - ma);
        double p, lp;
        if (kind == FX_KL_PROBS) { p = t[c]; lp = log(p); }
        else { lp = t[c]; p = exp(lp); }
        psum += p;
        if (p != 0) acc += p * (lp - za);
    }
    *acc_out = fx_hsum_f64(fx_acc_get_f64(vacc)) + acc;
    return fx_hsum_f64(fx_acc_get_f64(vps)) + psum;
}

/* exp of log-probability lanes for the gradient (which is rounded to T):
   the vector kernel where every lane is <= 0, the C library otherwise. */
FX_INLINE V NM(kl_exp_target)(V lp)
{
    const V zero = SPLAT(0);
    if (!SFX(fx_any)(SFX(fx_lt)(zero, lp) | ~SFX(fx_eq)(lp, lp))) return EXPM(lp);
    for (int j = 0; j < VL; j++) lp[j] = (T)exp((double)lp[j]);
    return lp;
}

FX_INLINE void NM(kl_rows)(const fx_job *job, int kind, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const double Tt = job->temperature;
    const T inv_t = (T)(1.0 / Tt);
    const V vinv = SPLAT(inv_t), zero = SPLAT(0);
    for (int64_t r = r0; r < r1; r++) {
        const XT *z = (const XT *)job->x + r * job->x_ld;
        const T *t = (const T *)job->t + r * job->t_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
        /* max(z / T) = max(z) / T: rounding is monotone. */
        const T ma = NM(row_max)(z, n) * inv_t;
        /* The teacher's logits are in the compute dtype: the float32
           kernels' row max for 16-bit students. */
#if X16
        const T mb = kind == FX_KL_LOGITS ? row_max_f32(t, n) * inv_t : 0;
#else
        const T mb = kind == FX_KL_LOGITS ? NM(row_max)(t, n) * inv_t : 0;
#endif
        if (!isfinite(ma) || !isfinite(mb)) {
            NM(kl_row_scalar)(job, kind, z, t, out, gs, &job->row_out[r]);
            continue;
        }
        const V vma = SPLAT(ma), vmb = SPLAT(mb);
        double sa = 0.0, sb = 0.0, u = 0.0, psum = 0.0;
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t c1 = NM(chunk_end)(c0, n);
            ACC va = AINIT(zero), vb = va, vu = va;
            FX_LANES(i, c0, c1, k, {
                const V za = (k == VL ? XLOAD(z + i) : XLOAD_TAIL(z + i, k, -INFINITY)) * vinv - vma;
                va = AADD(va, EXPM(za));
                if (kind == FX_KL_LOGITS) {
                    const V zb = (k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vmb;
                    const V eb = EXPM(zb);
                    vb = AADD(vb, eb);
                    vu = AADD(vu, SEL(SFX(fx_eq)(eb, zero), zero, eb * (zb - za)));
                }
            });
            sa += HSUM(AGET(va));
            sb += HSUM(AGET(vb));
            u += HSUM(AGET(vu));
        }
        double loss;
        if (kind == FX_KL_LOGITS) {
            psum = 1.0;
            loss = u / sb - log(sb) + log(sa);
        } else {
            double acc;
            psum = NM(kl_target_terms)(kind, z, t, n, inv_t, ma, &acc);
            loss = acc + psum * log(sa);
        }
        job->row_out[r] = Tt * Tt * loss;
        if (!out) continue;
        const V k1 = SPLAT((T)(gs * Tt * psum / sa));
        const V k2 = SPLAT((T)(gs * Tt / (kind == FX_KL_LOGITS ? sb : 1.0)));
        FX_LANES(i, 0, n, k, {
            const V ea = EXPM((k == VL ? XLOAD(z + i) : XLOAD_TAIL(z + i, k, -INFINITY)) * vinv - vma);
            V p;
            if (kind == FX_KL_LOGITS) {
                p = EXPM((k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vmb);
            } else {
                p = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
                if (kind == FX_KL_LOG_PROBS) p = NM(kl_exp_target)(p);
            }
            const V g = ea * k1 - p * k2;
            if (k == VL) XSTORE(out + i, g);
            else XSTORE_TAIL(out + i, g, k);
        });
    }
}

static void KFN(kl_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(kl_rows)(job, FX_KL_PROBS, r0, r1);
}
static void KFN(kl_log_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(kl_rows)(job, FX_KL_LOG_PROBS, r0, r1);
}
static void KFN(kl_logits)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(kl_rows)(job, FX_KL_LOGITS, r0, r1);
}
