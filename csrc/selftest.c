/*
 * selftest.c - exhaustive scans of the float32 exp kernels.
 *
 * Every float32 in [lo, hi] (both <= 0) goes through the active ISA's
 * fx_expm_f32 and is compared with the C library's double exp rounded
 * error-free to a double: the error is measured in ulp of the exact result
 * as a float32. A second scan counts where fx_expsum_f32 differs from
 * fx_expm_f32 bit for bit. Each takes a few seconds on two cores, so the
 * tests run them.
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

/* What a scan's blocks leave: the largest error and where (the exp's
   accuracy), and the mismatches and the largest x among them (fx_expsum
   against fx_expm), for floats in [lo, hi]. */
typedef struct scan_acc {
    float lo, hi;
    double worst;
    float worst_x;
    int64_t count;
    float last;
} scan_acc;

typedef void (*scan_fn)(const float *xs, int64_t k, scan_acc *acc);

/* Every float of bit patterns [b0, b1], SCAN_BLOCK at a time in bit
   order, through fn, the blocks shared among threads; each thread's
   findings merge into *acc. */
static void scan(uint32_t b0, uint32_t b1, scan_fn fn, scan_acc *acc)
{
    const int64_t count = (int64_t)b1 - (int64_t)b0 + 1;
    const int64_t nblocks = (count + SCAN_BLOCK - 1) / SCAN_BLOCK;
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        float xs[SCAN_BLOCK];
        scan_acc mine = {acc->lo, acc->hi, 0.0, 0.0f, 0, -INFINITY};
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t i0 = blk * SCAN_BLOCK;
            const int64_t k = count - i0 < SCAN_BLOCK ? count - i0 : SCAN_BLOCK;
            for (int64_t j = 0; j < k; j++) xs[j] = bits_to_float((uint32_t)(b0 + i0 + j));
            fn(xs, k, &mine);
        }
#ifdef _OPENMP
#pragma omp critical
#endif
        {
            if (!(mine.worst <= acc->worst)) {
                acc->worst = mine.worst;
                acc->worst_x = mine.worst_x;
            }
            acc->count += mine.count;
            if (mine.last > acc->last) acc->last = mine.last;
        }
    }
}

static void expm_block(const float *xs, int64_t k, scan_acc *acc)
{
    float ys[SCAN_BLOCK];
    fx_expm_f32_array(xs, ys, k);
    for (int64_t j = 0; j < k; j++) {
        const double ref = exp((double)xs[j]);
        if (ref < 0x1p-126) continue; /* flushed to 0 by design */
        const double err = fabs((double)ys[j] - ref) / ulp_f32(ref);
        if (!(err <= acc->worst)) {
            acc->worst = err;
            acc->worst_x = xs[j];
        }
    }
}

double fx_expm_f32_max_ulp(float lo, float hi, float *worst_x)
{
    /* Negative floats: larger magnitude, larger bit pattern. */
    uint32_t b_hi, b_lo;
    const float nlo = -fabsf(lo), nhi = -fabsf(hi); /* 0 becomes -0 */
    memcpy(&b_hi, &nlo, sizeof b_hi); /* most negative */
    memcpy(&b_lo, &nhi, sizeof b_lo); /* closest to zero */
    scan_acc acc = {nlo, nhi, 0.0, 0.0f, 0, -INFINITY};
    scan(b_lo, b_hi, expm_block, &acc);
    if (worst_x) *worst_x = acc.worst_x;
    return acc.worst;
}

static void expsum_block(const float *xs, int64_t k, scan_acc *acc)
{
    float ys[SCAN_BLOCK], zs[SCAN_BLOCK];
    fx_expm_f32_array(xs, ys, k);
    fx_expsum_f32_array(xs, zs, k);
    for (int64_t j = 0; j < k; j++)
        if (xs[j] >= acc->lo && xs[j] <= acc->hi && memcmp(&ys[j], &zs[j], sizeof ys[j]) != 0) {
            acc->count++;
            if (xs[j] > acc->last) acc->last = xs[j];
        }
}

int64_t fx_expsum_f32_mismatches(float lo, float hi, float *last_x)
{
    scan_acc acc = {lo, hi, 0.0, 0.0f, 0, -INFINITY};
    uint32_t b;
    if (lo < 0) { /* -0 up to lo, the most negative */
        memcpy(&b, &lo, sizeof b);
        scan(0x80000000u, b, expsum_block, &acc);
    }
    if (hi >= 0) { /* +0 up to hi */
        memcpy(&b, &hi, sizeof b);
        scan(0u, b, expsum_block, &acc);
    }
    if (last_x) *last_x = acc.last;
    return acc.count;
}
