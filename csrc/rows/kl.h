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
   in a fixed order, so the bits do not depend on the ISA. pf: whether the
   target is prefetched (a one-pass row's, below). */
FX_INLINE double NM(kl_target_terms)(int kind, const XT *z, const T *t, int64_t n, T inv_t, T ma,
                                     int pf, double *acc_out)
{
    const fx_vf64 zero = fx_splat_f64(0.0);
    fx_acc_f64 vacc = fx_acc_init_f64(zero), vps = vacc;
    double acc = 0.0, psum = 0.0;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        /* After a one-pass row's statistics the target comes from memory
           here: PF_AHEAD bytes ahead into L1 (stats.h's one-pass
           distance), on into the next row. Without it the 4096 x 32000
           rows took 1.07-1.10x the two-pass time. */
        if (pf && ((c * (int64_t)sizeof(T)) & 63) == 0)
            __builtin_prefetch((const char *)(t + c) + PF_AHEAD, 0, 3);
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

/* One vector's terms: the student's exp(za) into va and, with a teacher,
   exp(zb) into vb and the cross term eb (zb - za) into vu (0 where eb is:
   0 log 0 = 0, also against a -inf za). */
FX_INLINE void NM(kl_add)(V za, V zb, int teacher, ACC *va, ACC *vb, ACC *vu)
{
    const V zero = SPLAT(0);
    *va = AADD(*va, EXPM(za));
    if (teacher) {
        const V eb = EXPM(zb);
        *vb = AADD(*vb, eb);
        *vu = AADD(*vu, SEL(SFX(fx_eq)(eb, zero), zero, eb * (zb - za)));
    }
}

/* ------------------------------------------------------------------------
 * One pass over memory for rows longer than PAIR_BYTES: the student's and,
 * with a logits target (the distillation case), the teacher's sums and the
 * cross term
 *   sa = sum exp(za),  sb = sum exp(zb),  u = sum eb (zb - za)
 * with za = z / T - ba, zb = t / T - bb against each row's running max.
 * Every block of CHUNK elements is read from memory once, for its max, and
 * its sums are then formed from L1 (the online-softmax rule: one scalar
 * rescale when a block raises a base). A raise of ba by d shifts every
 * term's zb - za by +d (u += d sb); a raise of bb by d scales the terms by
 * f = exp(-d) and shifts them by -d (u = f (u - d sb)). Every term is at
 * most 1, as in the two-pass form, so u keeps its accuracy.
 * The loops carry no vector across a branch: on AVX2, whose registers hold
 * half a 64-byte vector, GCC keeps such a vector in memory, and a base
 * raised lazily inside the loop (group_lse_q's scheme) ran 1.3-1.7x the
 * two-pass time there on store-forwarding stalls. The block size and order
 * are fixed, so the bits depend on neither the thread count nor the ISA.
 * ---------------------------------------------------------------------- */

/* A row's running bases and sums. */
typedef struct {
    T ba, bb;
    double sa, sb, u;
} NM(kl_sums);

/* Block [c0, c1) of student row z and, with teacher (a constant at every
   call, so that the loops have no test of it), teacher row t into *s;
   without, the student's (ba, sa) alone, for the probability targets. */
FX_INLINE void NM(kl_block)(const XT *z, const T *t, int teacher, int64_t c0, int64_t c1, V vinv,
                            T inv_t, NM(kl_sums) *s)
{
    const V zero = SPLAT(0);
    ACC ma = AINIT(NM(lse_floor)()), mb = ma;
    FX_LANES(i, c0, c1, k, {
        if (k == VL) {
            /* Both rows PF_AHEAD bytes on into L1 (stats.h's ahead), past
               the row's end into the next one; the teacher's row is T, not
               XT, so prefetch_l1 covers the student's alone. */
            NM(prefetch_l1)((const char *)z + PF_AHEAD, i);
            for (int o = 0; teacher && o < VL * (int)sizeof(T); o += 64)
                __builtin_prefetch((const char *)(t + i) + PF_AHEAD + o, 0, 3);
        }
        ma = AMAX(ma, k == VL ? XLOAD(z + i) : XLOAD_TAIL(z + i, k, -INFINITY));
        if (teacher) mb = AMAX(mb, k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY));
    });
    /* max(x) / T is max(x / T): rounding is monotone and T > 0. NaN never
       raises (AMAX skips it); +inf makes a base +inf, whose row the caller
       sends to kl_row_scalar. The floor keeps an all -inf prefix's terms at
       exp(-inf) = 0, not NaN. */
    const T na = HMAX(AGET(ma)) * inv_t, nb = teacher ? HMAX(AGET(mb)) * inv_t : s->bb;
    if (na > s->ba) {
        const double d = (double)na - (double)s->ba;
        s->u += d * s->sb;
        s->sa *= exp(-d);
        s->ba = na;
    }
    if (nb > s->bb) {
        const double d = (double)nb - (double)s->bb, f = exp(-d);
        /* f = 0: nothing of the old terms is left, and d sb could overflow
           on the way to 0 x inf. */
        s->u = f == 0 ? 0.0 : (s->u - d * s->sb) * f;
        s->sb = f == 0 ? 0.0 : s->sb * f;
        s->bb = nb;
    }
    const V vba = SPLAT(s->ba), vbb = SPLAT(s->bb);
    ACC va = AINIT(zero), vb = va, vu = va;
    FX_LANES(i, c0, c1, k, {
        const V za = (k == VL ? XLOAD(z + i) : XLOAD_TAIL(z + i, k, -INFINITY)) * vinv - vba;
        const V zb = !teacher ? za
            : (k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vbb;
        NM(kl_add)(za, zb, teacher, &va, &vb, &vu);
    });
    s->sa += HSUM(AGET(va));
    if (teacher) {
        s->sb += HSUM(AGET(vb));
        s->u += HSUM(AGET(vu));
    }
}

/* The gradient row ea k1 - p k2, with ea = exp(z / T - ma) (vma) and a
   logits target's p = exp(t / T - mb) (vmb): k1 = gs T psum / sa and
   k2 = gs T / sb (1 for probabilities) give gs T (Q psum - P) (the callers' k1, k2).
   The callers pass the vectors they hold: taking the scalars and forming
   them here, the two-pass gradients of 32768 x 128 took 1.05x the time. */
FX_INLINE void NM(kl_write)(int kind, const XT *z, const T *t, XT *out, int64_t n, V vinv, V vma,
                            V vmb, V k1, V k2)
{
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

/* Rows longer than PAIR_BYTES in one pass (kl_block): a logits target's
   sums and cross term, or the student's sums alone before a probability
   target's terms (kl_target_terms, which reads the student's row again
   from cache, as the gradient does). Called out of line, one copy per kind
   (below): inlined beside the two-pass rows, it changed how GCC allocated
   their loops, and 32768 x 128 gradients took 1.04-1.09x the time
   (AVX-512). */
FX_INLINE void NM(kl_rows1)(const fx_job *job, int kind, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const double Tt = job->temperature;
    const T inv_t = (T)(1.0 / Tt);
    const V vinv = SPLAT(inv_t);
    const T floor = NM(lse_floor)()[0];
    for (int64_t r = r0; r < r1; r++) {
        const XT *z = (const XT *)job->x + r * job->x_ld;
        const T *t = (const T *)job->t + r * job->t_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        const double gs = out ? job->gscale[r * job->gscale_step] : 0.0;
        NM(kl_sums) st = {floor, kind == FX_KL_LOGITS ? floor : (T)0, 0.0,
                          kind == FX_KL_LOGITS ? 0.0 : 1.0, 0.0};
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
            if (kind == FX_KL_LOGITS) NM(kl_block)(z, t, 1, c0, c1, vinv, inv_t, &st);
            else NM(kl_block)(z, t, 0, c0, c1, vinv, inv_t, &st);
        }
        const double SA = st.sa, SB = st.sb, U = st.u;
        /* A row with a non-finite base or sum (+inf, NaN, all -inf): the
           scalar form's IEEE rules. U may be +inf (mass where the student
           has none). */
        if (!(isfinite(st.ba) && isfinite(st.bb) && SA > 0 && SA < INFINITY && SB > 0 && SB < INFINITY)
            || isnan(U)) {
            NM(kl_row_scalar)(job, kind, z, t, out, gs, &job->row_out[r]);
            continue;
        }
        double loss, psum = 1.0;
        if (kind == FX_KL_LOGITS) {
            loss = U / SB - log(SB) + log(SA);
        } else {
            /* The terms against the student's base for the max: exact
               for any base, as the loss is. */
            double acc;
            psum = NM(kl_target_terms)(kind, z, t, n, inv_t, st.ba, 1, &acc);
            loss = acc + psum * log(SA);
        }
        job->row_out[r] = Tt * Tt * loss;
        if (!out) continue;
        const V k1 = SPLAT((T)(gs * Tt * psum / SA));
        const V k2 = SPLAT((T)(gs * Tt / (kind == FX_KL_LOGITS ? SB : 1.0)));
        NM(kl_write)(kind, z, t, out, n, vinv, SPLAT(st.ba), SPLAT(st.bb), k1, k2);
    }
}

/* Rows of up to PAIR_BYTES: each row's max, then its sums from L1. */
FX_INLINE void NM(kl_rows2)(const fx_job *job, int kind, int64_t r0, int64_t r1)
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
                const V zb = kind != FX_KL_LOGITS ? za
                    : (k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, -INFINITY)) * vinv - vmb;
                NM(kl_add)(za, zb, kind == FX_KL_LOGITS, &va, &vb, &vu);
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
            psum = NM(kl_target_terms)(kind, z, t, n, inv_t, ma, 0, &acc);
            loss = acc + psum * log(sa);
        }
        job->row_out[r] = Tt * Tt * loss;
        if (!out) continue;
        const V k1 = SPLAT((T)(gs * Tt * psum / sa));
        const V k2 = SPLAT((T)(gs * Tt / (kind == FX_KL_LOGITS ? sb : 1.0)));
        NM(kl_write)(kind, z, t, out, n, vinv, vma, vmb, k1, k2);
    }
}

/* One copy of the one-pass rows per kind, each with its kind a constant
   (a kind tested inside the loops cost AVX2 1.2-1.5x the time). */
static __attribute__((noinline)) void NM(kl_rows1_logits)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(kl_rows1)(job, FX_KL_LOGITS, r0, r1);
}
static __attribute__((noinline)) void NM(kl_rows1_probs)(const fx_job *job, int64_t r0, int64_t r1)
{
    NM(kl_rows1)(job, FX_KL_PROBS, r0, r1);
}
static __attribute__((noinline)) void NM(kl_rows1_log_probs)(const fx_job *job, int64_t r0,
                                                             int64_t r1)
{
    NM(kl_rows1)(job, FX_KL_LOG_PROBS, r0, r1);
}

FX_INLINE void NM(kl_rows)(const fx_job *job, int kind, int64_t r0, int64_t r1)
{
    if (!NM(one_pass)(job->n_cols)) NM(kl_rows2)(job, kind, r0, r1);
    else if (kind == FX_KL_LOGITS) NM(kl_rows1_logits)(job, r0, r1);
    else if (kind == FX_KL_PROBS) NM(kl_rows1_probs)(job, r0, r1);
    else NM(kl_rows1_log_probs)(job, r0, r1);
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
