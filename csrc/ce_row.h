/*
 * ce_row.h - the per-row scalars of cross entropy with an integer label.
 *
 * From the row's max m, sum s = sum_c exp(x_c - m), log(s) and, with label
 * smoothing, d = sum_c w_c (x_c - m):
 *   loss = (1-eps) w_y (log s - (x_y - m)) + eps/C (W log s - d)
 *   gradient = exp(x - m) k1 - k2 w, except at the true class: gy
 * The row, small-row and split-row kernels all take them from here. The
 * row and split-row kernels pass exp(x_y - m) from libm, the small-row
 * kernel from the vector kernel (a whole group at once): each path is
 * deterministic and the same on every ISA, but the last bit of the true
 * class's gradient may differ between a row short enough for the
 * small-row kernel and a longer one.
 */
#ifndef FASTXENT_CE_ROW_H
#define FASTXENT_CE_ROW_H

#include <math.h>
#include <stdint.h>

typedef struct fx_ce_row {
    double loss, k1, k2, gy;
} fx_ce_row;

/* exy = exp(x_y - m), used only when grad is set: the small-row kernels
   evaluate it for a whole group of rows at once. */
static inline fx_ce_row fx_ce_hard_row_e(double xy, double wy, double m, double s, double logs,
                                         double d, double eps, int64_t n, double W, double gs,
                                         int grad, double exy)
{
    const double ec = eps / (double)n, c1 = (1.0 - eps) * wy;
    fx_ce_row o = {0.0, 0.0, 0.0, 0.0};
    /* A true class of coefficient 0 (eps == 1, or weight 0) costs 0 even at
       x_y = -inf (0 log 0 = 0); a NaN s (undefined softmax) still poisons. */
    o.loss = (c1 == 0 && xy == -INFINITY && !isnan(s)) ? 0.0 : c1 * (logs - (xy - m));
    if (eps > 0) o.loss += ec * (W * logs - d);
    if (grad) {
        const double A = c1 + ec * W;
        o.k1 = gs * A / s;
        o.k2 = gs * ec;
        /* p_y - 1 formed in double from x_y, before any rounding. */
        o.gy = gs * (exy / s * A - c1 - ec * wy);
    }
    return o;
}

static inline fx_ce_row fx_ce_hard_row(double xy, double wy, double m, double s, double logs,
                                       double d, double eps, int64_t n, double W, double gs,
                                       int grad)
{
    return fx_ce_hard_row_e(xy, wy, m, s, logs, d, eps, n, W, gs, grad,
                            grad ? exp(xy - m) : 0.0);
}

#endif
