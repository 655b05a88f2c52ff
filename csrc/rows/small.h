/*
 * rows/small.h - small rows (n <= SMALL_C, see NM(small)): one row per
 * lane. A row of 10 classes fills a vector badly and pays the per-row
 * costs (horizontal sums, tails) for little work; instead VL rows are
 * transposed into buf (column c of the group at buf + c*VL) and every step
 * runs lanewise over rows, sums accumulating in double. Each lane's
 * arithmetic is independent of the others, so a row's result does not
 * depend on which rows share its group (and so not on the thread count).
 * The families' small-row kernels (ce.h, softmax.h) are built from these
 * pieces.
 */
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
#if defined(__AVX512F__)
            if (c > 0 && n - c <= 4 && fx_tile_by_lanes(lds)) {
                fx_tile_gather16(xs + c, lds, n - c, buf + c * VL);
                break;
            }
#endif
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
#if defined(__AVX512F__)
            if (c > 0 && n - c <= 2 && fx_tile_by_lanes(lds)) {
                fx_tile_scatter16(buf + c * VL, n - c, os + c, lds);
                break;
            }
#endif
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
            const V e0 = EXPS(LOAD(buf + c * VL) - m), e1 = EXPS(LOAD(buf + (c + 1) * VL) - m);
            acc = AWADD(acc, __builtin_convertvector(e0 + e1, VW));
        }
        if (c < n) acc = AWADD(acc, __builtin_convertvector(EXPS(LOAD(buf + c * VL) - m), VW));
    }
    *s = AWGET(acc);
    return m;
}

/* small_stats (no q) of two groups at once, a and b, with the same
   operations lane for lane: each group's result has small_stats' bits.
   A group's max -> exp -> sum -> log chain is longer than the window of
   work the core can look ahead over; two independent groups in one loop
   fill the gaps in each other's chains. */
FX_INLINE void NM(small_stats2)(const T *ba, const T *bb, int64_t n, V *ma, V *mb, VW *sa,
                                VW *sb, T *ea, T *eb)
{
    ACC a0 = AINIT(SPLAT(-INFINITY)), a1 = a0, b0 = a0, b1 = a0;
    int64_t c = 0;
    for (; c + 2 <= n; c += 2) {
        a0 = AMAX(a0, LOAD(ba + c * VL));
        b0 = AMAX(b0, LOAD(bb + c * VL));
        a1 = AMAX(a1, LOAD(ba + (c + 1) * VL));
        b1 = AMAX(b1, LOAD(bb + (c + 1) * VL));
    }
    if (c < n) {
        a0 = AMAX(a0, LOAD(ba + c * VL));
        b0 = AMAX(b0, LOAD(bb + c * VL));
    }
    const V m = AGET(AMAX(a0, AGET(a1))), mq = AGET(AMAX(b0, AGET(b1)));
    ACCW acc = AWINIT(__builtin_convertvector(SPLAT(0), VW)), bcc = acc;
    for (c = 0; c + 2 <= n; c += 2) {
        const V za0 = LOAD(ba + c * VL) - m, za1 = LOAD(ba + (c + 1) * VL) - m;
        const V zb0 = LOAD(bb + c * VL) - mq, zb1 = LOAD(bb + (c + 1) * VL) - mq;
        const V e0 = ea ? EXPM(za0) : EXPS(za0), e1 = ea ? EXPM(za1) : EXPS(za1);
        const V f0 = ea ? EXPM(zb0) : EXPS(zb0), f1 = ea ? EXPM(zb1) : EXPS(zb1);
        if (ea) {
            STORE(ea + c * VL, e0);
            STORE(ea + (c + 1) * VL, e1);
            STORE(eb + c * VL, f0);
            STORE(eb + (c + 1) * VL, f1);
        }
        acc = AWADD(acc, __builtin_convertvector(e0 + e1, VW));
        bcc = AWADD(bcc, __builtin_convertvector(f0 + f1, VW));
    }
    if (c < n) {
        const V za = LOAD(ba + c * VL) - m, zb = LOAD(bb + c * VL) - mq;
        const V e0 = ea ? EXPM(za) : EXPS(za), f0 = ea ? EXPM(zb) : EXPS(zb);
        if (ea) {
            STORE(ea + c * VL, e0);
            STORE(eb + c * VL, f0);
        }
        acc = AWADD(acc, __builtin_convertvector(e0, VW));
        bcc = AWADD(bcc, __builtin_convertvector(f0, VW));
    }
    *ma = m;
    *mb = mq;
    *sa = AWGET(acc);
    *sb = AWGET(bcc);
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
   so one NaN test of their sum tells (a mask compare on AVX-512 float32,
   a tree sum elsewhere). */
FX_INLINE int NM(finite_group)(V m, VW sv)
{
    const V t = (m - m) + __builtin_convertvector(sv, V);
#if defined(__AVX512F__) && VL == 16
    if (sizeof(T) == 4) { /* one compare to a mask, not a tree */
        __m512 v;
        memcpy(&v, &t, sizeof v);
        return !_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
#endif
    return !isnan(HSUM(t));
}

/* Lanewise integer equality by native parts (vec.h's fx_lt/fx_eq rule:
   GCC scalarises comparisons of vectors wider than the ISA's). Defined
   once for all dtypes. */
#ifndef FX_SMALL_ONCE
#define FX_SMALL_ONCE
FX_DEFINE_CMP(i32, fx_vi32, fx_vi32, fx_ni32, fx_ni32, sm_eq, ==)
FX_DEFINE_CMP(i64, fx_vi64, fx_vi64, fx_ni64, fx_ni64, sm_eq, ==)
#endif

/* The labels of a full group as lanes of VI (int32 for float32 compute,
   int64 for float64), to *lv; whether none of them is ignore_index. Labels
   are in range or ignore_index (the caller's check), so every label that
   is not ignore_index fits in an int32 lane. */
FX_INLINE int NM(group_labels)(const int64_t *lab, int64_t ig, VI *lv)
{
    typedef int64_t l64 __attribute__((vector_size(VL * 8)));
    l64 l;
    memcpy(&l, lab, sizeof l);
    *lv = __builtin_convertvector(l, VI);
#if defined(__AVX512F__) && VL == 16
    /* One compare of the int32 lanes (GCC made the loop below 16 scalar
       compares): a lane is ig exactly when its label is, labels being in
       [0, n) or ig, if ig fits. */
    if (ig == (int32_t)ig) {
        __m512i v;
        memcpy(&v, lv, sizeof v);
        return !_mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32((int32_t)ig));
    }
#endif
    int bad = 0;
    for (int j = 0; j < VL; j++) bad |= lab[j] == ig;
    return !bad;
}

/* Lanes of VI equal to c. */
FX_INLINE VI NM(label_is)(VI lv, int64_t c)
{
#if VL == 16
    const VI cv = (VI){0} + (int32_t)c; /* a broadcast (a lane loop was not) */
    return fx_sm_eq_i32(lv, cv);
#else
    const VI cv = (VI){0} + c;
    return fx_sm_eq_i64(lv, cv);
#endif
}

/* x_y of every lane of a group, lv its labels (each in [0, n)): each
   column's lanes whose label is c. An exact copy, as the scalar
   gather it replaces (16 dependent loads, index arithmetic and stores to
   a small array, then a reload that waited for them: 12 instructions per
   row, more than the row's log). */
#define SMALL_SELECT 16
FX_INLINE V NM(group_xy)(const T *buf, int64_t n, VI lv)
{
#if defined(__AVX512F__) && VL == 16
    /* One gather from the group's buffer (lane j's at lv[j] * VL + j) in
       place of n compares and selects. */
    if (sizeof(T) == 4) {
        __m512i v;
        memcpy(&v, &lv, sizeof v);
        const __m512i idx = _mm512_add_epi32(
            _mm512_slli_epi32(v, 4),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        const __m512 g = _mm512_i32gather_ps(idx, (const float *)buf, 4);
        V r;
        memcpy(&r, &g, sizeof r);
        return r;
    }
#endif
    /* The running value is an accumulator (see FX_DEFINE_ACC), and the
       max of one value and -infs is that value, bit for bit (-0 too). */
    if (n > SMALL_SELECT) {
        T xy[VL];
        for (int64_t j = 0; j < VL; j++) xy[j] = buf[lv[j] * VL + j];
        return LOAD(xy);
    }
    const V ninf = SPLAT(-INFINITY);
    ACC a = AINIT(ninf);
    for (int64_t c = 0; c < n; c++)
        a = AMAX(a, SEL(NM(label_is)(lv, c), LOAD(buf + c * VL), ninf));
    return AGET(a);
}

/* Whether a full group is plain as far as its labels and statistics go:
   every row labelled (no ignore_index), every m finite, no s NaN; if so,
   the labels to *lv and x_y of each lane to *xy. */
FX_INLINE int NM(plain_group)(const int64_t *lab, int64_t ig, const T *buf, int64_t n, V m,
                              VW sv, VI *lv, V *xy)
{
    if (!NM(group_labels)(lab, ig, lv) || !NM(finite_group)(m, sv)) return 0;
    *xy = NM(group_xy)(buf, n, *lv);
    return 1;
}
