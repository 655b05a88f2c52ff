/*
 * xla_ffi.c - fastxent's kernels as an XLA FFI handler (fastxent.jax, CPU).
 *
 * XLA calls fx_xla_handler with a call frame (third_party/xla/ffi/api/
 * c_api.h): its own operand and result buffers and the call's attributes.
 * The handler reads the operands in place and writes the results (the loss,
 * the gradient, the normalised rows) straight into XLA's result buffers; no
 * Python runs and the GIL is never taken.
 *
 * fastxent.jax decides everything static when it traces a call (shapes,
 * dtypes, options; the class axis is moved last): one call is
 *
 *   args   x (lead..., dims..., C) logits in float32/float64/float16/bfloat16,
 *          then per fn: labels (integers, x's dims without C) or a target
 *          (x's shape, in the compute dtype), class weights (C,), BCE weight
 *          and pos_weight (x's rank, each dim 1 or x's)
 *   rets   the loss (or logsumexp, or the rows), then the gradient (x's type)
 *   attrs  scalars: fn, ndim (x's rank without vmap's lead dims), grad,
 *          reduction, scale (1/ln base), threads (0: the default),
 *          ignore_index, smoothing, from_logits, kind, temperature, weights
 *
 * What depends on the data is checked here, as fastxent._api checks it
 * (labels in range, weights finite and non-negative, probabilities in
 * [0, 1] with from_logits=0), and every geometry the kernels index by is
 * checked again, so a malformed call is an XLA error, never an
 * out-of-bounds access. vmap ("expand_dims") gives every operand the same
 * lead dims, of size 1 where it is not batched: row ops take them as more
 * rows, losses run once per lead element, as the NumPy functions would.
 *
 * The numbers are the NumPy path's (_core.pyx run/_execute): the same jobs,
 * the per-row values summed by fx_sum_f64, divided, scaled and rounded in
 * the same order. Weight sums are added left to right here (NumPy's are
 * pairwise), which can change the last bit of a weighted mean.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastxent.h"
#include "xla/ffi/api/c_api.h"
#include "xla_ffi.h"

int fx_xla_default_threads = 0;

enum { FN_CE, FN_KL, FN_BCE, FN_LOG_SOFTMAX, FN_SOFTMAX, FN_LOGSUMEXP, FN_COUNT };
enum { RED_NONE, RED_SUM, RED_MEAN };
#define MAX_ARGS 4
#define MAX_LEAD 16
#define STACK_ROWS 256

typedef struct {
    int64_t fn, ndim, grad, reduction, threads, ignore_index, from_logits, kind, weights;
    double scale, smoothing, temperature;
} fx_attrs;

/* One call: its frame, attributes and buffers. */
typedef struct {
    const XLA_FFI_Api *api;
    fx_attrs a;
    int nargs, nrets;
    XLA_FFI_Buffer *arg[MAX_ARGS], *ret[2];
    int lead;               /* vmap's lead dims                        */
    int64_t nb;             /* lead elements (problems)                */
    int dt;                 /* fastxent.h's dtype code of x            */
    int64_t isz, csz;       /* x's item size; the compute dtype's      */
    int64_t n, c;           /* one problem's rows and columns          */
    double *rows;           /* n per-row values                        */
    int64_t *lab64;         /* labels widened to int64, or NULL        */
    void *wtmp, *pwtmp;     /* BCE weights broadcast to (n, c), or NULL */
} fx_call;

/* ------------------------------------------------------------------ errors */

static XLA_FFI_Error *fail(const XLA_FFI_Api *api, XLA_FFI_Error_Code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static XLA_FFI_Error *fail(const XLA_FFI_Api *api, XLA_FFI_Error_Code code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    XLA_FFI_Error_Create_Args args;
    memset(&args, 0, sizeof args);
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
    args.message = msg;
    args.errc = code;
    return api->XLA_FFI_Error_Create(&args);
}

#define BAD(call, ...) fail((call)->api, XLA_FFI_Error_Code_INVALID_ARGUMENT, __VA_ARGS__)
#define INTERNAL(call, ...) \
    fail((call)->api, XLA_FFI_Error_Code_INTERNAL, "fastxent.jax internal error: " __VA_ARGS__)

/* The shortest decimal that reads back as v in a type of `bits` (32 or 64),
   as Python prints floats. */
static const char *fmt_real(char *buf, size_t size, double v, int bits)
{
    if (isnan(v)) return "nan";
    if (isinf(v)) return v > 0 ? "inf" : "-inf";
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, size, "%.*g", p, v);
        const double back = strtod(buf, NULL);
        if (bits == 32 ? (float)back == (float)v : back == v) break;
    }
    if (!strpbrk(buf, ".einn")) strncat(buf, ".0", size - strlen(buf) - 1);
    return buf;
}

/* Flat index i of an array of dims[0..rank) as Python prints the tuple. */
static const char *fmt_index(char *buf, size_t size, int64_t i, const int64_t *dims, int rank)
{
    int64_t idx[MAX_LEAD + 64];
    for (int d = rank - 1; d >= 0; d--) {
        idx[d] = dims[d] ? i % dims[d] : 0;
        i = dims[d] ? i / dims[d] : 0;
    }
    size_t k = (size_t)snprintf(buf, size, "(");
    for (int d = 0; d < rank && k < size; d++)
        k += (size_t)snprintf(buf + k, size - k, d ? ", %lld" : "%lld", (long long)idx[d]);
    if (k < size) snprintf(buf + k, size - k, rank == 1 ? ",)" : ")");
    return buf;
}

/* ------------------------------------------------------------------ values */

static double half_value(uint16_t h)
{
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(m | 0x400, e - 25);
    return h & 0x8000 ? -v : v;
}

static double bf16_value(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of data in fastxent dtype dt, as a double. */
static double value_at(const void *data, int64_t i, int dt)
{
    switch (dt) {
    case FX_F32: return ((const float *)data)[i];
    case FX_F64: return ((const double *)data)[i];
    case FX_F16: return half_value(((const uint16_t *)data)[i]);
    default: return bf16_value(((const uint16_t *)data)[i]);
    }
}

static int fx_dtype_of(XLA_FFI_DataType t)
{
    switch (t) {
    case XLA_FFI_DataType_F32: return FX_F32;
    case XLA_FFI_DataType_F64: return FX_F64;
    case XLA_FFI_DataType_F16: return FX_F16;
    case XLA_FFI_DataType_BF16: return FX_BF16;
    default: return -1;
    }
}

/* ------------------------------------------------------------------ decoding */

static int span_is(const XLA_FFI_ByteSpan *s, const char *name)
{
    const size_t k = strlen(name);
    return s->len == k && !memcmp(s->ptr, name, k);
}

static int scalar_f64(const XLA_FFI_Scalar *s, double *v)
{
    switch (s->dtype) {
    case XLA_FFI_DataType_F64: *v = *(const double *)s->value; return 0;
    case XLA_FFI_DataType_F32: *v = *(const float *)s->value; return 0;
    case XLA_FFI_DataType_S64: *v = (double)*(const int64_t *)s->value; return 0;
    case XLA_FFI_DataType_S32: *v = *(const int32_t *)s->value; return 0;
    default: return -1;
    }
}

static int scalar_i64(const XLA_FFI_Scalar *s, int64_t *v)
{
    switch (s->dtype) {
    case XLA_FFI_DataType_S64: *v = *(const int64_t *)s->value; return 0;
    case XLA_FFI_DataType_S32: *v = *(const int32_t *)s->value; return 0;
    case XLA_FFI_DataType_S8: *v = *(const int8_t *)s->value; return 0;
    case XLA_FFI_DataType_PRED: *v = *(const uint8_t *)s->value != 0; return 0;
    default: return -1;
    }
}

static XLA_FFI_Error *decode_attrs(fx_call *call, const XLA_FFI_Attrs *attrs)
{
    static const char *const ints[] = {"fn", "ndim", "grad", "reduction", "threads",
                                       "ignore_index", "from_logits", "kind", "weights"};
    static const char *const reals[] = {"scale", "smoothing", "temperature"};
    int64_t *const iv[] = {&call->a.fn, &call->a.ndim, &call->a.grad, &call->a.reduction,
                           &call->a.threads, &call->a.ignore_index, &call->a.from_logits,
                           &call->a.kind, &call->a.weights};
    double *const rv[] = {&call->a.scale, &call->a.smoothing, &call->a.temperature};
    int seen_fn = 0, seen_ndim = 0;
    for (int64_t i = 0; i < attrs->size; i++) {
        const XLA_FFI_ByteSpan *name = attrs->names[i];
        const XLA_FFI_Scalar *s = (const XLA_FFI_Scalar *)attrs->attrs[i];
        int done = 0;
        if (attrs->types[i] != XLA_FFI_AttrType_SCALAR)
            return INTERNAL(call, "attribute %.*s is not a scalar", (int)name->len, name->ptr);
        for (size_t k = 0; k < sizeof ints / sizeof *ints && !done; k++) {
            if (!span_is(name, ints[k])) continue;
            if (scalar_i64(s, iv[k]))
                return INTERNAL(call, "attribute %s is not an integer", ints[k]);
            seen_fn |= k == 0;
            seen_ndim |= k == 1;
            done = 1;
        }
        for (size_t k = 0; k < sizeof reals / sizeof *reals && !done; k++) {
            if (!span_is(name, reals[k])) continue;
            if (scalar_f64(s, rv[k])) return INTERNAL(call, "attribute %s is not a number", reals[k]);
            done = 1;
        }
        if (!done) return INTERNAL(call, "unknown attribute %.*s", (int)name->len, name->ptr);
    }
    if (!seen_fn || !seen_ndim || call->a.fn < 0 || call->a.fn >= FN_COUNT)
        return INTERNAL(call, "a call without a valid fn and ndim");
    if (call->a.reduction < RED_NONE || call->a.reduction > RED_MEAN)
        return INTERNAL(call, "reduction %lld", (long long)call->a.reduction);
    if (call->a.threads < 0 || call->a.threads > 1024)
        return INTERNAL(call, "threads %lld", (long long)call->a.threads);
    if (!(call->a.temperature > 0) || !(call->a.smoothing >= 0 && call->a.smoothing <= 1))
        return INTERNAL(call, "temperature or smoothing out of range");
    return NULL;
}

static XLA_FFI_Error *decode_buffers(fx_call *call, const XLA_FFI_CallFrame *frame)
{
    if (frame->args.size < 1 || frame->args.size > MAX_ARGS || frame->rets.size < 1 ||
        frame->rets.size > 2)
        return INTERNAL(call, "%lld operands and %lld results", (long long)frame->args.size,
                        (long long)frame->rets.size);
    call->nargs = (int)frame->args.size;
    call->nrets = (int)frame->rets.size;
    for (int i = 0; i < call->nargs + call->nrets; i++) {
        const int is_arg = i < call->nargs, j = is_arg ? i : i - call->nargs;
        const int type = is_arg ? (int)frame->args.types[j] : (int)frame->rets.types[j];
        XLA_FFI_Buffer *b = (XLA_FFI_Buffer *)(is_arg ? frame->args.args[j] : frame->rets.rets[j]);
        if (type != XLA_FFI_ArgType_BUFFER || b->struct_size < XLA_FFI_Buffer_STRUCT_SIZE)
            return INTERNAL(call, "an operand or result that is not a buffer");
        if (b->rank < 0 || b->rank > MAX_LEAD + 32) return INTERNAL(call, "rank %lld", (long long)b->rank);
        for (int64_t d = 0; d < b->rank; d++)
            if (b->dims[d] < 0) return INTERNAL(call, "negative dimension");
        if (is_arg) call->arg[j] = b;
        else call->ret[j] = b;
    }
    return NULL;
}

/* ------------------------------------------------------------------ geometry */

static int64_t prod(const int64_t *dims, int64_t k)
{
    int64_t p = 1;
    for (int64_t i = 0; i < k; i++) p *= dims[i];
    return p;
}

/* Whether b has rank lead + rank, lead dims each 1 or the call's (ld), and
   unbatched dims equal to want (or, with bcast, each 1 or want's). */
static int shaped(const fx_call *call, const XLA_FFI_Buffer *b, const int64_t *ld,
                  const int64_t *want, int64_t rank, int bcast)
{
    if (b->rank != call->lead + rank) return 0;
    for (int d = 0; d < call->lead; d++)
        if (b->dims[d] != 1 && b->dims[d] != ld[d]) return 0;
    for (int64_t d = 0; d < rank; d++) {
        const int64_t got = b->dims[call->lead + d];
        if (got != want[d] && !(bcast && got == 1)) return 0;
    }
    return 1;
}

/* Element offset of b's problem k (lead dims of size 1 are broadcast). */
static int64_t lead_offset(const fx_call *call, const XLA_FFI_Buffer *b, const int64_t *ld, int64_t k)
{
    int64_t off = 0, stride = prod(b->dims + call->lead, b->rank - call->lead);
    for (int d = call->lead - 1; d >= 0; d--) {
        const int64_t i = k % ld[d];
        k /= ld[d];
        if (b->dims[d] != 1) off += i * stride;
        stride *= b->dims[d];
    }
    return off;
}

static const void *at(const void *p, int64_t elements, int64_t size)
{
    return (const char *)p + elements * size;
}

static int threads_of(const fx_call *call)
{
    if (call->a.threads > 0) return (int)call->a.threads;
    if (fx_xla_default_threads > 0) return fx_xla_default_threads;
    const int n = fx_max_threads();
    return n > 0 ? n : 1;
}

/* ------------------------------------------------------------------ checks */

/* Labels of one problem as int64 (widened into call->lab64 when they are
   not int64), each checked as _api checks them; *counted, and the summed
   class weights of the counted labels in *wden (w may be NULL). */
static XLA_FFI_Error *labels_of(fx_call *call, const XLA_FFI_Buffer *b, int64_t off,
                                const int64_t **out, int64_t *counted, const void *w, double *wden)
{
    const int64_t n = call->n, c = call->c, ii = call->a.ignore_index;
    const void *p = (const char *)b->data;
    const int64_t *lab = NULL;
    char pos[256];
    if (b->dtype == XLA_FFI_DataType_S64) {
        lab = (const int64_t *)p + off;
    } else {
        for (int64_t i = 0; i < n; i++) {
            int64_t v;
            switch (b->dtype) {
            case XLA_FFI_DataType_S32: v = ((const int32_t *)p)[off + i]; break;
            case XLA_FFI_DataType_S16: v = ((const int16_t *)p)[off + i]; break;
            case XLA_FFI_DataType_S8: v = ((const int8_t *)p)[off + i]; break;
            case XLA_FFI_DataType_U8: v = ((const uint8_t *)p)[off + i]; break;
            case XLA_FFI_DataType_U16: v = ((const uint16_t *)p)[off + i]; break;
            case XLA_FFI_DataType_U32: v = ((const uint32_t *)p)[off + i]; break;
            case XLA_FFI_DataType_U64: {
                const uint64_t u = ((const uint64_t *)p)[off + i];
                if (u > (uint64_t)INT64_MAX)
                    return BAD(call, "ValueError: label %llu at position %s is out of range [0, "
                               "%lld) and is not ignore_index (%lld)", (unsigned long long)u,
                               fmt_index(pos, sizeof pos, i, b->dims + call->lead, call->a.ndim - 1),
                               (long long)c, (long long)ii);
                v = (int64_t)u;
                break;
            }
            default: return INTERNAL(call, "labels of XLA dtype %d", (int)b->dtype);
            }
            call->lab64[i] = v;
        }
        lab = call->lab64;
    }
    const int64_t bad = fx_check_labels(lab, n, c, ii, counted);
    if (bad >= 0)
        return BAD(call, "ValueError: label %lld at position %s is out of range [0, %lld) and is "
                   "not ignore_index (%lld)", (long long)lab[bad],
                   fmt_index(pos, sizeof pos, bad, b->dims + call->lead, call->a.ndim - 1),
                   (long long)c, (long long)ii);
    *out = lab;
    double s = 0.0;
    if (w) {
        const int cdt = call->csz == 8 ? FX_F64 : FX_F32;
        for (int64_t i = 0; i < n; i++)
            if (lab[i] != ii) s += value_at(w, lab[i], cdt);
    }
    *wden = s;
    return NULL;
}

/* Every element of a weight (count values of compute size csz) finite and
   non-negative; bce: _api's elementwise message, else the class weights'. */
static XLA_FFI_Error *check_weight(fx_call *call, const void *w, int64_t count, const char *name, int bce)
{
    const int cdt = call->csz == 8 ? FX_F64 : FX_F32;
    char num[64];
    for (int64_t i = 0; i < count; i++) {
        const double v = value_at(w, i, cdt);
        if (v >= 0 && isfinite(v)) continue;
        const char *text = fmt_real(num, sizeof num, v, 64);
        if (bce)
            return BAD(call, "ValueError: %s must be finite and non-negative; %s holds %s at flat "
                       "index %lld", name, name, text, (long long)i);
        return BAD(call, "ValueError: weight must be finite and non-negative; weight[%lld] = %s",
                   (long long)i, text);
    }
    return NULL;
}

/* With from_logits=0, every element of a (count values of fastxent dtype
   dt, shaped dims[0..rank)) in [0, 1]; NaN passes, as in _api. */
static XLA_FFI_Error *check_probabilities(fx_call *call, const void *a, int dt, int64_t count,
                                          const int64_t *dims, int64_t rank, const char *name)
{
    char num[64], pos[256];
    for (int64_t i = 0; i < count; i++) {
        const double v = value_at(a, i, dt);
        if (!(v < 0 || v > 1)) continue;
        return BAD(call, "ValueError: with from_logits=False, %s must hold probabilities in [0, "
                   "1]; found %s at position %s", name, fmt_real(num, sizeof num, v, dt == FX_F64 ? 64 : 32),
                   fmt_index(pos, sizeof pos, i, dims, (int)rank));
    }
    return NULL;
}

/* ------------------------------------------------------------------ results */

/* The reduced loss (red SUM or MEAN) of one problem's row values into dst,
   or for NONE the row values times scale; in the compute dtype. */
static void write_loss(const fx_call *call, void *dst, double denom)
{
    const int64_t n = call->n;
    const double scale = call->a.scale;
    if (call->a.reduction == RED_NONE) {
        for (int64_t i = 0; i < n; i++) {
            const double v = call->rows[i] * scale;
            if (call->csz == 8) ((double *)dst)[i] = v;
            else ((float *)dst)[i] = (float)v;
        }
        return;
    }
    double total = fx_sum_f64(call->rows, n);
    if (call->a.reduction == RED_MEAN) total = denom != 0 ? total / denom : NAN;
    total *= scale;
    if (call->csz == 8) *(double *)dst = total;
    else *(float *)dst = (float)total;
}

/* The gradient scale of a reduction: scale, over denom for a mean (0 when
   nothing counted). */
static double grad_factor(const fx_call *call, double denom)
{
    if (call->a.reduction == RED_MEAN) return denom != 0 ? call->a.scale / denom : 0.0;
    return call->a.scale;
}

/* ------------------------------------------------------------------ the ops */

/* Rows of x: log_softmax, softmax (rows out, x's type) or logsumexp (one
   value per row, the compute dtype). vmap's lead dims are more rows. */
static XLA_FFI_Error *run_rows(fx_call *call, const XLA_FFI_Buffer *x)
{
    const XLA_FFI_Buffer *y = call->ret[0];
    const int64_t n = call->n, c = call->c;
    const int writes_rows = call->a.fn != FN_LOGSUMEXP;
    if (call->nargs != 1 || call->nrets != 1) return INTERNAL(call, "row op arity");
    if (writes_rows ? (y->dtype != x->dtype || !shaped(call, y, x->dims, x->dims + call->lead,
                                                       call->a.ndim, 0))
                    : (fx_dtype_of(y->dtype) != (call->csz == 8 ? FX_F64 : FX_F32) ||
                       !shaped(call, y, x->dims, x->dims + call->lead, call->a.ndim - 1, 0)))
        return INTERNAL(call, "row op result shape");
    fx_job job;
    memset(&job, 0, sizeof job);
    job.n_rows = n;
    job.n_cols = c;
    job.x = x->data;
    job.x_ld = c;
    job.temperature = 1.0;
    if (writes_rows) {
        job.out = y->data;
        job.out_ld = c;
        fx_run(call->a.fn == FN_LOG_SOFTMAX ? FX_LOG_SOFTMAX : FX_SOFTMAX, call->dt, &job,
               threads_of(call));
        return NULL;
    }
    job.row_out = call->csz == 8 ? (double *)y->data : call->rows;
    fx_run(FX_LOGSUMEXP, call->dt, &job, threads_of(call));
    if (call->csz == 4)
        for (int64_t i = 0; i < n; i++) ((float *)y->data)[i] = (float)call->rows[i];
    return NULL;
}

/* Broadcast a BCE weight b (problem offset off; unbatched dims each 1 or
   x's) to rows: its data and row stride, copied into tmp (n, c) only when
   no stride describes it. */
static const void *bce_rows(const fx_call *call, const XLA_FFI_Buffer *b, const XLA_FFI_Buffer *x,
                            int64_t off, void *tmp, int64_t *ld)
{
    const int64_t nd = call->a.ndim, *bd = b->dims + call->lead, *xd = x->dims + call->lead;
    const void *p = at(b->data, off, call->csz);
    int full = 1, row = nd == 0 || bd[nd - 1] == call->c;
    for (int64_t d = 0; d < nd; d++) {
        full &= bd[d] == xd[d];
        if (d < nd - 1) row &= bd[d] == 1;
    }
    if (full || row) {
        *ld = full ? call->c : 0;
        return p;
    }
    const int64_t total = call->n * call->c;
    for (int64_t i = 0; i < total; i++) {
        int64_t rest = i, src = 0, stride = 1;
        for (int64_t d = nd - 1; d >= 0; d--) {
            const int64_t k = rest % xd[d];
            rest /= xd[d];
            if (bd[d] != 1) src += k * stride;
            stride *= bd[d];
        }
        memcpy((char *)tmp + i * call->csz, (const char *)p + src * call->csz, (size_t)call->csz);
    }
    *ld = call->c;
    return tmp;
}

/* A loss, once per lead element: cross entropy (hard or soft labels),
   KL divergence or binary cross entropy. */
static XLA_FFI_Error *run_loss(fx_call *call, const XLA_FFI_Buffer *x)
{
    const fx_attrs *a = &call->a;
    const int fn = (int)a->fn, bce = fn == FN_BCE;
    const int64_t nd = a->ndim, *xd = x->dims + call->lead, n = call->n, c = call->c;
    const int cdt = call->csz == 8 ? FX_F64 : FX_F32;
    const int nw = (a->weights & 1) + ((a->weights >> 1) & 1);
    XLA_FFI_Error *err;

    /* The arity first: nothing below may read an operand or result that the
       call does not have. */
    if (call->nargs != 2 + nw || call->nrets != 1 + (a->grad != 0) || (a->weights & ~3) ||
        (fn == FN_KL && a->weights) || (fn == FN_CE && (a->weights & 2)))
        return INTERNAL(call, "loss arity");
    const XLA_FFI_Buffer *y = call->arg[1], *loss = call->ret[0];
    const XLA_FFI_Buffer *grad = a->grad ? call->ret[1] : NULL;
    const int64_t *ld = loss->dims; /* the call's lead dims */
    const int soft = fn != FN_CE || fx_dtype_of(y->dtype) >= 0;
    const XLA_FFI_Buffer *w = a->weights & 1 ? call->arg[2] : NULL;
    const XLA_FFI_Buffer *pw = a->weights & 2 ? call->arg[2 + (w != NULL)] : NULL;

    /* Geometry: every operand and result of the shape the job indexes by. */
    if (soft ? (fx_dtype_of(y->dtype) != cdt || !shaped(call, y, ld, xd, nd, 0))
             : !shaped(call, y, ld, xd, nd - 1, 0))
        return INTERNAL(call, "labels or target shape");
    if (w && (fx_dtype_of(w->dtype) != cdt ||
              !(bce ? shaped(call, w, ld, xd, nd, 1) : shaped(call, w, ld, &c, 1, 0))))
        return INTERNAL(call, "weight shape");
    if (pw && (fx_dtype_of(pw->dtype) != cdt || !shaped(call, pw, ld, xd, nd, 1)))
        return INTERNAL(call, "pos_weight shape");
    const int64_t loss_rank = a->reduction != RED_NONE ? 0 : bce ? nd : nd - 1;
    if (fx_dtype_of(loss->dtype) != cdt || loss->rank != call->lead + loss_rank ||
        !shaped(call, loss, ld, xd, loss_rank, 0) || !shaped(call, x, ld, xd, nd, 0))
        return INTERNAL(call, "loss shape");
    if (grad && (grad->dtype != x->dtype || !shaped(call, grad, ld, xd, nd, 0)))
        return INTERNAL(call, "gradient shape");
    for (int d = 0; d < call->lead; d++)
        if (grad && grad->dims[d] != ld[d]) return INTERNAL(call, "gradient lead dims");

    int op;
    if (fn == FN_CE)
        op = a->from_logits ? (soft ? FX_CE_SOFT : FX_CE_HARD)
                            : (soft ? FX_CE_PROBS_SOFT : FX_CE_PROBS_HARD);
    else if (fn == FN_KL)
        op = a->kind == 0 ? FX_KL_PROBS : a->kind == 1 ? FX_KL_LOG_PROBS : FX_KL_LOGITS;
    else op = a->from_logits ? FX_BCE_LOGITS : FX_BCE_PROBS;
    const int64_t loss_block = prod(loss->dims + call->lead, loss_rank);
    const int nt = threads_of(call);

    for (int64_t k = 0; k < call->nb; k++) {
        fx_job job;
        memset(&job, 0, sizeof job);
        job.n_rows = n;
        job.n_cols = c;
        job.x = at(x->data, lead_offset(call, x, ld, k), call->isz);
        job.x_ld = c;
        job.temperature = 1.0;
        job.row_out = call->rows;
        const void *wp = w ? at(w->data, lead_offset(call, w, ld, k), call->csz) : NULL;
        double denom = 0.0, gs = 0.0;
        if (w && (err = check_weight(call, wp, prod(w->dims + call->lead, w->rank - call->lead),
                                     "weight", bce)))
            return err;
        if (pw && (err = check_weight(call, at(pw->data, lead_offset(call, pw, ld, k), call->csz),
                                      prod(pw->dims + call->lead, nd), "pos_weight", 1)))
            return err;
        if (!a->from_logits && fn != FN_KL &&
            (err = check_probabilities(call, job.x, call->dt, n * c, xd, nd, "logits")))
            return err;
        if (soft) {
            job.t = at(y->data, lead_offset(call, y, ld, k), call->csz);
            job.t_ld = c;
            if (bce && !a->from_logits &&
                (err = check_probabilities(call, job.t, cdt, n * c, xd, nd, "target")))
                return err;
        }
        if (fn == FN_CE) {
            job.w = wp;
            job.w_sum = (double)c;
            if (wp) {
                job.w_sum = 0.0;
                for (int64_t i = 0; i < c; i++) job.w_sum += value_at(wp, i, cdt);
            }
            job.smoothing = a->smoothing;
            denom = (double)n;
            if (!soft) {
                int64_t counted = 0;
                double wden = 0.0;
                if ((err = labels_of(call, y, lead_offset(call, y, ld, k), &job.labels, &counted,
                                     wp, &wden)))
                    return err;
                job.ignore_index = a->ignore_index;
                denom = wp ? wden : (double)counted;
            }
        } else if (fn == FN_KL) {
            job.temperature = a->temperature;
            denom = (double)n;
        } else {
            denom = (double)(n * c);
            if (w) job.w = bce_rows(call, w, x, lead_offset(call, w, ld, k), call->wtmp, &job.w_ld);
            if (pw) job.pw = bce_rows(call, pw, x, lead_offset(call, pw, ld, k), call->pwtmp, &job.pw_ld);
            if (a->reduction == RED_NONE) {
                job.loss_out = (char *)loss->data + k * loss_block * call->csz;
                job.loss_ld = c;
            }
        }
        if (grad) {
            job.out = (char *)grad->data + lead_offset(call, grad, ld, k) * call->isz;
            job.out_ld = c;
            gs = grad_factor(call, denom);
            job.gscale = &gs;
        }
        fx_run(op, call->dt, &job, nt);
        if (bce && a->reduction == RED_NONE) {
            if (a->scale != 1.0) {
                for (int64_t i = 0; i < n * c; i++) {
                    if (cdt == FX_F64) ((double *)job.loss_out)[i] *= a->scale;
                    else ((float *)job.loss_out)[i] *= (float)a->scale;
                }
            }
        } else {
            write_loss(call, (char *)loss->data + k * loss_block * call->csz, denom);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ the handler */

static XLA_FFI_Error *metadata(const XLA_FFI_Api *api, XLA_FFI_Metadata_Extension *ext)
{
    if (ext->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
        ext->metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
        return fail(api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                    "fastxent.jax: XLA's FFI metadata is smaller than the C API it was built with");
    XLA_FFI_Metadata *m = ext->metadata;
    m->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
    m->api_version.extension_start = NULL;
    m->api_version.major_version = XLA_FFI_API_MAJOR;
    m->api_version.minor_version = XLA_FFI_API_MINOR;
    m->traits = 0;
    if (m->struct_size >= XLA_FFI_STRUCT_SIZE(XLA_FFI_Metadata, state_type_id))
        m->state_type_id.type_id = 0; /* stateless */
    return NULL;
}

static XLA_FFI_Error *handle(fx_call *call, XLA_FFI_CallFrame *frame)
{
    XLA_FFI_Error *err;
    if ((err = decode_attrs(call, &frame->attrs)) || (err = decode_buffers(call, frame))) return err;
    const XLA_FFI_Buffer *x = call->arg[0];
    call->dt = fx_dtype_of(x->dtype);
    if (call->dt < 0) return INTERNAL(call, "logits of XLA dtype %d", (int)x->dtype);
    call->isz = call->dt == FX_F64 ? 8 : call->dt == FX_F32 ? 4 : 2;
    call->csz = call->dt == FX_F64 ? 8 : 4;
    const int64_t nd = call->a.ndim;
    const int rows = call->a.fn >= FN_LOG_SOFTMAX, bce = call->a.fn == FN_BCE;
    if (nd < (bce ? 0 : 1) || nd > x->rank || x->rank - nd > MAX_LEAD)
        return INTERNAL(call, "ndim %lld for a rank %lld operand", (long long)nd, (long long)x->rank);
    /* Row ops take the lead dims as rows; a loss runs per lead element. */
    call->lead = rows ? 0 : (int)(x->rank - nd);
    if (rows) call->a.ndim = x->rank;
    const int64_t *xd = x->dims + call->lead, xn = call->a.ndim;
    call->c = xn ? xd[xn - 1] : 1;
    call->n = xn && call->c ? prod(xd, xn - 1) : xn ? 0 : 1; /* BCE: no elements, no rows */
    if (call->c == 0 && !bce) return BAD(call, "ValueError: logits has no classes (C == 0)");
    if (call->ret[0]->rank < call->lead) return INTERNAL(call, "result rank");
    call->nb = prod(call->ret[0]->dims, call->lead);

    /* Row values: every loss, and logsumexp; log_softmax and softmax write
       rows straight into their result. */
    double stack_rows[STACK_ROWS];
    const int row_values = !rows || call->a.fn == FN_LOGSUMEXP;
    call->rows = call->n <= STACK_ROWS || !row_values ? stack_rows
                                                       : malloc((size_t)call->n * sizeof(double));
    const int labels = call->a.fn == FN_CE && call->nargs > 1 && fx_dtype_of(call->arg[1]->dtype) < 0 &&
                       call->arg[1]->dtype != XLA_FFI_DataType_S64;
    if (labels) call->lab64 = malloc((size_t)(call->n ? call->n : 1) * sizeof(int64_t));
    if (bce && call->a.weights) {
        const int64_t elements = call->n * call->c;
        const size_t bytes = (size_t)(elements > 0 ? elements : 1) * (size_t)call->csz;
        if (call->a.weights & 1) call->wtmp = malloc(bytes);
        if (call->a.weights & 2) call->pwtmp = malloc(bytes);
    }
    if (!call->rows || (labels && !call->lab64) || ((call->a.weights & 1) && bce && !call->wtmp) ||
        ((call->a.weights & 2) && bce && !call->pwtmp))
        err = fail(call->api, XLA_FFI_Error_Code_RESOURCE_EXHAUSTED, "fastxent.jax: out of memory");
    else
        err = rows ? run_rows(call, x) : run_loss(call, x);
    if (call->rows != stack_rows) free(call->rows);
    free(call->lab64);
    free(call->wtmp);
    free(call->pwtmp);
    return err;
}

static XLA_FFI_Error *fx_xla_handler(XLA_FFI_CallFrame *frame)
{
    const XLA_FFI_Api *api = frame->api;
    if (frame->extension_start && frame->extension_start->type == XLA_FFI_Extension_Metadata)
        return metadata(api, (XLA_FFI_Metadata_Extension *)frame->extension_start);
    if (api->api_version.major_version != XLA_FFI_API_MAJOR ||
        frame->struct_size < XLA_FFI_CallFrame_STRUCT_SIZE)
        return fail(api, XLA_FFI_Error_Code_FAILED_PRECONDITION,
                    "fastxent.jax was built for XLA FFI API %d.%d and this XLA speaks %d.%d; set "
                    "FASTXENT_JAX_TRANSPORT=callback", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR,
                    api->api_version.major_version, api->api_version.minor_version);
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
    fx_call call;
    memset(&call, 0, sizeof call);
    call.api = api;
    call.a.scale = 1.0;
    call.a.temperature = 1.0;
    call.a.from_logits = 1;
    return handle(&call, frame);
}

void *fx_xla_handler_address(void)
{
    /* A function address as the void * a PyCapsule holds (POSIX guarantees
       the round trip). */
    XLA_FFI_Handler *h = fx_xla_handler;
    void *p;
    memcpy(&p, &h, sizeof p);
    return p;
}
