/*
 * fastxent.h - the C API behind the Python binding.
 *
 * The Python layer (src/fastxent/_api.py) turns every input into a 2-D
 * problem: n_rows rows of n_cols contiguous elements, consecutive rows
 * `*_ld` elements apart, in the compute dtype (float or double). It checks
 * every label, shape and stride before calling here, so nothing in C
 * validates input: a job describes memory that is known to be in bounds.
 *
 * One job = one operation over all rows. fx_run splits the rows over
 * threads (parallel.c) and calls the row kernels of the active instruction
 * set (dispatch.c; kernels compiled once per ISA from rows/, see
 * kernels_isa.h).
 * Every per-row value is computed by one thread with the same code whatever
 * the thread count, so results never depend on it; batch reductions are
 * left to the caller, which sums the per-row values in a fixed order.
 */
#ifndef FASTXENT_H
#define FASTXENT_H

#include <math.h>
#include <stdint.h>

enum fx_op {
    FX_CE_HARD = 0,    /* logits, integer labels               -> loss, grad */
    FX_CE_SOFT,        /* logits, probability targets          -> loss, grad */
    FX_CE_PROBS_HARD,  /* probabilities, integer labels        -> loss, grad */
    FX_CE_PROBS_SOFT,  /* probabilities, probability targets   -> loss, grad */
    FX_LOGSUMEXP,      /* logits -> row_out                                  */
    FX_LOG_SOFTMAX,    /* logits -> out                                      */
    FX_SOFTMAX,        /* logits -> out                                      */
    FX_ENTROPY,        /* logits -> row_out                                  */
    FX_ENTROPY_PROBS,  /* probabilities -> row_out                           */
    FX_KL_PROBS,       /* logits, target probabilities         -> loss, grad */
    FX_KL_LOG_PROBS,   /* logits, target log-probabilities     -> loss, grad */
    FX_KL_LOGITS,      /* logits, target logits (distillation) -> loss, grad */
    FX_BCE_LOGITS,     /* elementwise: logits, targets   -> loss(es), grad   */
    FX_BCE_PROBS,      /* elementwise: probabilities, targets                */
    FX_SHARD_STATS,    /* a vocabulary shard: row statistics (rows/shard.h)  */
    FX_SHARD_GRAD,     /* a vocabulary shard: its gradient (rows/shard.h)    */
    FX_CE_OPTS_HARD,   /* logits, integer labels, softcap/z-loss/statistics  */
    FX_CE_OPTS_SOFT,   /* logits, probability targets, the same options      */
    FX_JSD_PROBS,      /* generalised JSD, teacher probabilities             */
    FX_JSD_LOG_PROBS,  /* generalised JSD, teacher log-probabilities         */
    FX_JSD_LOGITS,     /* generalised JSD, teacher logits                    */
    FX_NUM_OPS
};

/* Storage dtypes of the input rows x (and out). float16 and bfloat16 are
   computed in float32 (weights, targets and per-row values in float32 /
   float64 as for float32). */
enum fx_dtype { FX_F32 = 0, FX_F64 = 1, FX_F16 = 2, FX_BF16 = 3, FX_NUM_DTYPES };

typedef struct fx_job {
    int64_t n_rows, n_cols;
    const void *x;           /* n_rows x n_cols inputs, row r at x + r*x_ld   */
    int64_t x_ld;
    const void *t;           /* soft targets, same geometry, or NULL          */
    int64_t t_ld;
    const int64_t *labels;   /* n_rows labels, each in [0, n_cols) or equal   */
    int64_t ignore_index;    /*   to ignore_index                             */
    const void *w;           /* n_cols class weights, or NULL (all 1)         */
    double w_sum;            /* sum of the weights (n_cols when w is NULL)    */
    double smoothing;        /* label smoothing epsilon in [0, 1]             */
    void *out;               /* n_rows x n_cols output (gradient, softmax,    */
    int64_t out_ld;          /*   log-softmax) or NULL; may equal x           */
    double *row_out;         /* n_rows per-row values (loss, lse, entropy)    */
    const double *gscale;    /* per-row gradient scale, row r at             */
    int64_t gscale_step;     /*   gscale[r * gscale_step] (step 0: a scalar)  */
    double temperature;      /* KL: both distributions are softmax(./T)      */
    /* Elementwise (BCE) only: w and pw are n_rows x n_cols too, rows w_ld and
       pw_ld apart (0: one row broadcast to all); loss_out receives the
       elementwise losses (reduction "none") or is NULL. */
    int64_t w_ld;
    const void *pw;
    int64_t pw_ld;
    void *loss_out;
    int64_t loss_ld;
    const void *gout;        /* elementwise grad_output (n_rows x n_cols, in */
    int64_t gout_ld;         /*   the compute dtype) times gscale, or NULL    */
    /* Vocabulary shards (rows/shard.h): labels are global classes, column 0
       is class vocab_start; row_in holds per-row inputs of the gradient. */
    int64_t vocab_start;
    const double *row_in;
    /* Cross entropy options (rows/ce_opts.h): soft-capping, z-loss (zscale:
       its per-row gradient factor, row r at zscale[r]) and the statistics,
       each of n_rows or NULL. */
    double softcap;          /* > 0: z = softcap tanh(x / softcap); 0: z = x  */
    double z_loss;
    const double *zscale;
    double *lse_out;
    int64_t *argmax_out;
    double beta;             /* JSD (rows/jsd.h): the mixture weight, [0, 1]  */
} fx_job;

/* Elements summed per chunk of a row (rows/stats.h); a row split across
   threads is split at chunk boundaries. */
#define FX_CHUNK 1024
/* log_softmax outputs larger than this (bytes) are streamed past the cache
   by the row kernels; a split row this large does not keep exponentials in
   its output (they would come back from memory). */
#define FX_STREAM_BYTES (32LL << 20)

/* One-pass row statistics (rows/stats.h, group_lse): each group of
   FX_LSE_GROUP elements sums exp(x - b) for a base b of its own, the max of
   its first vector, raised (and the partial sums rescaled) only when an
   element exceeds it by more than FX_LSE_T, so every term stays below
   exp(FX_LSE_T) and a row is read once. A row split across threads is
   split at group boundaries. */
#define FX_LSE_T 16
/* The threshold of the one-pass entropy (rows/stats.h, group_lse_q). */
#define FX_ENT_T 2
#define FX_LSE_GROUP (4 * FX_CHUNK)

/* One-pass rows with outputs (gradients, softmax) keep each group's base
   on the stack: rows of up to this many groups (4M elements). */
#define FX_LSE_MAX_GROUPS 1024

/* A row-level coefficient k (of exp(x - B)) for a group whose kept
   exponentials are exp(x - b): shared by the row kernels and the split
   driver, so both round it the same way. */
static inline double fx_lse_rescale(double k, double b, double B)
{
    return b == B ? k : k * exp(b - B);
}

/* Merge a group's (b, s) into the row's (*B, *S), in group order: the row
   kernels and the split-row driver share it, so a row's bits do not depend
   on the split. */
static inline void fx_lse_merge(double *B, double *S, double b, double s)
{
    if (b > *B) {
        *S = *S * exp(*B - b) + s;
        *B = b;
    } else if (b == *B) {
        *S += s;
    } else {
        *S += s * exp(b - *B);
    }
}

/* fx_lse_merge with entropy's second sum Q = sum e (x - B) beside S: a
   group's q against its base b moves to the row's base as
   exp(b - B) (q + (b - B) s). A first group (S = 0, B = -inf) is taken as
   it is: the product (B - b) S would be NaN there. */
static inline void fx_ent_merge(double *B, double *S, double *Q, double b, double s, double q)
{
    if (b > *B) {
        const double f = exp(*B - b);
        *Q = (*S > 0 ? f * (*Q + (*B - b) * *S) : 0.0) + q;
        *S = *S * f + s;
        *B = b;
    } else if (b == *B) {
        *S += s;
        *Q += q;
    } else {
        const double f = exp(b - *B);
        *Q += s > 0 ? f * (q + (b - *B) * s) : 0.0;
        *S += s * f;
    }
}

/* Rows [r0, r1) of one operation. */
typedef void (*fx_rows_fn)(const fx_job *job, int64_t r0, int64_t r1);

/* One row split across threads. parallel.c's driver runs the passes of
   rows/split.h over ranges of the row and calls the op family's split
   function (rows/<family>.h) between them, with phase:
     FX_SPLIT_JOB     (sp NULL) whether the job's rows split at all
     FX_SPLIT_BEGIN   before any pass; 0: run the row kernel on this row.
                      May set stash (chunk sums keep exp(x - m) in out),
                      or onepass (the statistics in one pass, group_lse).
     FX_SPLIT_FINISH  m and s are set; writes the row's values and, for a
                      write pass (returns 1), sets lsm, k1, k2 and w.
     FX_SPLIT_END     after the write pass (the family's last touches). */
enum { FX_SPLIT_JOB, FX_SPLIT_BEGIN, FX_SPLIT_FINISH, FX_SPLIT_END };

typedef struct fx_split {
    int64_t r;          /* the row                                         */
    double m, s;        /* its max (onepass: a base), and the sum of
                           exp(x - m) in chunk order                       */
    double mx;          /* onepass: the row's max                          */
    int nan;            /* write pass: out = NaN (a row without a softmax) */
    int stash;          /* exp(x - m) is kept in out by the sums pass      */
    int onepass;        /* (m, s) from group_lse: m a base, not the max    */
    int lsm;            /* write pass: out = (x - m) - k1 (log-softmax),   */
    double k1, k2;      /*   else out = exp(x - m) k1 - k2 w               */
    const void *w;      /*   w: n_cols class weights (T), or NULL          */
    double xy, gy;      /* the family's own (cross entropy: x_y, read before
                           out, which may be x, is written; its gradient)  */
} fx_split;

typedef int (*fx_split_fn)(const fx_job *job, fx_split *sp, int phase);

typedef struct fx_isa {
    const char *name;
    fx_rows_fn fn[FX_NUM_OPS][FX_NUM_DTYPES];
    /* The op's split-row function, or NULL: its rows are never split. */
    fx_split_fn split[FX_NUM_OPS][FX_NUM_DTYPES];
    /* The passes over a range of a split row (rows/split.h). */
    double (*range_max[FX_NUM_DTYPES])(const void *x, int64_t c0, int64_t c1);
    void (*chunk_sums[FX_NUM_DTYPES])(const void *x, int64_t n, int64_t k0, int64_t k1,
                                      double m, double *sums, void *st);
    void (*group_lse[FX_NUM_DTYPES])(const void *x, int64_t n, int64_t g0, int64_t g1,
                                     double *bases, double *sums, double *maxes, void *st);
    void (*range_write[FX_NUM_DTYPES])(const void *x, void *out, int64_t c0, int64_t c1,
                                       const fx_split *sp);
    void (*expm_f32)(const float *x, float *y, int64_t n);
    void (*expm_f64)(const double *x, double *y, int64_t n);
    void (*expsum_f32)(const float *x, float *y, int64_t n);
    void (*tanh_f32)(const float *x, float *y, int64_t n);
    void (*tanh_f64)(const double *x, double *y, int64_t n);
    /* fx_check_labels (reduce.c) */
    int64_t (*check_labels)(const int64_t *labels, int64_t n, int64_t n_cols,
                            int64_t ignore_index, int64_t *counted);
} fx_isa;

/* Dispatch (dispatch.c). fx_init picks the best ISA this CPU runs, or the
   one named by FASTXENT_ISA; it returns 0, or -1 when FASTXENT_ISA named an
   ISA that is unknown or unsupported (the best one is used instead). */
int fx_init(void);
int fx_num_isas(void);                /* ISAs compiled in and runnable here */
const char *fx_isa_name(int i);
int fx_set_isa(const char *name);     /* 0, or -1 if not available */
const char *fx_get_isa(void);

/* Threads (parallel.c). */
int fx_openmp_enabled(void);
int fx_max_threads(void);             /* omp_get_max_threads(), 1 without OpenMP */
void fx_set_omp_threads(int n);
void fx_run(int op, int dtype, const fx_job *job, int num_threads);
/* fx_run for a job whose labels are unchecked and whose only outputs are
   row values (row_out): each block of rows checked just before it runs and
   its values summed just after. Returns -1 with *counted as
   fx_check_labels gives it and *total = fx_sum_f64(row_out, n_rows), or
   the first bad label's row (the row values then partly written). */
int64_t fx_run_labelled(int op, int dtype, const fx_job *job, int num_threads, int64_t *counted,
                        double *total);
/* Whether (op, dtype) names a kernel: every op has one for every dtype. */
int fx_has_kernel(int op, int dtype);

/* Batch reductions and label checks (reduce.c). */
/* The fixed-order sum of n per-row values: blocks of FX_SUM_BLOCK, each
   summed by fx_sum_block_f64, the block sums added in order. */
#define FX_SUM_BLOCK 512
double fx_sum_f64(const double *v, int64_t n);
double fx_sum_block_f64(const double *v, int64_t n);
/* Index of the first label outside [0, n_cols) that is not ignore_index, or
   -1 with *counted = the number of labels that are not ignore_index. */
int64_t fx_check_labels(const int64_t *labels, int64_t n, int64_t n_cols, int64_t ignore_index,
                        int64_t *counted);

/* The per-ISA tables (kernels_<isa>.c). */
extern const fx_isa fx_isa_baseline;
#if defined(FX_HAVE_AVX2)
extern const fx_isa fx_isa_avx2;
#endif
#if defined(FX_HAVE_AVX512)
extern const fx_isa fx_isa_avx512;
#endif

/* The active ISA's exp kernel (expm.h) over n values, for its accuracy tests. */
void fx_expm_f32_array(const float *x, float *y, int64_t n);
void fx_expm_f64_array(const double *x, double *y, int64_t n);
/* ... and the exp of terms that are only summed (fx_expsum_f32). */
void fx_expsum_f32_array(const float *x, float *y, int64_t n);
/* The active ISA's tanh kernel (tanhm.h), for its accuracy tests. */
void fx_tanh_f32_array(const float *x, float *y, int64_t n);
void fx_tanh_f64_array(const double *x, double *y, int64_t n);

/* Largest error, in float32 ulp, of the active exp kernel over every float32
   in [lo, hi] <= 0, and where it occurs (selftest.c). */
double fx_expm_f32_max_ulp(float lo, float hi, float *worst_x);
/* How many float32 in [lo, hi] fx_expsum_f32 gives other bits than
   fx_expm_f32 for, and the largest of them in *last_x (the active ISA). */
int64_t fx_expsum_f32_mismatches(float lo, float hi, float *last_x);

#endif
