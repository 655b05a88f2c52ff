/*
 * jsd.h - rows of Liger-Kernel's generalised Jensen-Shannon divergence.
 *
 * Job fields (fx_jsd_job below):
 *   IN   x        n_rows x n_cols student logits, row r at x + r * x_ld
 *        t        the teacher, same geometry (rows t_ld apart), as logits
 *                 (kind FX_JSD_LOGITS), log-probabilities or probabilities
 *        labels   n_rows labels or NULL; a row whose label is ignore_index
 *                 counts nothing (loss 0, gradient 0)
 *        beta     in [0, 1]; temperature T > 0
 *        gscale   n_rows factors of the gradient (row r at [r]), or NULL: no
 *                 gradient
 *   OUT  loss     n_rows: T^2 * the row's divergence, float64
 *        grad     n_rows x n_cols, rows grad_ld apart (may be x itself):
 *                 gscale[r] * d(loss_r)/d(x_r)
 *
 * With X = log Q = log_softmax(x / T), Y = log P the teacher and
 * M = beta Q + (1 - beta) P, a row's divergence and the gradient with
 * respect to X (Liger's dX) are
 *   beta = 0:  sum P (Y - X)                         dX = -P
 *   beta = 1:  sum Q (X - Y)                         dX = Q (X - Y) + Q
 *   else:      sum beta Q X + (1-beta) P Y - M log M dX = beta Q (X - log M)
 * (0 log 0 = 0 throughout), and through the log-softmax
 *   d(loss)/dx = T (dX - Q sum(dX)).
 * Three visits to the row: the maxima and sums of exponentials of x / T
 * (and of t / T for teacher logits); the loss and sum(dX); the gradient,
 * recomputed from x and t so that it may overwrite x.  Sums in double.
 */
#ifndef FASTXENT_ROWS_JSD_H
#define FASTXENT_ROWS_JSD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

enum { FX_JSD_LOGITS = 0, FX_JSD_LOG_PROBS = 1, FX_JSD_PROBS = 2 };

typedef struct fx_jsd_job {
    int64_t n_rows, n_cols;
    const void *x;
    int64_t x_ld;
    const void *t;
    int64_t t_ld;
    int kind;
    const int64_t *labels;
    int64_t ignore_index;
    double beta, temperature;
    const double *gscale;
    void *grad;
    int64_t grad_ld;
    double *loss;
} fx_jsd_job;

/* log-sum-exp of v[c] * inv_t, one visit (online max and sum). */
#define FX_JSD_LSE(T_, v, C, inv_t, out)                                                  \
    do {                                                                                   \
        double m_ = -INFINITY, s_ = 0.0;                                                   \
        for (int64_t c = 0; c < (C); c++) {                                                \
            const double z_ = (double)(v)[c] * (inv_t);                                    \
            if (z_ > m_) { s_ = s_ * exp(m_ - z_) + 1.0; m_ = z_; }                        \
            else if (z_ != -INFINITY || z_ != z_) s_ += exp(z_ - m_);                      \
        }                                                                                  \
        (out) = (m_ == m_ && fabs(m_) != INFINITY) ? m_ + log(s_) : m_;                    \
    } while (0)

/* term and dX of one class from X = log q and Y = log p. */
static inline void fx_jsd_term(double X, double Y, double beta, double *term, double *dx)
{
    const double q = exp(X), p = exp(Y);
    if (beta == 0.0) {
        *term = p != 0 ? p * (Y - X) : 0.0;
        *dx = -p;
    } else if (beta == 1.0) {
        *term = q != 0 ? q * (X - Y) : 0.0;
        *dx = q != 0 ? q * (X - Y) + q : 0.0;
    } else {
        const double m = beta * q + (1.0 - beta) * p, lm = log(m);
        *term = (q != 0 ? beta * q * X : 0.0) + (p != 0 ? (1.0 - beta) * p * Y : 0.0)
                - (m != 0 ? m * lm : 0.0);
        *dx = q != 0 ? beta * q * (X - lm) : 0.0;
    }
}

#define FX_JSD_ROWS(NAME, T_)                                                              \
static void NAME(const fx_jsd_job *job, int64_t r0, int64_t r1)                           \
{                                                                                          \
    const int64_t C = job->n_cols;                                                         \
    const double T = job->temperature, inv_t = 1.0 / T;                                    \
    for (int64_t r = r0; r < r1; r++) {                                                    \
        const T_ *x = (const T_ *)job->x + r * job->x_ld;                                  \
        const T_ *t = (const T_ *)job->t + r * job->t_ld;                                  \
        T_ *g = job->gscale ? (T_ *)job->grad + r * job->grad_ld : NULL;                   \
        if (job->labels && job->labels[r] == job->ignore_index) {                          \
            job->loss[r] = 0.0;                                                            \
            if (g) for (int64_t c = 0; c < C; c++) g[c] = 0;                               \
            continue;                                                                      \
        }                                                                                  \
        double lx, lt = 0.0;                                                               \
        FX_JSD_LSE(T_, x, C, inv_t, lx);                                                   \
        if (job->kind == FX_JSD_LOGITS) FX_JSD_LSE(T_, t, C, inv_t, lt);                   \
        double sum = 0.0, sdx = 0.0, term, dx;                                             \
        for (int64_t c = 0; c < C; c++) {                                                  \
            const double X = (double)x[c] * inv_t - lx;                                    \
            const double Y = job->kind == FX_JSD_LOGITS ? (double)t[c] * inv_t - lt        \
                           : job->kind == FX_JSD_LOG_PROBS ? (double)t[c] : log((double)t[c]); \
            fx_jsd_term(X, Y, job->beta, &term, &dx);                                      \
            sum += term;                                                                   \
            sdx += dx;                                                                     \
        }                                                                                  \
        job->loss[r] = T * T * sum;                                                        \
        if (!g) continue;                                                                  \
        const double k = job->gscale[r] * T;                                               \
        for (int64_t c = 0; c < C; c++) {                                                  \
            const double X = (double)x[c] * inv_t - lx;                                    \
            const double Y = job->kind == FX_JSD_LOGITS ? (double)t[c] * inv_t - lt        \
                           : job->kind == FX_JSD_LOG_PROBS ? (double)t[c] : log((double)t[c]); \
            fx_jsd_term(X, Y, job->beta, &term, &dx);                                      \
            g[c] = (T_)(k * (dx - exp(X) * sdx));                                          \
        }                                                                                  \
    }                                                                                      \
}

FX_JSD_ROWS(fx_jsd_rows_f32, float)
FX_JSD_ROWS(fx_jsd_rows_f64, double)

#endif
