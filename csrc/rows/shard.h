/*
 * rows/shard.h - cross entropy over a vocabulary split into shards.
 *
 * A shard holds columns [v0, v0 + n) of rows whose other columns live
 * elsewhere (another process, another block). The shard reduces each row
 * to statistics that any engine merges with a MAX and a SUM (the online
 * softmax merge, src/fastxent/_shard.py); given the merged log-sum-exp, it
 * writes its slice of the gradient with no further communication.
 *
 * FX_SHARD_STATS, one visit per row (max pass, then one exp/sum pass):
 *   IN   x          n_rows x n_cols shard logits (row r at x + r*x_ld)
 *        labels     n_rows global class indices, or ignore_index
 *        vocab_start  v0, the global class of column 0
 *        w          the shard's n_cols class weights, or NULL (all 1)
 *        smoothing  > 0: also compute the row's logit sum d (below)
 *        out        NULL, or n_rows x n_cols of T (out_ld apart) that
 *                   receives exp(x - m) (the "grad parts")
 *   OUT  row_out    n_rows x FX_SHARD_NSTATS doubles, row r at r*5:
 *                   [0] m   = max_c x_c                (NaN skipped)
 *                   [1] s   = sum_c exp(x_c - m)       (0 when m = -inf)
 *                   [2] x_y where v0 <= y < v0 + n, else 0
 *                   [3] 1 where the label is in the shard, else 0
 *                   [4] d   = sum_c w_c (x_c - m)      (0 unless smoothing)
 *
 * FX_SHARD_GRAD, one visit per row:
 *   IN   x, labels, ignore_index, vocab_start, w   as above
 *        row_in     n_rows x FX_SHARD_NIN doubles, row r at r*4:
 *                   [0] hi  = the row's global lse rounded to T
 *                   [1] k1  = gs ((1-eps) w_y + eps W / C) exp(hi - lse)
 *                   [2] k2  = gs eps / C
 *                   [3] gy  = the true class's gradient, formed in double
 *   OUT  out        n_rows x n_cols (x's storage type; may equal x):
 *                   exp(x_c - hi) k1 - k2 w_c, and gy at the label's
 *                   column where it is in the shard; 0 for ignored rows
 *
 * The statistics use cross entropy's row primitives (stats.h: row_max,
 * row_sumexp, float32 sums within chunks of FX_CHUNK and chunk totals in
 * double), and the gradient its writer (write.h: grad_write), so a shard
 * that holds the whole row gives the bits cross_entropy's own m, s and d
 * have. Rows are never split across threads (no split function). Each row is one thread's, so the
 * results do not depend on the thread count. exp(x - lse) is taken as
 * exp(x - hi) * exp(hi - lse): x - hi is exact near the row maximum, where
 * the gradient is largest, and the correction rides in k1.
 */

#ifndef FX_SHARD_NSTATS /* included once per dtype */
#define FX_SHARD_NSTATS 5
#define FX_SHARD_NIN 4
#endif

/* True if any of the n elements is NaN: tells an all-NaN row (no softmax)
   from an all -inf one (a shard that adds nothing) once row_max says -inf. */
FX_INLINE int NM(row_has_nan)(const XT *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (isnan((double)XGET(x, i))) return 1;
    return 0;
}

static void KFN(shard_stats)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols, v0 = job->vocab_start;
    const T *w = (const T *)job->w;
    const int smooth = job->smoothing > 0;
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        T *st = job->out ? (T *)job->out + r * job->out_ld : NULL;
        double *o = job->row_out + r * FX_SHARD_NSTATS;
        /* The target first: the stash may overwrite x (out == x). */
        const int64_t y = job->labels[r];
        const int in = y != job->ignore_index && y >= v0 && y - v0 < n;
        o[2] = in ? (double)XGET(x, y - v0) : 0.0;
        o[3] = in;
        const T m = NM(row_max)(x, n);
        double s, d = 0.0;
        if (isfinite(m)) {
            s = NM(row_sumexp)(x, w, n, m, smooth ? &d : NULL, st, NM(next_row)(job, r, r1));
        } else if (m == -INFINITY && !NM(row_has_nan)(x, n)) {
            /* Every class of this shard has probability 0. */
            s = 0.0;
            if (smooth) {
                int any = w == NULL;
                for (int64_t c = 0; c < n && !any; c++) any = w[c] != 0;
                d = any ? -INFINITY : 0.0;
            }
            if (st) memset(st, 0, (size_t)n * sizeof(T));
        } else {
            s = d = NAN; /* +inf or all NaN: no softmax, as cross_entropy */
            if (st)
                for (int64_t c = 0; c < n; c++) st[c] = (T)NAN;
        }
        o[0] = (double)m;
        o[1] = s;
        o[4] = d;
    }
}

static void KFN(shard_grad)(const fx_job *job, int64_t r0, int64_t r1)
{
    const int64_t n = job->n_cols, v0 = job->vocab_start;
    const T *w = (const T *)job->w;
    for (int64_t r = r0; r < r1; r++) {
        const XT *x = (const XT *)job->x + r * job->x_ld;
        XT *out = (XT *)job->out + r * job->out_ld;
        const double *p = job->row_in + r * FX_SHARD_NIN;
        const int64_t y = job->labels[r];
        if (y == job->ignore_index) {
            NM(row_zero)(out, n);
            continue;
        }
        NM(grad_write)(x, out, w, n, (T)p[0], (T)p[1], (T)p[2], NULL);
        /* out may be x: the true class from the caller's double. */
        if (y >= v0 && y - v0 < n) XSET(out, y - v0, (T)p[3]);
    }
}
