/*
 * kernels_impl.h - the row kernels, written once.
 *
 * Included by kernels_isa.h once per dtype, with
 *   T          float or double (the compute dtype)
 *   V, VI, VL  its 64-byte vector type, mask type and lane count
 *   SFX(f)     f##_f32 or f##_f64 (vec.h helpers, expm.h)
 *   KFN(f)     the kernel's name for this ISA and dtype
 * and compiled once per instruction set.
 *
 * Each row kernel reads one row of n contiguous elements; a row is visited
 * at most three times (max, sum of exponentials, write) and stays in cache
 * between visits. Nothing is allocated and no N x C temporary exists:
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

#define LOAD SFX(fx_load)
#define LOAD_TAIL SFX(fx_load_tail)
#define STORE SFX(fx_store)
#define STORE_TAIL SFX(fx_store_tail)
#define SPLAT SFX(fx_splat)
#define SEL SFX(fx_sel)
#define VMAX SFX(fx_vmax)
#define HSUM SFX(fx_hsum)
#define HMAX SFX(fx_hmax)
#define EXPM SFX(fx_expm)
/* Accumulators (vec.h): ACC for V, ACCW for VW. */
#define ACC SFX(fx_acc)
#define AINIT SFX(fx_acc_init)
#define AGET SFX(fx_acc_get)
#define AADD SFX(fx_acc_add)
#define AMAX SFX(fx_acc_max)
#define ACCW WSFX(fx_acc)
#define AWINIT WSFX(fx_acc_init)
#define AWGET WSFX(fx_acc_get)
#define AWADD WSFX(fx_acc_add)

#define CHUNK FX_CHUNK

/* A loop over lanes [lo, hi) in steps of VL whose body sees k, the lanes in
   this step: the body is expanded twice, so full vectors (k == VL, a
   constant) compile without the tail's partial loads, stores and branches.
   The braces around the body keep its commas away from the preprocessor. */
#define FX_LANES(i, lo, hi, k, ...)                                             \
    do {                                                                       \
        const int64_t hi_ = (hi);                                              \
        int64_t i = (lo);                                                      \
        for (; i + VL <= hi_; i += VL) {                                       \
            const int64_t k = VL;                                              \
            __VA_ARGS__                                                        \
        }                                                                      \
        if (i < hi_) {                                                         \
            const int64_t k = hi_ - i;                                         \
            __VA_ARGS__                                                        \
        }                                                                      \
    } while (0)

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

/* Lanes [i, i+k) of x minus m, padding lanes 0 (they add nothing). */
FX_INLINE V NM(zload_lin)(const XT *x, int64_t i, int64_t k, V vm, T m)
{
    return (k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, m)) - vm;
}

/* Rows up to this many bytes are prefetched into L2 while the row before
   them is in its sum-of-exponentials pass, which is bound by arithmetic, not
   memory: the next row's max pass then reads L2 instead of main memory.
   Two such rows fit in the L2 of current x86 cores (512 KiB and up). */
#define PF_BYTES (192 << 10)

/* The row after row r of [r0, r1), as bytes to prefetch, or NULL. */
FX_INLINE const char *NM(next_row)(const fx_job *job, int64_t r, int64_t r1)
{
    if (r + 1 >= r1 || job->n_cols * (int64_t)sizeof(XT) > PF_BYTES) return NULL;
    return (const char *)((const XT *)job->x + (r + 1) * job->x_ld);
}

/* Prefetch the VL elements of row pf that match x + i (L2 only). */
FX_INLINE void NM(prefetch)(const char *pf, int64_t i)
{
    for (int b = 0; b < VL * (int)sizeof(XT); b += 64)
        __builtin_prefetch(pf + i * (int64_t)sizeof(XT) + b, 0, 2);
}

/* The sum of exp(x_c - m) over one chunk [c0, c1) (c1 - c0 <= CHUNK), as
   one double: the unit that rows split across threads add in order. pf,
   when not NULL, is the row to prefetch, element for element alongside x.
   xb, when not NULL, is a second row (max mb, prefetch pfb, no stash)
   whose sum goes to *sb: the same additions lane for lane, so a row gives
   the same bits alone or paired (which a thread split decides). */
FX_INLINE double NM(chunk_sumexp_)(const XT *x, int64_t c0, int64_t c1, V vm, T *st,
                                   const char *pf, const XT *xb, V vmb, const char *pfb,
                                   double *sb)
{
    ACC a0 = AINIT(SPLAT(0)), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = c0;
    for (; i + 2 * VL <= c1; i += 2 * VL) {
        if (pf) {
            NM(prefetch)(pf, i);
            NM(prefetch)(pf, i + VL);
        }
        if (pfb) {
            NM(prefetch)(pfb, i);
            NM(prefetch)(pfb, i + VL);
        }
        const V e0 = EXPM(XLOAD(x + i) - vm), e1 = EXPM(XLOAD(x + i + VL) - vm);
        a0 = AADD(a0, e0);
        a1 = AADD(a1, e1);
        if (xb) {
            b0 = AADD(b0, EXPM(XLOAD(xb + i) - vmb));
            b1 = AADD(b1, EXPM(XLOAD(xb + i + VL) - vmb));
        }
        if (st) { /* see fx_store_union */
            SFX(fx_store_union)(st + i, e0);
            SFX(fx_store_union)(st + i + VL, e1);
        }
    }
    for (; i < c1; i += VL) {
        const int64_t k = c1 - i < VL ? c1 - i : VL;
        const V e = EXPM(NM(zload_exp)(x, i, k, vm));
        a0 = AADD(a0, e);
        if (xb) b0 = AADD(b0, EXPM(NM(zload_exp)(xb, i, k, vmb)));
        if (st) {
            if (k == VL) STORE(st + i, e);
            else STORE_TAIL(st + i, e, k);
        }
    }
    if (xb) *sb = HSUM(AGET(b0) + AGET(b1));
    return HSUM(AGET(a0) + AGET(a1));
}

/* Two copies, so the loop that does not stash has no stores to test. */
FX_INLINE double NM(chunk_sumexp)(const XT *x, int64_t c0, int64_t c1, V vm, T *st,
                                  const char *pf)
{
    if (st) return NM(chunk_sumexp_)(x, c0, c1, vm, st, pf, NULL, vm, NULL, NULL);
    return NM(chunk_sumexp_)(x, c0, c1, vm, NULL, pf, NULL, vm, NULL, NULL);
}

/* Rows of up to PAIR_BYTES are taken two at a time by the forward row
   kernels: at these lengths the latency of one row's max -> exp -> sum ->
   log chain is about as long as its arithmetic, and two independent rows
   in one loop overlap what one row cannot (float32, 64-256 classes:
   0.77-0.94x the time). Longer rows gained nothing, and at 2 KiB (float32
   512, float64 256 classes) lost up to 10%. */
#define PAIR_BYTES 1024 /* <= CHUNK elements */

FX_INLINE int NM(paired)(const fx_job *job)
{
    return job->n_cols * (int64_t)sizeof(XT) <= PAIR_BYTES;
}

/* Maxima of rows a and b (row_max's value for each). */
FX_INLINE void NM(row_max2)(const XT *xa, const XT *xb, int64_t n, T *ma, T *mb)
{
    ACC a = AINIT(SPLAT(-INFINITY)), b = a;
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        a = AMAX(a, XLOAD(xa + i));
        b = AMAX(b, XLOAD(xb + i));
    }
    if (i < n) {
        a = AMAX(a, XLOAD_TAIL(xa + i, n - i, -INFINITY));
        b = AMAX(b, XLOAD_TAIL(xb + i, n - i, -INFINITY));
    }
    *ma = HMAX(AGET(a)) + (T)0;
    *mb = HMAX(AGET(b)) + (T)0;
}

/* (m, s) of rows r and r + 1 of [r0, r1), when both maxima are finite
   (else 0, and the caller takes the rows one at a time). */
FX_INLINE int NM(pair_stats)(const fx_job *job, int64_t r, int64_t r1, T *m, double *s)
{
    const XT *xa = (const XT *)job->x + r * job->x_ld, *xb = xa + job->x_ld;
    NM(row_max2)(xa, xb, job->n_cols, &m[0], &m[1]);
    if (!isfinite(m[0]) || !isfinite(m[1])) return 0;
    /* The next pair is prefetched during the sum pass. */
    const char *pa = NM(next_row)(job, r + 1, r1), *pb = NM(next_row)(job, r + 2, r1);
    /* Never with a stash: gradients and softmax (which stash exponentials)
       were 1.05-1.3x slower paired. */
    s[0] = NM(chunk_sumexp_)(xa, 0, job->n_cols, SPLAT(m[0]), NULL, pa, xb, SPLAT(m[1]), pb,
                             &s[1]);
    return 1;
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
    const V vm = SPLAT(m), zero = SPLAT(0);
    double s = 0.0, dd = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = NM(chunk_end)(c0, n);
        if (!d) {
            s += NM(chunk_sumexp)(x, c0, c1, vm, st, pf);
            continue;
        }
        ACC a0 = AINIT(zero), b0 = a0;
        FX_LANES(i, c0, c1, k, {
            const V e = EXPM(NM(zload_exp)(x, i, k, vm));
            a0 = AADD(a0, e);
            /* A class of weight 0 adds nothing, even at x_c = -inf. */
            const V wv = NM(wload)(w, i, k);
            b0 = AADD(b0, SEL(SFX(fx_eq)(wv, zero), zero, wv * NM(zload_lin)(x, i, k, vm, m)));
            if (st) {
                if (k == VL) STORE(st + i, e);
                else STORE_TAIL(st + i, e, k);
            }
        });
        dd += HSUM(AGET(b0));
        s += HSUM(AGET(a0));
    }
    if (d) *d = dd;
    return s;
}

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
    const V vm = SPLAT(m), zero = SPLAT(0);
    double s = 0.0, aa = 0.0, bb = 0.0, dd = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = NM(chunk_end)(c0, n);
        ACC vs = AINIT(zero), va = vs, vb = vs, vd = vs;
        FX_LANES(i, c0, c1, k, {
            const V z = NM(zload_lin)(x, i, k, vm, m);
            const V tv = k == VL ? LOAD(t + i) : LOAD_TAIL(t + i, k, 0);
            const V wv = NM(wload)(w, i, k);
            const V wt = wv * tv;
            vs = AADD(vs, EXPM(NM(zload_exp)(x, i, k, vm)));
            va = AADD(va, SEL(SFX(fx_eq)(wt, zero), zero, wt * z));
            vb = AADD(vb, wt);
            vd = AADD(vd, SEL(SFX(fx_eq)(wv, zero), zero, wv * z));
        });
        s += HSUM(AGET(vs));
        aa += HSUM(AGET(va));
        bb += HSUM(AGET(vb));
        dd += HSUM(AGET(vd));
    }
    *a = aa;
    *b = bb;
    *d = dd;
    return s;
}

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

/* out_c = exp(x_c - m) * k1 - k2 * w_c (w NULL: - k2). out may equal x:
   each element is read before it is written. */
FX_INLINE void NM(row_write_grad)(const XT *x, XT *out, const T *w, int64_t n, T m, T k1, T k2)
{
    const V vm = SPLAT(m), v1 = SPLAT(k1), v2 = SPLAT(k2);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const V e = EXPM(XLOAD(x + i) - vm);
        XSTORE(out + i, w ? e * v1 - v2 * LOAD(w + i) : e * v1 - v2);
    }
    if (i < n) {
        const V e = EXPM(XLOAD_TAIL(x + i, n - i, -INFINITY) - vm);
        XSTORE_TAIL(out + i, w ? e * v1 - v2 * LOAD_TAIL(w + i, n - i, 0) : e * v1 - v2, n - i);
    }
}

/* out_c = out_c * k1 - k2 * w_c (w NULL: - k2) on exponentials stashed by
   row_sumexp: row_write_grad's arithmetic without its exp. */
FX_INLINE void NM(row_scale)(T *out, const T *w, int64_t n, T k1, T k2)
{
    const V v1 = SPLAT(k1), v2 = SPLAT(k2);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const V e = LOAD(out + i);
        STORE(out + i, w ? e * v1 - v2 * LOAD(w + i) : e * v1 - v2);
    }
    if (i < n) {
        const V e = LOAD_TAIL(out + i, n - i, 0);
        STORE_TAIL(out + i, w ? e * v1 - v2 * LOAD_TAIL(w + i, n - i, 0) : e * v1 - v2, n - i);
    }
}

#if !X16
/* log_softmax outputs larger than FX_STREAM_BYTES (all rows) are written
   with streaming stores: they cannot stay in the cache anyway, and skipping
   the read-for-ownership saves a third of the memory traffic (1.1-1.2x
   faster on Zen 3). Not gradients or softmax: they stash exponentials, and
   those stores queue behind the streaming ones of the row before (Zen 3:
   1.2-1.4x slower at 1000-32000 classes, 1.6x at 512, 4x at 128). */
FX_INLINE int NM(streaming)(const fx_job *job)
{
    return job->n_rows * job->n_cols * (int64_t)sizeof(T) > FX_STREAM_BYTES;
}

/* out_c = (x_c - m) - l with streaming stores from the first 64-byte
   boundary of out; the scalar head and tail use the same expression, so
   the bits match log_softmax's cached stores. */
FX_INLINE void NM(row_lsm_stream)(const T *x, T *out, int64_t n, T m, T l)
{
    int64_t i = 0;
    while (i < n && ((uintptr_t)(out + i) & (FX_VBYTES - 1)) != 0) {
        out[i] = (x[i] - m) - l;
        i++;
    }
    const V vm = SPLAT(m), vl = SPLAT(l);
    for (; i + VL <= n; i += VL) SFX(fx_stream)(out + i, (LOAD(x + i) - vm) - vl);
    for (; i < n; i++) out[i] = (x[i] - m) - l;
}
#endif

FX_INLINE void NM(row_zero)(XT *out, int64_t n)
{
    memset(out, 0, (size_t)n * sizeof(XT)); /* +0 in every storage type */
}

/* ------------------------------------------------------------------------
 * Small rows (n <= SMALL_C, see NM(small)): one row per lane. A row of 10
 * classes fills a vector badly and pays the per-row costs (horizontal
 * sums, tails) for little work; instead VL rows are transposed into buf
 * (column c of the group at buf + c*VL) and every step runs lanewise over
 * rows, sums accumulating in double. Each lane's arithmetic is independent
 * of the others, so a row's result does not depend on which rows share its
 * group (and so not on the thread count).
 * ---------------------------------------------------------------------- */
#define SMALL_C 63

/* Whether rows of n classes take the small-row path: up to 63 for float32
   and 16-bit rows, up to 48 for float64 rows and for float32 log_softmax
   (small_lsm). At 64 classes and more the row kernels win (no row tail;
   float32 cross entropy at 64-128 classes was 15-30% faster in the small
   path while the data sat in L2, but 1.2-1.4x slower with a gradient or
   log-softmax once it came from L3: a group walks 16 rows at once, which
   the hardware prefetchers do not follow). At 49-63 classes a row's tail
   costs the row kernels a whole vector: with 16 MiB of logits the small
   path took float32 rows there in 0.55-0.85x the time (gradients,
   softmax, the forward ops) and 16-bit rows in about half; not float64
   (1.2-1.5x slower with outputs) or float32 log_softmax (1.03-1.19x
   slower). */
FX_INLINE int NM(small)(const fx_job *job)
{
    return job->n_cols <= (sizeof(T) == 8 ? 48 : SMALL_C);
}

/* 16-bit log_softmax rows of 49-63 classes: 0.32-0.53x the time here. */
FX_INLINE int NM(small_lsm)(const fx_job *job) { return job->n_cols <= (X16 ? SMALL_C : 48); }

/* Rows [0, nr) of x (nr <= VL, rows ld apart) into buf; other lanes 0.
   16-bit rows are first widened a vector at a time into float32 rows
   (n apart) in tmp: element by element, every conversion cost a vector's. */
FX_INLINE void NM(small_load)(const XT *x, int64_t ld, int64_t nr, int64_t n, T *buf)
{
#if X16
    float tmp[VL * SMALL_C + VL];
    if (ld == n && nr == VL) { /* one block of VL * n, whole vectors */
        for (int64_t i = 0; i < VL * n; i += VL) STORE(tmp + i, XLOAD(x + i));
    } else {
        for (int64_t j = 0; j < nr; j++)
            for (int64_t c = 0; c < n; c += VL)
                STORE(tmp + j * n + c,
                      n - c >= VL ? XLOAD(x + j * ld + c) : XLOAD_TAIL(x + j * ld + c, n - c, 0));
    }
    const T *xs = tmp;
    const int64_t lds = n;
#else
    const T *xs = x;
    const int64_t lds = ld;
#endif
#if FX_HAVE_TILE && VL == 16
    if (nr == VL) {
        /* A last partial tile of a row of 8 or more overlaps the one
           before it: plain loads and stores, not masked ones (AMD's masked
           stores are slow), and what is written twice is the same value. */
        for (int64_t c = 0; c < n; c += 8) {
            const int64_t c8 = n - c < 8 && n >= 8 ? n - 8 : c;
            fx_tile_load16(xs + c8, lds, n - c8 < 8 ? n - c8 : 8, buf + c8 * VL);
        }
        return;
    }
#endif
    for (int64_t c = 0; c < n; c++)
        for (int64_t j = 0; j < VL; j++) buf[c * VL + j] = j < nr ? xs[j * lds + c] : 0;
}

/* The inverse, for rows [0, nr); 16-bit rows through float32 rows in tmp. */
FX_INLINE void NM(small_store)(const T *buf, int64_t nr, int64_t n, XT *out, int64_t ld)
{
#if X16
    float tmp[VL * SMALL_C + VL];
    memset(tmp + nr * n, 0, VL * sizeof(float)); /* read, unused, by the last tail */
    T *os = tmp;
    const int64_t lds = n;
#else
    T *os = out;
    const int64_t lds = ld;
#endif
#if FX_HAVE_TILE && VL == 16
    if (nr == VL) {
        for (int64_t c = 0; c < n; c += 8) {
            const int64_t c8 = n - c < 8 && n >= 8 ? n - 8 : c;
            fx_tile_store16(buf + c8 * VL, n - c8 < 8 ? n - c8 : 8, os + c8, lds);
        }
    } else
#endif
    {
        for (int64_t j = 0; j < nr; j++)
            for (int64_t c = 0; c < n; c++) os[j * lds + c] = buf[c * VL + j];
    }
#if X16
    if (ld == n && nr == VL) {
        for (int64_t i = 0; i < VL * n; i += VL) XSTORE(out + i, LOAD(tmp + i));
        return;
    }
    for (int64_t j = 0; j < nr; j++)
        for (int64_t c = 0; c < n; c += VL) {
            if (n - c >= VL) XSTORE(out + j * ld + c, LOAD(tmp + j * n + c));
            else XSTORE_TAIL(out + j * ld + c, LOAD(tmp + j * n + c), n - c);
        }
#endif
}

/* Lanewise row max and sum of exp(x - max); with ebuf, the exponentials
   are kept there too (laid out as buf); with q, *q = sum_c e_c (x_c - m)
   (a term with e_c = 0 counts 0), entropy's second sum.
   A group's work is short, so its dependency chains set the pace: the
   maxima run in two chains (even and odd columns), and the sums take the
   columns in pairs, each pair added in T and then into the double sum
   (half the chain and half the conversions; for float32 the pair's one
   rounding is below what the float32 log of s keeps). */
FX_INLINE V NM(small_stats)(const T *buf, int64_t n, VW *s, T *ebuf, VW *q)
{
    ACC am0 = AINIT(SPLAT(-INFINITY)), am1 = am0;
    int64_t c = 0;
    for (; c + 2 <= n; c += 2) {
        am0 = AMAX(am0, LOAD(buf + c * VL));
        am1 = AMAX(am1, LOAD(buf + (c + 1) * VL));
    }
    if (c < n) am0 = AMAX(am0, LOAD(buf + c * VL));
    const V m = AGET(AMAX(am0, AGET(am1)));
    ACCW acc = AWINIT(__builtin_convertvector(SPLAT(0), VW));
    const V zero = SPLAT(0);
    if (q) {
        ACCW accq = acc;
#define FX_TERM(c, e, t)                                                       \
    const V d##e = LOAD(buf + (c) * VL) - m, e = EXPM(d##e);                   \
    const V t = SEL(SFX(fx_eq)(e, zero), zero, e * d##e)
        for (c = 0; c + 2 <= n; c += 2) {
            FX_TERM(c, e0, t0);
            FX_TERM(c + 1, e1, t1);
            acc = AWADD(acc, __builtin_convertvector(e0 + e1, VW));
            accq = AWADD(accq, __builtin_convertvector(t0 + t1, VW));
        }
        if (c < n) {
            FX_TERM(c, e0, t0);
            acc = AWADD(acc, __builtin_convertvector(e0, VW));
            accq = AWADD(accq, __builtin_convertvector(t0, VW));
        }
#undef FX_TERM
        *q = AWGET(accq);
    } else if (ebuf) {
        for (c = 0; c + 2 <= n; c += 2) {
            const V e0 = EXPM(LOAD(buf + c * VL) - m), e1 = EXPM(LOAD(buf + (c + 1) * VL) - m);
            STORE(ebuf + c * VL, e0);
            STORE(ebuf + (c + 1) * VL, e1);
            acc = AWADD(acc, __builtin_convertvector(e0 + e1, VW));
        }
        if (c < n) {
            const V e0 = EXPM(LOAD(buf + c * VL) - m);
            STORE(ebuf + c * VL, e0);
            acc = AWADD(acc, __builtin_convertvector(e0, VW));
        }
    } else {
        for (c = 0; c + 2 <= n; c += 2) {
            const V e0 = EXPM(LOAD(buf + c * VL) - m), e1 = EXPM(LOAD(buf + (c + 1) * VL) - m);
            acc = AWADD(acc, __builtin_convertvector(e0 + e1, VW));
        }
        if (c < n) acc = AWADD(acc, __builtin_convertvector(EXPM(LOAD(buf + c * VL) - m), VW));
    }
    *s = AWGET(acc);
    return m;
}

/* log of the lanewise sums (>= 1 where the row is finite; other lanes are
   screened by the caller). float32 rows: the sums are rounded to float
   first, the log is then float32-accurate, enough for a float32 result. */
FX_INLINE VW NM(small_log)(VW s)
{
    V sf = __builtin_convertvector(s, V);
    sf = SEL(SFX(fx_lt)(sf, SPLAT(1)), SPLAT(1), sf); /* padding and NaN lanes */
    return __builtin_convertvector(SFX(fx_log_pos)(sf), VW);
}

/* A VW vector of doubles to memory by native parts (see fx_store). */
FX_INLINE void NM(store_w)(double *p, VW v)
{
#if VL == 16 && FX_NPARTS == 2
    /* AVX2: by shuffles, as fx_store (the parts are reloaded as vectors) */
    FX_STORE4(p, v, fx_nf64, 4);
#else
    union { VW v; fx_nf64 n[sizeof(VW) / FX_NBYTES]; } u = {v};
    for (size_t k = 0; k < sizeof(VW) / FX_NBYTES; k++)
        memcpy((char *)p + k * FX_NBYTES, &u.n[k], FX_NBYTES);
#endif
}

/* Whether every lane of a group has a finite m and a sum s that is not
   NaN: m - m is NaN where m is not finite, and s lanes are finite or NaN,
   so one tree sum tells. */
FX_INLINE int NM(finite_group)(V m, VW sv)
{
    return !isnan(HSUM((m - m) + __builtin_convertvector(sv, V)));
}

/* Whether a full group is plain as far as its labels and statistics go:
   every row labelled (no ignore_index), every m finite, no s NaN; if so,
   x_y and m of each lane, in double, to xyv and mv. Labels are in range or
   ignore_index (the caller's check), and ignore_index is never looked up. */
FX_INLINE int NM(plain_group)(const int64_t *lab, int64_t ig, const T *buf, V m, VW sv,
                              double *xyv, double *mv)
{
    T xy[VL];
    int bad = 0;
    for (int64_t j = 0; j < VL; j++) {
        const int64_t y = lab[j];
        bad |= y == ig;
        xy[j] = buf[(y == ig ? 0 : y) * VL + j];
    }
    if (bad || !NM(finite_group)(m, sv)) return 0;
    NM(store_w)(xyv, __builtin_convertvector(LOAD(xy), VW));
    NM(store_w)(mv, __builtin_convertvector(m, VW));
    return 1;
}

static void NM(ce_hard_small)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const T *w = (const T *)job->w;
    const double eps = job->smoothing, W = job->w_sum;
    T buf[SMALL_C * VL], ebuf[SMALL_C * VL], k1[VL], k2[VL];
    double gy[VL]; /* the true class's gradient, formed in double */
    for (int64_t r = r0; r < r1; r += VL) {
        const int64_t nr = r1 - r < VL ? r1 - r : VL;
        const XT *x = (const XT *)job->x + r * job->x_ld;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
        NM(small_load)(x, job->x_ld, nr, n, buf);
        VW sv;
        const V m = NM(small_stats)(buf, n, &sv, out ? ebuf : NULL, NULL);
        VW dv = __builtin_convertvector(SPLAT(0), VW);
        if (eps > 0) {
            ACCW adv = AWINIT(dv);
            for (int64_t c = 0; c < n; c++) {
                const T wc = w ? w[c] : 1;
                if (wc != 0)
                    adv = AWADD(adv, __builtin_convertvector(SPLAT(wc) * (LOAD(buf + c * VL) - m), VW));
            }
            dv = AWGET(adv);
        }
        const VW lv = NM(small_log)(sv);
        /* exp(x_y - m) of every row of the group by the vector kernel: a
           libm call per row cost more than the row's other arithmetic. */
        double xyv[VL], mv[VL], exy[VL], gsv[VL];
        /* plain: every row labelled, with finite m and s, no weights, no
           smoothing; fx_ce_hard_row's arithmetic then runs lanewise. */
        const int plain = nr == VL && !w && eps == 0
                          && NM(plain_group)(job->labels + r, job->ignore_index, buf, m, sv, xyv, mv);
        if (!plain) {
            for (int64_t j = 0; j < VL; j++) {
                const int64_t y = j < nr ? job->labels[r + j] : job->ignore_index;
                const int ok = y != job->ignore_index && isfinite(m[j]);
                xyv[j] = ok ? (double)buf[y * VL + j] : 0.0;
                mv[j] = ok ? (double)m[j] : 0.0;
            }
        }
        if (out) {
            for (int64_t j = 0; j < VL; j++)
                gsv[j] = j < nr ? job->gscale[(r + j) * job->gscale_step] : 0.0;
            for (int h = 0; h < VL / 8; h++)
                fx_store_f64(exy + 8 * h, fx_expm_f64(fx_load_f64(xyv + 8 * h) - fx_load_f64(mv + 8 * h)));
        }
        V vk1, vk2;
        if (plain) {
            /* The same operations, in the same order, as fx_ce_hard_row
               with wy = 1 and eps = 0, so the same bits. */
            const double ec = eps / (double)n, c1 = (1.0 - eps) * 1.0;
            VW xw, mw;
            memcpy(&xw, xyv, sizeof xw);
            memcpy(&mw, mv, sizeof mw);
            VW c1w;
            for (int j = 0; j < (int)(sizeof(VW) / sizeof(double)); j++) c1w[j] = c1;
            NM(store_w)(job->row_out + r, c1w * (lv - (xw - mw)));
            if (out) {
                const double A = c1 + ec * W;
                VW gw, ew;
                memcpy(&gw, gsv, sizeof gw);
                memcpy(&ew, exy, sizeof ew);
                vk1 = __builtin_convertvector(gw * A / sv, V);
                vk2 = __builtin_convertvector(gw * ec, V);
                NM(store_w)(gy, gw * (ew / sv * A - c1 - ec * 1.0));
            }
        } else {
        for (int64_t j = 0; j < VL; j++) {
            k1[j] = 0;
            k2[j] = 0;
            if (j >= nr) continue;
            const int64_t y = job->labels[r + j];
            if (y == job->ignore_index) {
                job->row_out[r + j] = 0.0;
                continue;
            }
            const double s = isfinite(m[j]) ? (double)sv[j] : NAN;
            const fx_ce_row o = fx_ce_hard_row_e(
                (double)buf[y * VL + j], w ? (double)w[y] : 1.0, (double)m[j], s,
                isnan(s) ? s : (double)lv[j], (double)dv[j], eps, n, W,
                gsv[j], out != NULL, out ? exy[j] : 0.0);
            job->row_out[r + j] = o.loss;
            k1[j] = (T)o.k1;
            k2[j] = (T)o.k2;
            gy[j] = o.gy;
        }
        vk1 = LOAD(k1);
        vk2 = LOAD(k2);
        }
        if (!out) continue;
        for (int64_t c = 0; c < n; c++) {
            const V e = LOAD(ebuf + c * VL);
            STORE(ebuf + c * VL, w ? e * vk1 - vk2 * SPLAT(w[c]) : e * vk1 - vk2);
        }
        NM(small_store)(ebuf, nr, n, out, job->out_ld);
        for (int64_t j = 0; j < nr; j++) {
            const int64_t y = job->labels[r + j];
            XT *orow = out + j * job->out_ld;
            if (y == job->ignore_index) NM(row_zero)(orow, n);
            else XSET(orow, y, (T)gy[j]);
        }
    }
}

/* logsumexp, log-softmax, softmax and entropy of small rows. */
static void NM(blocks_small)(const fx_job *job, int op, int64_t r0, int64_t r1)
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
            STORE(buf + c * VL, op == FX_LOG_SOFTMAX ? (v - m) - vk : v * vk);
        }
        NM(small_store)(buf, nr, n, (XT *)job->out + r * job->out_ld, job->out_ld);
    }
}

/* ------------------------------------------------------------------------
 * Cross entropy from logits with integer labels.
 *   loss_r = (1-eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c)
 *          = (1-eps) w_y (log s - (x_y - m)) + eps/C (W log s - d)
 *   grad_c = gs [ p_c ((1-eps) w_y + eps/C W) - (1-eps) w_y [c == y] - eps/C w_c ]
 * Ignored rows: loss 0, gradient 0.
 * ---------------------------------------------------------------------- */
/* One row of ce_hard. n, w, eps and W come from the caller, which reads
   them once: reread here after each row's double store (row_out, which
   may alias them as far as the compiler knows), they kept GCC from
   specialising the row loop, and gradients ran 7% slower. */
FX_INLINE void NM(ce_hard_row)(const fx_job *job, int64_t r, int64_t r1, int64_t n, const T *w,
                               double eps, double W)
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
    T m = NM(row_max)(x, n);
    double s, d = 0.0;
    /* float32/float64 gradients stash exp(x - m) in out on the way. */
    T *stash = NULL;
#if !X16
    if (out && isfinite(m)) stash = out;
#endif
    if (isfinite(m))
        s = NM(row_sumexp)(x, w, n, m, eps > 0 ? &d : NULL, stash, NM(next_row)(job, r, r1));
    else s = NAN;
    const fx_ce_row o = fx_ce_hard_row(xy, wy, (double)m, s, log(s), d, eps, n, W,
                                       out ? job->gscale[r * job->gscale_step] : 0.0,
                                       out != NULL);
    job->row_out[r] = o.loss;
    if (out) {
        const T k1 = (T)o.k1, k2 = (T)o.k2;
        if (stash) NM(row_scale)(stash, w, n, k1, k2);
        else NM(row_write_grad)(x, out, w, n, m, k1, k2);
        /* The true class from the saved x_y (out may be x). */
        XSET(out, y, (T)o.gy);
    }
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
    int64_t r = r0;
    /* The loss alone, without smoothing (a third sum): rows in pairs. */
    if (NM(paired)(job) && !job->out && !(eps > 0))
        for (; r + 1 < r1; r += 2) {
            const int64_t y[2] = {job->labels[r], job->labels[r + 1]};
            T m[2];
            double s[2];
            if (y[0] == job->ignore_index || y[1] == job->ignore_index ||
                !NM(pair_stats)(job, r, r1, m, s)) {
                NM(ce_hard_row)(job, r, r1, n, w, eps, W);
                NM(ce_hard_row)(job, r + 1, r1, n, w, eps, W);
                continue;
            }
            for (int j = 0; j < 2; j++) {
                const XT *x = (const XT *)job->x + (r + j) * job->x_ld;
                job->row_out[r + j] = fx_ce_hard_row((double)XGET(x, y[j]),
                                                     w ? (double)w[y[j]] : 1.0, (double)m[j],
                                                     s[j], log(s[j]), 0.0, eps, n, W, 0.0, 0)
                                          .loss;
            }
        }
    for (; r < r1; r++) NM(ce_hard_row)(job, r, r1, n, w, eps, W);
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

/* ------------------------------------------------------------------------
 * Building blocks.
 * ---------------------------------------------------------------------- */
/* Pieces of one row for the split-row driver (parallel.c): a range's max,
   chunk sums, and the write pass over a range. Each is the row kernel's own
   code on part of the row, so a split row gets the unsplit row's bits. */
static double KFN(range_max)(const void *x, int64_t c0, int64_t c1)
{
    return (double)NM(row_max)((const XT *)x + c0, c1 - c0);
}

static void KFN(chunk_sums)(const void *x, int64_t n, int64_t k0, int64_t k1, double m, double *sums,
                            void *st)
{
    const V vm = SPLAT((T)m);
#if X16
    (void)st; /* 16-bit outputs are not stashed (parallel.c never asks) */
    T *stp = NULL;
#else
    T *stp = (T *)st;
#endif
    for (int64_t k = k0; k < k1; k++)
        sums[k] = NM(chunk_sumexp)((const XT *)x, k * CHUNK, NM(chunk_end)(k * CHUNK, n), vm, stp, NULL);
}

/* log-softmax: out = (x - m) - k1; otherwise out = exp(x - m) k1 - k2 w. */
static void KFN(range_write)(int op, const void *xv, void *outv, const void *wv, int64_t c0,
                             int64_t c1, double m, double k1, double k2, int stashed)
{
    const XT *x = (const XT *)xv + c0;
    XT *out = (XT *)outv + c0;
    const int64_t n = c1 - c0;
#if !X16
    if (stashed) { /* the row kernels' second step after stashing */
        NM(row_scale)(out, wv ? (const T *)wv + c0 : NULL, n, (T)k1, (T)k2);
        return;
    }
#else
    (void)stashed;
#endif
    if (op != FX_LOG_SOFTMAX) {
        NM(row_write_grad)(x, out, wv ? (const T *)wv + c0 : NULL, n, (T)m, (T)k1, (T)k2);
        return;
    }
    const V vm = SPLAT((T)m), vl = SPLAT((T)k1);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) XSTORE(out + i, (XLOAD(x + i) - vm) - vl);
    if (i < n) XSTORE_TAIL(out + i, (XLOAD_TAIL(x + i, n - i, 0) - vm) - vl, n - i);
}

FX_INLINE void NM(logsumexp_row)(const fx_job *job, int64_t r, int64_t r1)
{
    const XT *x = (const XT *)job->x + r * job->x_ld;
    const T m = NM(row_max)(x, job->n_cols);
    if (isfinite(m)) {
        job->row_out[r] = (double)m + log(NM(row_sumexp)(x, NULL, job->n_cols, m, NULL, NULL,
                                                         NM(next_row)(job, r, r1)));
        return;
    }
    /* +inf for a row holding +inf, -inf for a row of -inf; NaN poisons. */
    double v = m;
    for (int64_t c = 0; c < job->n_cols; c++)
        if (isnan(XGET(x, c))) v = NAN;
    job->row_out[r] = v;
}

static void KFN(logsumexp)(const fx_job *job, int64_t r0, int64_t r1)
{
    if (NM(small)(job)) {
        NM(blocks_small)(job, FX_LOGSUMEXP, r0, r1);
        return;
    }
    int64_t r = r0;
    if (NM(paired)(job))
        for (; r + 1 < r1; r += 2) {
            T m[2];
            double s[2];
            if (NM(pair_stats)(job, r, r1, m, s)) {
                job->row_out[r] = (double)m[0] + log(s[0]);
                job->row_out[r + 1] = (double)m[1] + log(s[1]);
            } else {
                NM(logsumexp_row)(job, r, r1);
                NM(logsumexp_row)(job, r + 1, r1);
            }
        }
    for (; r < r1; r++) NM(logsumexp_row)(job, r, r1);
}

/* out_c = (x_c - m) - log(s): subtracting the max first keeps x_c - m exact
   for the largest logits, where the log-probabilities matter most. */
FX_INLINE void NM(log_softmax_write)(const fx_job *job, int64_t r, T m, double s, int stream)
{
    const int64_t n = job->n_cols;
    const XT *x = (const XT *)job->x + r * job->x_ld;
    XT *out = (XT *)job->out + r * job->out_ld;
#if !X16
    if (stream) {
        NM(row_lsm_stream)(x, out, n, m, (T)log(s));
        return;
    }
#endif
    (void)stream;
    const V vm = SPLAT(m), vl = SPLAT((T)log(s));
    int64_t i = 0;
    for (; i + VL <= n; i += VL) XSTORE(out + i, (XLOAD(x + i) - vm) - vl);
    if (i < n) XSTORE_TAIL(out + i, (XLOAD_TAIL(x + i, n - i, 0) - vm) - vl, n - i);
}

FX_INLINE void NM(log_softmax_row)(const fx_job *job, int64_t r, int64_t r1, int stream)
{
    T m;
    const double s = NM(row_stats)((const XT *)job->x + r * job->x_ld, job->n_cols, &m,
                                   NM(next_row)(job, r, r1));
    NM(log_softmax_write)(job, r, m, s, stream);
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
    /* Pairs below PAIR_BYTES: at float32 256 classes (1 KiB) with 16 MiB
       of logits, log_softmax was 1.07-1.1x slower paired. */
    if (job->n_cols * (int64_t)sizeof(XT) < PAIR_BYTES)
        for (; r + 1 < r1; r += 2) {
            T m[2];
            double s[2];
            if (NM(pair_stats)(job, r, r1, m, s)) {
                NM(log_softmax_write)(job, r, m[0], s[0], stream);
                NM(log_softmax_write)(job, r + 1, m[1], s[1], stream);
            } else {
                NM(log_softmax_row)(job, r, r1, stream);
                NM(log_softmax_row)(job, r + 1, r1, stream);
            }
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
        /* Stash exp(x - m) in out, then scale: one exp per element. */
        const T mm = NM(row_max)(x, n);
        if (isfinite(mm)) {
            const double s = NM(row_sumexp)(x, NULL, n, mm, NULL, out, NM(next_row)(job, r, r1));
            NM(row_scale)(out, NULL, n, (T)(1.0 / s), 0);
            continue;
        }
#endif
        T m;
        const double s = NM(row_stats)(x, n, &m, NULL);
        NM(row_write_grad)(x, out, NULL, n, m, (T)(1.0 / s), 0);
    }
}

/* H = log s - (1/s) sum_c e_c (x_c - m), with e_c = exp(x_c - m). */
static void KFN(entropy)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    if (NM(small)(job)) {
        NM(blocks_small)(job, FX_ENTROPY, r0, r1);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        T m = NM(row_max)(x, n);
        if (!isfinite(m)) {
            /* softmax of a row whose max is +inf or whose entries are all
               -inf (or NaN) is undefined (inf - inf): NaN, as in torch. */
            job->row_out[r] = NAN;
            continue;
        }
        double q;
        const double s = NM(row_entropy)(x, n, m, &q, NM(next_row)(job, r, r1));
        job->row_out[r] = log(s) - q / s;
    }
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

/* ------------------------------------------------------------------------
 * Binary cross entropy from logits, elementwise (torch's
 * binary_cross_entropy_with_logits), with lw = 1 + (pw - 1) t:
 *   loss = w [ (1 - t) x + lw (log1p(exp(-|x|)) + max(-x, 0)) ]
 *        = w [ (x >= 0 ? (1 - t) x : -pw t x) + lw log1p(exp(-|x|)) ]
 *   grad = gs gout w [ lw sigmoid(x) - pw t ]
 * exp(-|x|) <= 1 never overflows; log1p keeps tiny losses exact.
 * row_out gets each row's sum, loss_out (if any) the elements.
 * ---------------------------------------------------------------------- */
static void KFN(bce_logits)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols;
    const V zero = SPLAT(0), one = SPLAT(1);
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        const T *t = (const T *)job->t + r * job->t_ld;
        const T *w = job->w ? (const T *)job->w + r * job->w_ld : NULL;
        const T *pw = job->pw ? (const T *)job->pw + r * job->pw_ld : NULL;
        const T *go = job->gout ? (const T *)job->gout + r * job->gout_ld : NULL;
        T *lo = job->loss_out ? (T *)job->loss_out + r * job->loss_ld : NULL;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
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
        const T *t = (const T *)job->t + r * job->t_ld;
        const T *w = job->w ? (const T *)job->w + r * job->w_ld : NULL;
        const T *pw = job->pw ? (const T *)job->pw + r * job->pw_ld : NULL;
        const T *go = job->gout ? (const T *)job->gout + r * job->gout_ld : NULL;
        T *lo = job->loss_out ? (T *)job->loss_out + r * job->loss_ld : NULL;
        XT *out = job->out ? (XT *)job->out + r * job->out_ld : NULL;
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

#if !X16
static void KFN(expm_array)(const XT *x, T *y, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) STORE(y + i, EXPM(XLOAD(x + i)));
    if (i < n) STORE_TAIL(y + i, EXPM(XLOAD_TAIL(x + i, n - i, 0)), n - i);
}

#endif /* !X16 */

#undef LOAD
#undef LOAD_TAIL
#undef STORE
#undef STORE_TAIL
#undef SPLAT
#undef SEL
#undef VMAX
#undef HSUM
#undef HMAX
#undef EXPM
#undef ACC
#undef AINIT
#undef AGET
#undef AADD
#undef AMAX
#undef ACCW
#undef AWINIT
#undef AWGET
#undef AWADD
#undef CHUNK
#undef FX_LANES
#undef PF_BYTES
#undef SMALL_C
