/*
 * ce_opts.h - cross entropy rows with the language-model options: soft-
 * capping, z-loss, per-row factors, and the row statistics (lse, argmax).
 *
 * Job fields (fx_ce_opts_job below):
 *   IN   x        n_rows x n_cols logits, row r at x + r * x_ld (float or double)
 *        labels   n_rows class indices in [0, n_cols) or ignore_index; or NULL
 *        t        soft labels, same geometry as x (rows t_ld apart), when labels is NULL
 *        w        n_cols class weights or NULL (all 1); w_sum their sum
 *        eps      label smoothing in [0, 1]
 *        softcap  > 0: the logits become softcap * tanh(x / softcap); 0: as given
 *        z_loss   >= 0: adds z_loss * lse^2 to each counted row
 *        ce_scale, z_scale
 *                 per-row factors (row r at [r]) of the gradient of the cross
 *                 entropy part and of the z-loss part; NULL: no gradient
 *   OUT  grad     n_rows x n_cols, rows grad_ld apart, may be x itself (in
 *                 place); written when ce_scale is not NULL
 *        ce       n_rows: the cross entropy of the row (class-weighted, 0 when
 *                 ignored), float64
 *        lse      n_rows: log-sum-exp of the (soft-capped) logits, float64
 *        argmax   n_rows: the index of the largest logit, the lowest on ties
 *                 (the first NaN if any, as NumPy), int64
 *
 * One visit to the row computes, per element, the soft-capped logit z, the
 * running max and sum of exponentials (online softmax: the sum is rescaled
 * when the max grows), the argmax and the sums the loss needs; z is kept in
 * grad.  The second visit, for the gradient only, reads z back and writes
 *   g = (ce_scale * sum(coef) + 2 * z_scale * z_loss * lse) * exp(z - lse)
 *       - ce_scale * coef,
 * times dz/dx = 1 - (z / softcap)^2 under soft-capping.  coef is the
 * label's distribution times the class weights (smoothing included): for a
 * hard label eps/C * w_c plus (1 - eps) * w_y at the label.  Ignored rows
 * get lse and argmax, a zero loss and a zero gradient.  Each row is computed
 * by one thread with the same loop whatever the thread count; sums are in
 * double, per-row results float64.
 */
#ifndef FASTXENT_ROWS_CE_OPTS_H
#define FASTXENT_ROWS_CE_OPTS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fx_ce_opts_job {
    int64_t n_rows, n_cols;
    const void *x;
    int64_t x_ld;
    const int64_t *labels;
    int64_t ignore_index;
    const void *t;
    int64_t t_ld;
    const void *w;
    double w_sum, eps, softcap, z_loss;
    const double *ce_scale, *z_scale;
    void *grad;
    int64_t grad_ld;
    double *ce, *lse;
    int64_t *argmax;
} fx_ce_opts_job;

#define FX_CE_OPTS_ROWS(NAME, T)                                                           \
static void NAME(const fx_ce_opts_job *job, int64_t r0, int64_t r1)                       \
{                                                                                          \
    const int64_t C = job->n_cols;                                                         \
    const T *w = (const T *)job->w;                                                        \
    const double cap = job->softcap, eps = job->eps, ec = eps / (double)C;                 \
    for (int64_t r = r0; r < r1; r++) {                                                    \
        const T *x = (const T *)job->x + r * job->x_ld;                                    \
        const T *t = job->t ? (const T *)job->t + r * job->t_ld : NULL;                    \
        T *g = job->ce_scale ? (T *)job->grad + r * job->grad_ld : NULL;                   \
        const int64_t y = job->labels ? job->labels[r] : -1;                               \
        const int counted = !job->labels || y != job->ignore_index;                        \
        /* first visit: z, online max and sum, argmax, the loss sums */                    \
        double m = -INFINITY, s = 0.0, bx = -INFINITY, zy = 0.0;                           \
        double wz = 0.0, csum = 0.0, cz = 0.0; /* sum w z; soft: sum coef, sum coef z */   \
        int64_t bi = 0;                                                                    \
        for (int64_t c = 0; c < C; c++) {                                                  \
            const double xv = (double)x[c];                                                \
            if (xv > bx || (xv != xv && bx == bx)) { bx = xv; bi = c; }                    \
            const double z = cap > 0 ? cap * tanh(xv / cap) : xv;                          \
            if (g) g[c] = (T)z;                                                            \
            if (z > m) { s = s * exp(m - z) + 1.0; m = z; }                                \
            else if (z != -INFINITY || z != z) s += exp(z - m);                            \
            const double wc = w ? (double)w[c] : 1.0;                                      \
            if (t) {                                                                       \
                const double k = wc * ((1.0 - eps) * (double)t[c] + ec);                   \
                csum += k;                                                                 \
                if (k != 0) cz += k * z;                                                   \
            } else {                                                                       \
                if (eps > 0 && wc != 0) wz += wc * z;                                      \
                if (c == y) zy = z;                                                        \
            }                                                                              \
        }                                                                                  \
        const double lse = (m == m && fabs(m) != INFINITY) ? m + log(s) : m;               \
        double ce = 0.0, wy = 0.0;                                                         \
        if (t) {                                                                           \
            ce = csum * lse - cz;                                                          \
        } else if (counted) {                                                              \
            wy = w ? (double)w[y] : 1.0;                                                   \
            csum = (1.0 - eps) * wy + ec * job->w_sum;                                     \
            const double c1 = (1.0 - eps) * wy;                                            \
            ce = (c1 == 0 && zy == -INFINITY && s == s) ? 0.0 : c1 * (lse - zy);           \
            if (eps > 0) ce += ec * (job->w_sum * lse - wz);                               \
        }                                                                                  \
        job->ce[r] = counted ? ce : 0.0;                                                   \
        job->lse[r] = lse;                                                                 \
        job->argmax[r] = bi;                                                               \
        if (!g) continue;                                                                  \
        if (!counted) {                                                                    \
            for (int64_t c = 0; c < C; c++) g[c] = 0;                                      \
            continue;                                                                      \
        }                                                                                  \
        /* second visit: the gradient from the stashed z */                                \
        const double a = job->ce_scale[r];                                                 \
        const double A = a * csum + 2.0 * job->z_scale[r] * job->z_loss * lse;             \
        for (int64_t c = 0; c < C; c++) {                                                  \
            const double z = (double)g[c];                                                 \
            const double wc = w ? (double)w[c] : 1.0;                                      \
            const double k = t ? wc * ((1.0 - eps) * (double)t[c] + ec)                    \
                               : ec * wc + (c == y ? (1.0 - eps) * wy : 0.0);              \
            double gc = A * exp(z - lse) - a * k;                                          \
            if (cap > 0) gc *= 1.0 - (z / cap) * (z / cap);                                \
            g[c] = (T)gc;                                                                  \
        }                                                                                  \
    }                                                                                      \
}

FX_CE_OPTS_ROWS(fx_ce_opts_rows_f32, float)
FX_CE_OPTS_ROWS(fx_ce_opts_rows_f64, double)

#endif
