/*
 * rows/write.h - the output writers: every N x C output of the row kernels
 * (log-softmax, softmax, gradients) is written by one of these, and the
 * lanewise arithmetic they share with the small-row kernels is here once.
 */

/* log-softmax, lanewise: (x - m) - l. Subtracting the max first keeps
   x_c - m exact for the largest logits, where the log-probabilities matter
   most. */
FX_INLINE V NM(lsm_v)(V x, V m, V l)
{
    return (x - m) - l;
}

/* A gradient (or softmax), lanewise: e k1 - k2 w (w NULL: e k1 - k2). */
FX_INLINE V NM(grad_v)(V e, V k1, V k2, const V *w)
{
    return w ? e * k1 - k2 * *w : e * k1 - k2;
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
#endif

/* The one log-softmax writer: out_c = (x_c - m) - l over [0, n). stream
   (float32/float64 only): streaming stores from the first 64-byte boundary
   of out; the scalar head and tail use the same expression, so the bits
   match the cached stores. */
FX_INLINE void NM(lsm_write)(const XT *x, XT *out, int64_t n, T m, T l, int stream)
{
    const V vm = SPLAT(m), vl = SPLAT(l);
    int64_t i = 0;
#if !X16
    if (stream) {
        while (i < n && ((uintptr_t)(out + i) & (FX_VBYTES - 1)) != 0) {
            out[i] = (x[i] - m) - l;
            i++;
        }
        for (; i + VL <= n; i += VL) SFX(fx_stream)(out + i, NM(lsm_v)(LOAD(x + i), vm, vl));
        for (; i < n; i++) out[i] = (x[i] - m) - l;
        return;
    }
#endif
    (void)stream;
    for (; i + VL <= n; i += VL) XSTORE(out + i, NM(lsm_v)(XLOAD(x + i), vm, vl));
    if (i < n) XSTORE_TAIL(out + i, NM(lsm_v)(XLOAD_TAIL(x + i, n - i, 0), vm, vl), n - i);
}

/* The one gradient writer: out_c = e_c k1 - k2 w_c (w NULL: - k2) over
   [0, n), with e_c = exp(x_c - m) computed here (st NULL), or already in
   st, where row_sumexp kept it: one exp per element instead of two. st is
   out itself for float32/float64 and a float32 row for 16-bit out, which
   cannot hold the exponentials losslessly. out (and st) may equal x: each
   element is read before it is written. Callers pass NULL as a constant,
   so each use compiles to one loop. */
FX_INLINE void NM(grad_write)(const XT *x, XT *out, const T *w, int64_t n, T m, T k1, T k2,
                              const T *st)
{
    const V vm = SPLAT(m), v1 = SPLAT(k1), v2 = SPLAT(k2);
    FX_LANES(i, 0, n, k, {
        V e;
        if (st) e = k == VL ? LOAD(st + i) : LOAD_TAIL(st + i, k, 0);
        else e = EXPM((k == VL ? XLOAD(x + i) : XLOAD_TAIL(x + i, k, -INFINITY)) - vm);
        V wv = vm;
        if (w) wv = k == VL ? LOAD(w + i) : LOAD_TAIL(w + i, k, 0);
        const V g = NM(grad_v)(e, v1, v2, w ? &wv : NULL);
        if (k == VL) XSTORE(out + i, g);
        else XSTORE_TAIL(out + i, g, k);
    });
}

/* grad_write for a one-pass row (row_lse1 with st): group g's exponentials in
   st are exp(x - bases[g]), so its coefficient is k1 rescaled from the row
   base B (fx_lse_rescale); rounded as the split driver rounds it. */
FX_INLINE void NM(group_write)(const XT *x, XT *out, const T *w, int64_t n, T B, const T *bases,
                               double k1, double k2, const T *st)
{
    /* Always a stash: said, so that grad_write's loop drops its exp branch
       (kept, it cost AVX2 softmax rows of 1000-32000 float32 classes
       1.45-1.5x the time: GCC then reloaded the stash through the stack
       in pieces that could not be forwarded). */
    if (!st) __builtin_unreachable();
    for (int64_t g0 = 0; g0 < n; g0 += FX_LSE_GROUP) {
        const int64_t len = g0 + FX_LSE_GROUP < n ? FX_LSE_GROUP : n - g0;
        const double b = (double)bases[g0 / FX_LSE_GROUP];
        const T k1g = (T)fx_lse_rescale(k1, b, (double)B);
        if (w) NM(grad_write)(x + g0, out + g0, w + g0, len, (T)b, k1g, (T)k2, st + g0);
        else NM(grad_write)(x + g0, out + g0, NULL, len, (T)b, k1g, (T)k2, st + g0);
    }
}

/* The output of a row without a softmax (a +inf, NaN or all -inf row) on
   the one-pass paths: the quiet NaN everywhere. */
FX_INLINE void NM(row_nan)(XT *out, int64_t n)
{
    const V v = SPLAT(NAN);
    FX_LANES(i, 0, n, k, {
        if (k == VL) XSTORE(out + i, v);
        else XSTORE_TAIL(out + i, v, k);
    });
}

FX_INLINE void NM(row_zero)(XT *out, int64_t n)
{
    memset(out, 0, (size_t)n * sizeof(XT)); /* +0 in every storage type */
}
