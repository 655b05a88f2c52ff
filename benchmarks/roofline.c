/*
 * roofline.c - the memory and exp roofs of this machine, for the fastxent
 * benchmarks. Compiled and run by benchmarks/roofline.py (which picks the
 * flags from /proc/cpuinfo); prints one JSON object on stdout.
 *
 *   roofline <MiB per array> <repetitions> <threads> [<threads> ...]
 *
 * For each thread count T (OpenMP, static schedule, every thread on its own
 * contiguous slice, first-touched by the same thread):
 *
 *   read      s += x[i]                  one float32 array of <MiB>
 *   write     y[i] = c                   ordinary stores (the hardware
 *                                        reads each line before writing it:
 *                                        write-allocate)
 *   write_nt  y[i] = c                   streaming stores (no write-allocate),
 *                                        where the ISA has them
 *   rw        y[i] = a * x[i]            separate, pre-faulted y; ordinary
 *                                        stores: x read, y read (allocate),
 *                                        y written
 *   rw_nt     y[i] = a * x[i]            streaming stores: x read, y written
 *   read_exp  s += expm(x[i] - m)        read once from memory and
 *                                        exponentiated once: the one-pass
 *                                        row statistics' least cost
 *   exp_f32   s += expm(x[i] - m)        fx_expm_f32 of csrc/simd/expm.h on a
 *   exp_f64   s += expm(x[i] - m)        buffer in L1 (16 KiB per thread),
 *                                        exactly the inner loop of the
 *                                        fastxent sum-of-exponentials pass
 *
 * Each is timed <repetitions> times (after one untimed pass) and the median
 * kept, with its spread ((max - min) / median) and cpu_share: process CPU
 * time / (wall time x T) over the timed passes, below 1 when the threads
 * did not have their cores to themselves (a shared or busy machine). Bandwidths are reported in bytes of the arrays named above per
 * second (for rw: bytes of x plus bytes of y, the STREAM convention), exp as
 * nanoseconds per element for all T threads together.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../csrc/simd/expm.h"

#define VL32 16 /* floats in one 64-byte vector */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Process CPU time and wall time of the timed passes, for cpu_share. */
static double acc_cpu, acc_wall;

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static volatile double sink;

/* [lo, hi) of n elements (a multiple of VL32) for thread t of nt: whole
   vectors, 4 KiB-aligned slices where possible. */
static void slice(int64_t n, int t, int nt, int64_t *lo, int64_t *hi)
{
    const int64_t unit = 1024; /* floats: 4 KiB */
    const int64_t units = n / unit;
    *lo = units * t / nt * unit;
    *hi = t == nt - 1 ? n : units * (t + 1) / nt * unit;
}

static float *alloc_floats(int64_t n)
{
    void *p = NULL;
    const size_t bytes = (size_t)n * sizeof(float);
    if (posix_memalign(&p, (size_t)2 << 20, bytes) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    /* What NumPy does for large arrays on Linux. */
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return (float *)p;
}

/* ---------------------------------------------------------------- kernels */

static double k_read(const float *x, int64_t lo, int64_t hi)
{
    /* Accumulators as the kernels hold them (vec.h): in registers. */
    fx_acc_f32 a0 = fx_acc_init_f32(fx_splat_f32(0)), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = lo; i < hi; i += 4 * VL32) {
        a0 = fx_acc_add_f32(a0, fx_load_f32(x + i));
        a1 = fx_acc_add_f32(a1, fx_load_f32(x + i + VL32));
        a2 = fx_acc_add_f32(a2, fx_load_f32(x + i + 2 * VL32));
        a3 = fx_acc_add_f32(a3, fx_load_f32(x + i + 3 * VL32));
    }
    return fx_hsum_f32((fx_acc_get_f32(a0) + fx_acc_get_f32(a1)) + (fx_acc_get_f32(a2) + fx_acc_get_f32(a3)));
}

static void k_write(float *y, int64_t lo, int64_t hi, float c)
{
    const fx_vf32 v = fx_splat_f32(c);
    for (int64_t i = lo; i < hi; i += VL32) fx_store_f32(y + i, v);
}

static void k_rw(const float *x, float *y, int64_t lo, int64_t hi, float a)
{
    const fx_vf32 va = fx_splat_f32(a);
    for (int64_t i = lo; i < hi; i += VL32) fx_store_f32(y + i, va * fx_load_f32(x + i));
}

/* Streaming (non-temporal) stores of one 64-byte vector at a 64-byte
   aligned address; HAVE_NT says whether this build has them. */
#if defined(__AVX512F__)
#define HAVE_NT 1
static inline void store_nt(float *p, fx_vf32 v) { _mm512_stream_ps(p, (__m512)v); }
#elif defined(__AVX__)
#define HAVE_NT 1
static inline void store_nt(float *p, fx_vf32 v)
{
    float tmp[VL32] __attribute__((aligned(64)));
    memcpy(tmp, &v, sizeof v);
    _mm256_stream_ps(p, _mm256_load_ps(tmp));
    _mm256_stream_ps(p + 8, _mm256_load_ps(tmp + 8));
}
#elif defined(__SSE2__)
#define HAVE_NT 1
static inline void store_nt(float *p, fx_vf32 v)
{
    float tmp[VL32] __attribute__((aligned(64)));
    memcpy(tmp, &v, sizeof v);
    for (int j = 0; j < VL32; j += 4) _mm_stream_ps(p + j, _mm_load_ps(tmp + j));
}
#else
#define HAVE_NT 0
static inline void store_nt(float *p, fx_vf32 v) { fx_store_f32(p, v); }
#endif

static void k_write_nt(float *y, int64_t lo, int64_t hi, float c)
{
    const fx_vf32 v = fx_splat_f32(c);
    for (int64_t i = lo; i < hi; i += VL32) store_nt(y + i, v);
}

static void k_rw_nt(const float *x, float *y, int64_t lo, int64_t hi, float a)
{
    const fx_vf32 va = fx_splat_f32(a);
    for (int64_t i = lo; i < hi; i += VL32) store_nt(y + i, va * fx_load_f32(x + i));
}

/* The fastxent sum-of-exponentials loop (csrc/rows/stats.h, chunk_sumexp_);
   with pf, every line is prefetched into L1 pf bytes ahead, as the row
   kernels' one pass does (PF_AHEAD). */
static inline double exp_sum_f32(const float *x, int64_t n, float m, int64_t pf)
{
    const fx_vf32 vm = fx_splat_f32(m);
    fx_acc_f32 a0 = fx_acc_init_f32(fx_splat_f32(0)), a1 = a0;
    for (int64_t i = 0; i < n; i += 2 * VL32) {
        if (pf) {
            __builtin_prefetch((const char *)(x + i) + pf, 0, 3);
            __builtin_prefetch((const char *)(x + i) + pf + 64, 0, 3);
        }
        a0 = fx_acc_add_f32(a0, fx_expm_f32(fx_load_f32(x + i) - vm));
        a1 = fx_acc_add_f32(a1, fx_expm_f32(fx_load_f32(x + i + VL32) - vm));
    }
    return fx_hsum_f32(fx_acc_get_f32(a0) + fx_acc_get_f32(a1));
}

static double k_exp_f32(const float *x, int64_t n, float m)
{
    return exp_sum_f32(x, n, m, 0);
}

static double k_exp_f64(const double *x, int64_t n, double m)
{
    const fx_vf64 vm = fx_splat_f64(m);
    fx_acc_f64 a0 = fx_acc_init_f64(fx_splat_f64(0)), a1 = a0;
    for (int64_t i = 0; i < n; i += 16) {
        a0 = fx_acc_add_f64(a0, fx_expm_f64(fx_load_f64(x + i) - vm));
        a1 = fx_acc_add_f64(a1, fx_expm_f64(fx_load_f64(x + i + 8) - vm));
    }
    return fx_hsum_f64(fx_acc_get_f64(a0) + fx_acc_get_f64(a1));
}

/* One pass that reads each element from memory and exponentiates it once:
   the least a row's max and sum of exponentials can cost together (the
   row kernels' one-pass form, group_lse in csrc/rows/stats.h), as sum of
   exp(x - m) over main-memory data, every line prefetched into L1 3 KiB
   ahead as the kernels do (PF_AHEAD): without it, on a Xeon the loop
   waited on memory (0.83 ns per element against 0.32). */
static double k_read_exp(const float *x, int64_t lo, int64_t hi)
{
    return exp_sum_f32(x + lo, hi - lo, 2.0f, 3072);
}

/* ------------------------------------------------------------- harness */

enum { READ, WRITE, WRITE_NT, RW, RW_NT, READ_EXP, NKIND };
static const char *kind_name[NKIND] = {"read", "write", "write_nt", "rw", "rw_nt", "read_exp"};

/* One timed pass of kind over n floats with nt threads. */
static double stream_pass(int kind, float *x, float *y, int64_t n, int nt)
{
    double total = 0.0;
    const double c0 = cpu_now();
    const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : total)
    {
        int t = 0, tn = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        tn = omp_get_num_threads();
#endif
        int64_t lo, hi;
        slice(n, t, tn, &lo, &hi);
        switch (kind) {
        case READ: total += k_read(x, lo, hi); break;
        case WRITE: k_write(y, lo, hi, 1.0f); break;
        case WRITE_NT: k_write_nt(y, lo, hi, 1.0f); break;
        case RW: k_rw(x, y, lo, hi, 0.5f); break;
        case RW_NT: k_rw_nt(x, y, lo, hi, 0.5f); break;
        case READ_EXP: total += k_read_exp(x, lo, hi); break;
        }
    }
#if HAVE_NT
    _mm_sfence();
#endif
    const double dt = now() - t0;
    acc_cpu += cpu_now() - c0;
    acc_wall += dt * nt;
    sink = total + y[n / 2];
    return dt;
}

/* ns per element, all nt threads together, of the exp loop on L1 data. */
static double exp_pass(int f64, int nt, int reps, double *spread)
{
    enum { L1_BYTES = 16384 };
    const int64_t n_l1 = f64 ? L1_BYTES / 8 : L1_BYTES / 4;
    const int inner = 4000; /* ~65 M elements per thread per timed pass */
    double *times = malloc(sizeof(double) * (size_t)reps);
    for (int r = -1; r < reps; r++) {
        double total = 0.0, t0 = 0.0;
        const double c0 = cpu_now();
        /* Every thread fills its own buffer, then all start together. */
#pragma omp parallel num_threads(nt) reduction(+ : total)
        {
            void *buf = NULL;
            if (posix_memalign(&buf, 64, L1_BYTES) != 0) abort();
            uint32_t state = 12345u;
            for (int64_t i = 0; i < n_l1; i++) {
                state = state * 1664525u + 1013904223u;
                /* logits minus their max: uniform in [-20, 0] */
                const double v = -20.0 * (double)(state >> 8) / 16777216.0;
                if (f64) ((double *)buf)[i] = v;
                else ((float *)buf)[i] = (float)v;
            }
#pragma omp barrier
#pragma omp single
            t0 = now();
            double s = 0.0;
            for (int k = 0; k < inner; k++) {
                /* The buffer "may have changed": keeps the compiler from
                   computing the (pure) pass once and reusing it. */
                __asm__ volatile("" : : "r"(buf) : "memory");
                s += f64 ? k_exp_f64((const double *)buf, n_l1, 0.0)
                         : k_exp_f32((const float *)buf, n_l1, 0.0f);
            }
            total += s;
            free(buf);
        }
        const double dt = now() - t0;
        sink = total;
        if (r >= 0) {
            times[r] = dt;
            /* CPU time includes each thread's buffer setup: a few us. */
            acc_cpu += cpu_now() - c0;
            acc_wall += dt * nt;
        }
    }
    double lo = times[0], hi = times[0];
    for (int r = 1; r < reps; r++) {
        lo = times[r] < lo ? times[r] : lo;
        hi = times[r] > hi ? times[r] : hi;
    }
    const double elems = (double)n_l1 * inner * nt;
    const double med = median(times, reps);
    *spread = (hi - lo) / med;
    free(times);
    return med / elems * 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s <MiB per array> <repetitions> <threads> [<threads> ...]\n", argv[0]);
        return 2;
    }
    const int64_t mib = atoll(argv[1]);
    const int reps = atoi(argv[2]);
    if (mib <= 0 || reps <= 0) {
        fprintf(stderr, "MiB and repetitions must be positive\n");
        return 2;
    }
    const int64_t n = mib * (1 << 20) / (int64_t)sizeof(float);
    float *x = alloc_floats(n), *y = alloc_floats(n);
    if (!x || !y) {
        fprintf(stderr, "cannot allocate 2 x %lld MiB\n", (long long)mib);
        return 1;
    }
    double *times = malloc(sizeof(double) * (size_t)reps);

    printf("{\n  \"mib_per_array\": %lld,\n  \"repetitions\": %d,\n", (long long)mib, reps);
    printf("  \"streaming_stores\": %s,\n", HAVE_NT ? "true" : "false");
#ifdef _OPENMP
    printf("  \"openmp\": true,\n");
#else
    printf("  \"openmp\": false,\n");
#endif
    printf("  \"threads\": {");
    int printed = 0;
    for (int a = 3; a < argc; a++) {
        const int nt = atoi(argv[a]);
#ifdef _OPENMP
        if (nt <= 0) continue;
#else
        if (nt != 1) continue; /* a serial build measures one thread only */
#endif
        /* First touch by the thread that will use each slice. */
#pragma omp parallel num_threads(nt)
        {
            int t = 0, tn = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            tn = omp_get_num_threads();
#endif
            int64_t lo, hi;
            slice(n, t, tn, &lo, &hi);
            for (int64_t i = lo; i < hi; i++) {
                x[i] = (float)(i & 1023) * 0.001f;
                y[i] = 0.0f;
            }
        }
        printf("%s\n    \"%d\": {", printed++ ? "," : "", nt);
        int first = 1;
        for (int kind = 0; kind < NKIND; kind++) {
            if ((kind == WRITE_NT || kind == RW_NT) && !HAVE_NT) continue;
            stream_pass(kind, x, y, n, nt); /* warm-up */
            acc_cpu = acc_wall = 0;
            double lo = 1e300, hi = 0;
            for (int r = 0; r < reps; r++) {
                times[r] = stream_pass(kind, x, y, n, nt);
                lo = times[r] < lo ? times[r] : lo;
                hi = times[r] > hi ? times[r] : hi;
            }
            const double med = median(times, reps);
            const double arrays = (kind == RW || kind == RW_NT) ? 2.0 : 1.0;
            const double bytes = arrays * (double)n * sizeof(float);
            printf("%s\n      \"%s\": {\"gbps\": %.4f, \"seconds\": %.6g, \"bytes\": %.0f, \"spread\": %.4f, "
                   "\"cpu_share\": %.3f}",
                   first ? "" : ",", kind_name[kind], bytes / med / 1e9, med, bytes, (hi - lo) / med,
                   acc_cpu / acc_wall);
            first = 0;
            fflush(stdout);
        }
        for (int f64 = 0; f64 <= 1; f64++) {
            double spread = 0;
            acc_cpu = acc_wall = 0;
            const double ns = exp_pass(f64, nt, reps, &spread);
            printf(",\n      \"%s\": {\"ns_per_element\": %.6g, \"spread\": %.4f, \"cpu_share\": %.3f}",
                   f64 ? "exp_f64" : "exp_f32", ns, spread, acc_cpu / acc_wall);
        }
        printf("\n    }");
        fflush(stdout);
    }
    printf("\n  }\n}\n");
    free(times);
    free(x);
    free(y);
    return 0;
}
