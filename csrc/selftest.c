/*
 * selftest.c - exhaustive accuracy scan of the float32 exp kernel.
 *
 * Every float32 in [lo, hi] (both <= 0) goes through the active ISA's
 * fx_expm_f32 and is compared with the C library's double exp rounded
 * error-free to a double: the error is measured in ulp of the exact result
 * as a float32. Takes a few seconds on two cores, so the tests run it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fastxent.h"

#define SCAN_BLOCK 4096

static float bits_to_float(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* ulp of a float32 value v > 0: the gap to the next float up. */
static double ulp_f32(double v)
{
    const float f = (float)v;
    return (double)nextafterf(f, INFINITY) - (double)f;
}

double fx_expm_f32_max_ulp(float lo, float hi, float *worst_x)
{
    /* Negative floats: larger magnitude, larger bit pattern. */
    uint32_t b_hi, b_lo;
    const float nlo = -fabsf(lo), nhi = -fabsf(hi); /* 0 becomes -0 */
    memcpy(&b_hi, &nlo, sizeof b_hi); /* most negative */
    memcpy(&b_lo, &nhi, sizeof b_lo); /* closest to zero */
    const int64_t first = b_lo, count = (int64_t)b_hi - (int64_t)b_lo + 1;
    const int64_t nblocks = (count + SCAN_BLOCK - 1) / SCAN_BLOCK;
    double worst = 0.0;
    float wx = 0.0f;
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        float xs[SCAN_BLOCK], ys[SCAN_BLOCK];
        double my_worst = 0.0;
        float my_x = 0.0f;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t i0 = blk * SCAN_BLOCK;
            const int64_t k = count - i0 < SCAN_BLOCK ? count - i0 : SCAN_BLOCK;
            for (int64_t j = 0; j < k; j++) xs[j] = bits_to_float((uint32_t)(first + i0 + j));
            fx_expm_f32_array(xs, ys, k);
            for (int64_t j = 0; j < k; j++) {
                const double ref = exp((double)xs[j]);
                if (ref < 0x1p-126) continue; /* flushed to 0 by design */
                const double err = fabs((double)ys[j] - ref) / ulp_f32(ref);
                if (!(err <= my_worst)) {
                    my_worst = err;
                    my_x = xs[j];
                }
            }
        }
#ifdef _OPENMP
#pragma omp critical
#endif
        {
            if (!(my_worst <= worst)) {
                worst = my_worst;
                wx = my_x;
            }
        }
    }
    if (worst_x) *worst_x = wx;
    return worst;
}

/* Bit patterns [b0, b1] whose floats lie in [lo, hi]: mismatches of
   fx_expsum_f32 against fx_expm_f32. */
static int64_t expsum_scan(uint32_t b0, uint32_t b1, float lo, float hi, float *last)
{
    const int64_t count = (int64_t)b1 - (int64_t)b0 + 1;
    const int64_t nblocks = (count + SCAN_BLOCK - 1) / SCAN_BLOCK;
    int64_t total = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(+ : total)
#endif
    {
        float xs[SCAN_BLOCK], ys[SCAN_BLOCK], zs[SCAN_BLOCK];
        float my_last = -INFINITY;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t i0 = blk * SCAN_BLOCK;
            const int64_t k = count - i0 < SCAN_BLOCK ? count - i0 : SCAN_BLOCK;
            for (int64_t j = 0; j < k; j++) xs[j] = bits_to_float((uint32_t)(b0 + i0 + j));
            fx_expm_f32_array(xs, ys, k);
            fx_expsum_f32_array(xs, zs, k);
            for (int64_t j = 0; j < k; j++)
                if (xs[j] >= lo && xs[j] <= hi && memcmp(&ys[j], &zs[j], sizeof ys[j]) != 0) {
                    total++;
                    if (xs[j] > my_last) my_last = xs[j];
                }
        }
#ifdef _OPENMP
#pragma omp critical
#endif
        {
            if (my_last > *last) *last = my_last;
        }
    }
    return total;
}

int64_t fx_expsum_f32_mismatches(float lo, float hi, float *last_x)
{
    float last = -INFINITY;
    int64_t total = 0;
    uint32_t b;
    if (lo < 0) { /* -0 up to lo, the most negative */
        memcpy(&b, &lo, sizeof b);
        total += expsum_scan(0x80000000u, b, lo, hi, &last);
    }
    if (hi >= 0) { /* +0 up to hi */
        memcpy(&b, &hi, sizeof b);
        total += expsum_scan(0u, b, lo, hi, &last);
    }
    if (last_x) *last_x = last;
    return total;
}
