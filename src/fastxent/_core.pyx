# The thin binding: array geometry in, C job out, GIL released.
#
# fastxent._api has already validated the values (label range, dtypes,
# shapes); this module re-checks only the cheap geometric facts the C
# kernels index by (2-D, contiguous rows, matching shapes, dtype), so that
# no call through it can read or write out of bounds.

from libc.stdint cimport int64_t
from libc.string cimport memset
from libc.stdlib cimport malloc, free
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "fastxent.h" nogil:
    ctypedef struct fx_job:
        int64_t n_rows, n_cols
        const void *x
        int64_t x_ld
        const void *t
        int64_t t_ld
        const int64_t *labels
        int64_t ignore_index
        const void *w
        double w_sum
        double smoothing
        void *out
        int64_t out_ld
        double *row_out
        const double *gscale
        int64_t gscale_step
        double temperature
        int64_t w_ld
        const void *pw
        int64_t pw_ld
        void *loss_out
        int64_t loss_ld
        const void *gout
        int64_t gout_ld

    int FX_CE_HARD, FX_CE_SOFT, FX_CE_PROBS_HARD, FX_CE_PROBS_SOFT
    int FX_LOGSUMEXP, FX_LOG_SOFTMAX, FX_SOFTMAX, FX_ENTROPY, FX_ENTROPY_PROBS
    int FX_KL_PROBS, FX_KL_LOG_PROBS, FX_KL_LOGITS, FX_BCE_LOGITS, FX_BCE_PROBS
    int FX_F32, FX_F64, FX_F16, FX_BF16

    int fx_init()
    int fx_num_isas()
    const char *fx_isa_name(int i)
    int fx_set_isa(const char *name)
    const char *fx_get_isa()
    int fx_openmp_enabled()
    int fx_max_threads()
    void fx_set_omp_threads(int n)
    void fx_run(int op, int dtype, const fx_job *job, int num_threads)
    int fx_has_kernel(int op, int dtype)
    void fx_expm_f32_array(const float *x, float *y, int64_t n)
    void fx_expm_f64_array(const double *x, double *y, int64_t n)
    double fx_expm_f32_max_ulp(float lo, float hi, float *worst_x)
    double fx_sum_f64(const double *v, int64_t n)
    int64_t fx_check_labels(const int64_t *labels, int64_t n, int64_t n_cols,
                            int64_t ignore_index, int64_t *counted)

CE_HARD = FX_CE_HARD
CE_SOFT = FX_CE_SOFT
CE_PROBS_HARD = FX_CE_PROBS_HARD
CE_PROBS_SOFT = FX_CE_PROBS_SOFT
LOGSUMEXP = FX_LOGSUMEXP
LOG_SOFTMAX = FX_LOG_SOFTMAX
SOFTMAX = FX_SOFTMAX
ENTROPY = FX_ENTROPY
ENTROPY_PROBS = FX_ENTROPY_PROBS
KL_PROBS = FX_KL_PROBS
KL_LOG_PROBS = FX_KL_LOG_PROBS
KL_LOGITS = FX_KL_LOGITS
BCE_LOGITS = FX_BCE_LOGITS
BCE_PROBS = FX_BCE_PROBS

_init_status = fx_init()


def init_status():
    """0, or -1 when FASTXENT_ISA named an ISA that is not available here."""
    return _init_status


def available_isas():
    """The instruction sets compiled in and runnable on this CPU, best last."""
    return [fx_isa_name(i).decode() for i in range(fx_num_isas())]


def get_isa():
    return fx_get_isa().decode()


def set_isa(name):
    """Switch the kernels of the whole process (for tests and benchmarks)."""
    if fx_set_isa(str(name).encode()) != 0:
        raise ValueError(f"ISA {name!r} is not available here; available: {available_isas()}")


def openmp_enabled():
    return bool(fx_openmp_enabled())


def max_threads():
    return fx_max_threads()


def set_omp_threads(int n):
    fx_set_omp_threads(n)


cdef int _dtype_code(cnp.ndarray a) except -1:
    cdef int num = cnp.PyArray_TYPE(a)
    if num == cnp.NPY_FLOAT32:
        return FX_F32
    if num == cnp.NPY_FLOAT64:
        return FX_F64
    raise TypeError("internal: kernels take float32 or float64")


cdef int _storage(cnp.ndarray x, int xdtype, int *cnum) except -1:
    """The kernels' dtype code for x's rows; 16-bit rows (xdtype FX_F16 or
    FX_BF16) set *cnum, the type of targets and weights, to float32."""
    if xdtype == FX_F16 or xdtype == FX_BF16:
        if cnp.PyArray_ITEMSIZE(x) != 2:
            raise ValueError("internal: 16-bit rows must have 2-byte items")
        if xdtype == FX_F16 and cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT16:
            raise ValueError("internal: float16 rows expected")
        cnum[0] = cnp.NPY_FLOAT32
        return xdtype
    return _dtype_code(x)


cdef int64_t _rows(cnp.ndarray a, int64_t n, int64_t c, int num, str name) except? -1:
    """Row stride in elements of a (n, c) array with contiguous rows."""
    if cnp.PyArray_NDIM(a) != 2 or a.shape[0] != n or a.shape[1] != c:
        raise ValueError(f"internal: {name} must have shape ({n}, {c})")
    if cnp.PyArray_TYPE(a) != num:
        raise ValueError(f"internal: {name} has the wrong dtype")
    cdef int64_t item = cnp.PyArray_ITEMSIZE(a)
    if n == 0 or c == 0:
        return 0
    if c > 1 and a.strides[1] != item:
        raise ValueError(f"internal: {name} rows must be contiguous")
    if n == 1:
        return 0
    if a.strides[0] % item != 0:
        raise ValueError(f"internal: {name} rows must be aligned to its items")
    return a.strides[0] // item


def run(int op, cnp.ndarray x, cnp.ndarray labels, cnp.ndarray target,
        cnp.ndarray weight, double w_sum, int64_t ignore_index, double smoothing,
        cnp.ndarray out, cnp.ndarray row_out, cnp.ndarray gscale, int num_threads,
        double temperature=1.0, int xdtype=-1):
    """Run one operation over the rows of the 2-D array x (see fastxent.h).

    xdtype: FX_F16 or FX_BF16 for 16-bit rows (x and out in that storage
    type; target and weight float32); otherwise taken from x's dtype."""
    cdef fx_job job
    memset(&job, 0, sizeof(job))
    if op == FX_BCE_LOGITS or op == FX_BCE_PROBS:
        raise ValueError("internal: elementwise ops go through run_elementwise")
    if temperature <= 0:
        raise ValueError("internal: temperature must be positive")
    job.temperature = temperature
    job.w_ld = 0
    job.pw = NULL
    job.pw_ld = 0
    job.loss_out = NULL
    job.loss_ld = 0
    job.gout = NULL
    job.gout_ld = 0
    cdef int num = cnp.PyArray_TYPE(x)
    cdef int cnum = num
    cdef int dt = _storage(x, xdtype, &cnum)
    if not fx_has_kernel(op, dt):
        raise ValueError("internal: no kernel for this op and dtype")
    cdef int64_t n, c
    if cnp.PyArray_NDIM(x) != 2:
        raise ValueError("internal: x must be 2-D")
    n = x.shape[0]
    c = x.shape[1]
    job.n_rows = n
    job.n_cols = c
    job.x = cnp.PyArray_DATA(x)
    job.x_ld = _rows(x, n, c, num, "x")
    job.t = NULL
    job.t_ld = 0
    if target is not None:
        job.t_ld = _rows(target, n, c, cnum, "target")
        job.t = cnp.PyArray_DATA(target)
    job.labels = NULL
    if labels is not None:
        if (cnp.PyArray_NDIM(labels) != 1 or labels.shape[0] != n
                or cnp.PyArray_TYPE(labels) != cnp.NPY_INT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(labels)):
            raise ValueError("internal: labels must be contiguous int64 of length n")
        job.labels = <const int64_t *>cnp.PyArray_DATA(labels)
    job.ignore_index = ignore_index
    job.w = NULL
    if weight is not None:
        if (cnp.PyArray_NDIM(weight) != 1 or weight.shape[0] != c
                or cnp.PyArray_TYPE(weight) != cnum or not cnp.PyArray_IS_C_CONTIGUOUS(weight)):
            raise ValueError("internal: weight must be contiguous, of length C, in x's dtype")
        job.w = cnp.PyArray_DATA(weight)
    job.w_sum = w_sum
    job.smoothing = smoothing
    job.out = NULL
    job.out_ld = 0
    if out is not None:
        if not cnp.PyArray_ISWRITEABLE(out):
            raise ValueError("internal: out is read-only")
        job.out_ld = _rows(out, n, c, num, "out")
        job.out = cnp.PyArray_DATA(out)
    elif op == FX_LOG_SOFTMAX or op == FX_SOFTMAX:
        raise ValueError("internal: out is required")
    job.row_out = NULL
    if op != FX_LOG_SOFTMAX and op != FX_SOFTMAX:
        if (row_out is None or cnp.PyArray_NDIM(row_out) != 1 or row_out.shape[0] != n
                or cnp.PyArray_TYPE(row_out) != cnp.NPY_FLOAT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(row_out) or not cnp.PyArray_ISWRITEABLE(row_out)):
            raise ValueError("internal: row_out must be writable contiguous float64 of length n")
        job.row_out = <double *>cnp.PyArray_DATA(row_out)
    if (op == FX_CE_HARD or op == FX_CE_PROBS_HARD) and labels is None:
        raise ValueError("internal: labels are required")
    if (op == FX_CE_SOFT or op == FX_CE_PROBS_SOFT or op == FX_KL_PROBS
            or op == FX_KL_LOG_PROBS or op == FX_KL_LOGITS) and target is None:
        raise ValueError("internal: target is required")
    job.gscale = NULL
    job.gscale_step = 0
    if job.out != NULL and op != FX_LOG_SOFTMAX and op != FX_SOFTMAX:
        if (gscale is None or cnp.PyArray_NDIM(gscale) != 1
                or cnp.PyArray_TYPE(gscale) != cnp.NPY_FLOAT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(gscale)
                or (gscale.shape[0] != n and gscale.shape[0] != 1)):
            raise ValueError("internal: gscale must be contiguous float64 of length 1 or n")
        job.gscale = <const double *>cnp.PyArray_DATA(gscale)
        job.gscale_step = 1 if gscale.shape[0] == n and n != 1 else 0
    if num_threads < 1:
        raise ValueError("internal: num_threads must be >= 1")
    with nogil:
        fx_run(op, dt, &job, num_threads)


def sum_f64(cnp.ndarray v):
    """The fixed-order sum of a contiguous float64 vector (reduce.c)."""
    if (cnp.PyArray_NDIM(v) != 1 or cnp.PyArray_TYPE(v) != cnp.NPY_FLOAT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(v)):
        raise ValueError("internal: sum_f64 takes a contiguous float64 vector")
    cdef double r
    cdef int64_t n = v.shape[0]
    with nogil:
        r = fx_sum_f64(<const double *>cnp.PyArray_DATA(v), n)
    return r


_float32 = np.float32
_float64 = np.float64
_nan = float("nan")

DEF _STACK_ROWS = 256


cdef bint _overlaps(cnp.ndarray a, cnp.ndarray b):
    """Whether the byte ranges of two contiguous arrays intersect."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef int _fast_dtype(x):
    """x's type number when it is what the fast paths take: a 2-D
    C-contiguous aligned native float32/float64 ndarray with at least one row
    and one column; -1 otherwise."""
    if type(x) is not np.ndarray:
        return -1
    cdef cnp.ndarray xa = <cnp.ndarray>x
    if cnp.PyArray_NDIM(xa) != 2 or xa.shape[0] == 0 or xa.shape[1] == 0:
        return -1
    cdef int tnum = cnp.PyArray_TYPE(xa)
    if tnum != cnp.NPY_FLOAT32 and tnum != cnp.NPY_FLOAT64:
        return -1
    if (not cnp.PyArray_IS_C_CONTIGUOUS(xa) or not cnp.PyArray_ISALIGNED(xa)
            or not cnp.PyArray_ISNOTSWAPPED(xa)):
        return -1
    return tnum


cdef void _fast_job(fx_job *job, cnp.ndarray xa):
    """A job over the rows of a _fast_dtype array, nothing else set."""
    memset(job, 0, sizeof(fx_job))
    job.n_rows = xa.shape[0]
    job.n_cols = xa.shape[1]
    job.x = cnp.PyArray_DATA(xa)
    job.x_ld = xa.shape[1]
    job.temperature = 1.0


cdef cnp.ndarray _fast_out(out, int64_t n, int64_t c, int tnum, cnp.ndarray xa,
                          cnp.ndarray la):
    """out= for a fast path: a new (n, c) array when None, out itself when
    it is an (n, c) array of type tnum, C-contiguous, aligned, native and
    writeable that is x itself or shares no memory with x (nor with la,
    when given); None otherwise (the general path then decides)."""
    if out is None:
        return cnp.PyArray_EMPTY(2, [n, c], tnum, 0)
    if type(out) is not np.ndarray:
        return None
    cdef cnp.ndarray ga = <cnp.ndarray>out
    if (cnp.PyArray_NDIM(ga) != 2 or ga.shape[0] != n or ga.shape[1] != c
            or cnp.PyArray_TYPE(ga) != tnum or not cnp.PyArray_IS_C_CONTIGUOUS(ga)
            or not cnp.PyArray_ISALIGNED(ga) or not cnp.PyArray_ISNOTSWAPPED(ga)
            or not cnp.PyArray_ISWRITEABLE(ga)):
        return None
    if (la is not None and _overlaps(ga, la)) or (ga is not xa and _overlaps(ga, xa)):
        return None
    return ga


def cross_entropy_fast(x, labels, int64_t ignore_index, int num_threads,
                       bint want_grad=False, double grad_output=1.0, out=None):
    """Mean cross entropy for the common case, or None when the case is not
    common: 2-D contiguous aligned native float32/float64 logits with C > 0,
    at least one row, contiguous int64 labels all in range (at least one
    counted, when the gradient is wanted). Anything else (and every error)
    goes through the general path in _api.py, which gives the same bits:
    same kernel, same fixed-order sum, same gradient scale.

    With want_grad, returns (loss, gradient): the gradient of the mean times
    grad_output, written into out (None: a new array; else an array of x's
    dtype and shape, C-contiguous, aligned, writeable, either x itself or
    sharing no memory with x or labels)."""
    cdef int tnum = _fast_dtype(x)
    if tnum < 0 or type(labels) is not np.ndarray:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.ndarray la = <cnp.ndarray>labels
    if (cnp.PyArray_NDIM(la) != 1 or cnp.PyArray_TYPE(la) != cnp.NPY_INT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(la) or not cnp.PyArray_ISALIGNED(la)
            or not cnp.PyArray_ISNOTSWAPPED(la)):
        return None
    cdef int64_t n = xa.shape[0], c = xa.shape[1], counted = 0
    if la.shape[0] != n:
        return None
    cdef cnp.ndarray ga = None
    if want_grad:
        ga = _fast_out(out, n, c, tnum, xa, la)
        if ga is None:
            return None
    cdef const int64_t *lab = <const int64_t *>cnp.PyArray_DATA(la)
    if fx_check_labels(lab, n, c, ignore_index, &counted) >= 0:
        return None
    if want_grad and counted == 0:
        return None
    cdef double gs = 0.0
    if want_grad:
        # As _api._gscale: grad_output times the mean's factor 1 / counted.
        gs = grad_output * (1.0 / <double>counted)
    cdef double stack_rows[_STACK_ROWS]
    cdef double *rows = stack_rows
    if n > _STACK_ROWS:
        rows = <double *>malloc(n * sizeof(double))
        if rows == NULL:
            raise MemoryError()
    cdef fx_job job
    _fast_job(&job, xa)
    job.labels = lab
    job.ignore_index = ignore_index
    job.w_sum = <double>c
    job.row_out = rows
    if want_grad:
        job.out = cnp.PyArray_DATA(ga)
        job.out_ld = c
        job.gscale = &gs
        job.gscale_step = 0
    cdef int nt = num_threads if num_threads > 0 else fx_max_threads()
    cdef int dt = FX_F32 if tnum == cnp.NPY_FLOAT32 else FX_F64
    cdef double total
    with nogil:
        fx_run(FX_CE_HARD, dt, &job, nt if nt > 0 else 1)
        total = fx_sum_f64(rows, n)
    if rows != stack_rows:
        free(rows)
    total = total / counted if counted else _nan
    loss = _float32(total) if dt == FX_F32 else _float64(total)
    if want_grad:
        return loss, ga
    return loss


def blocks_fast(int op, x, out, int num_threads):
    """logsumexp / entropy (row values) or log_softmax / softmax (rows) for
    the common case, or None: 2-D contiguous aligned native float32/float64
    x with at least one row and one column, along the last axis; out as in
    cross_entropy_fast. Everything else goes through the general path, which
    runs the same kernel: same bits."""
    cdef int tnum = _fast_dtype(x)
    if tnum < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int64_t n = xa.shape[0], c = xa.shape[1]
    cdef bint rows = op == FX_LOG_SOFTMAX or op == FX_SOFTMAX
    if not rows and (out is not None or (op != FX_LOGSUMEXP and op != FX_ENTROPY)):
        return None
    cdef cnp.ndarray ga = None
    if rows:
        ga = _fast_out(out, n, c, tnum, xa, None)
        if ga is None:
            return None
    cdef cnp.ndarray rv = None
    cdef fx_job job
    _fast_job(&job, xa)
    if rows:
        job.out = cnp.PyArray_DATA(ga)
        job.out_ld = c
    else:
        rv = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT64, 0)
        job.row_out = <double *>cnp.PyArray_DATA(rv)
    cdef int nt = num_threads if num_threads > 0 else fx_max_threads()
    cdef int dt = FX_F32 if tnum == cnp.NPY_FLOAT32 else FX_F64
    with nogil:
        fx_run(op, dt, &job, nt if nt > 0 else 1)
    if rows or dt == FX_F64:
        return ga if rows else rv
    # float32 results, rounded once from the float64 row values as astype does.
    cdef cnp.ndarray r32 = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT32, 0)
    cdef float *p32 = <float *>cnp.PyArray_DATA(r32)
    cdef const double *p64 = <const double *>cnp.PyArray_DATA(rv)
    cdef int64_t i
    for i in range(n):
        p32[i] = <float>p64[i]
    return r32


def run_elementwise(int op, cnp.ndarray x, cnp.ndarray target, cnp.ndarray weight,
                    cnp.ndarray pos_weight, cnp.ndarray loss_out, cnp.ndarray out,
                    cnp.ndarray row_out, cnp.ndarray gscale, cnp.ndarray gout,
                    int num_threads, int xdtype=-1):
    """An elementwise loss (BCE) over the rows of x; weight and pos_weight
    are arrays of x's shape whose rows may be broadcast (row stride 0).
    xdtype as for run: 16-bit x and out, everything else float32."""
    cdef fx_job job
    if op != FX_BCE_LOGITS and op != FX_BCE_PROBS:
        raise ValueError("internal: not an elementwise op")
    cdef int num = cnp.PyArray_TYPE(x)
    cdef int cnum = num
    cdef int dt = _storage(x, xdtype, &cnum)
    if cnp.PyArray_NDIM(x) != 2:
        raise ValueError("internal: x must be 2-D")
    cdef int64_t n = x.shape[0], c = x.shape[1]
    memset(&job, 0, sizeof(job))
    job.n_rows = n
    job.n_cols = c
    job.x = cnp.PyArray_DATA(x)
    job.x_ld = _rows(x, n, c, num, "x")
    job.t_ld = _rows(target, n, c, cnum, "target")
    job.t = cnp.PyArray_DATA(target)
    job.temperature = 1.0
    if weight is not None:
        job.w_ld = _rows(weight, n, c, cnum, "weight")
        job.w = cnp.PyArray_DATA(weight)
    if pos_weight is not None:
        job.pw_ld = _rows(pos_weight, n, c, cnum, "pos_weight")
        job.pw = cnp.PyArray_DATA(pos_weight)
    if gout is not None:
        job.gout_ld = _rows(gout, n, c, cnum, "grad_output")
        job.gout = cnp.PyArray_DATA(gout)
    if loss_out is not None:
        if not cnp.PyArray_ISWRITEABLE(loss_out):
            raise ValueError("internal: loss_out is read-only")
        job.loss_ld = _rows(loss_out, n, c, cnum, "loss_out")
        job.loss_out = cnp.PyArray_DATA(loss_out)
    if out is not None:
        if not cnp.PyArray_ISWRITEABLE(out):
            raise ValueError("internal: out is read-only")
        job.out_ld = _rows(out, n, c, num, "out")
        job.out = cnp.PyArray_DATA(out)
        if (gscale is None or cnp.PyArray_NDIM(gscale) != 1 or gscale.shape[0] != 1
                or cnp.PyArray_TYPE(gscale) != cnp.NPY_FLOAT64):
            raise ValueError("internal: gscale must be one float64")
        job.gscale = <const double *>cnp.PyArray_DATA(gscale)
    if (row_out is None or cnp.PyArray_NDIM(row_out) != 1 or row_out.shape[0] != n
            or cnp.PyArray_TYPE(row_out) != cnp.NPY_FLOAT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(row_out) or not cnp.PyArray_ISWRITEABLE(row_out)):
        raise ValueError("internal: row_out must be writable contiguous float64 of length n")
    job.row_out = <double *>cnp.PyArray_DATA(row_out)
    if num_threads < 1:
        raise ValueError("internal: num_threads must be >= 1")
    with nogil:
        fx_run(op, dt, &job, num_threads)


def expm(cnp.ndarray x):
    """The active ISA's exp kernel for x <= 0 (expm.h), for accuracy tests."""
    x = cnp.PyArray_GETCONTIGUOUS(x)
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(1, [x.size], cnp.PyArray_TYPE(x), 0)
    cdef int64_t n = x.size
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            fx_expm_f32_array(<const float *>cnp.PyArray_DATA(x), <float *>cnp.PyArray_DATA(y), n)
    elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT64:
        with nogil:
            fx_expm_f64_array(<const double *>cnp.PyArray_DATA(x), <double *>cnp.PyArray_DATA(y), n)
    else:
        raise TypeError("expm takes float32 or float64")
    return y.reshape((<object>x).shape)


def expm_f32_max_ulp(float lo, float hi):
    """(max error in ulp, argument where it occurs) of the active float32 exp
    kernel over every float32 in [lo, hi], lo <= hi <= 0."""
    if not (lo <= hi <= 0):
        raise ValueError("need lo <= hi <= 0")
    cdef float wx = 0
    cdef double worst
    with nogil:
        worst = fx_expm_f32_max_ulp(lo, hi, &wx)
    return worst, wx
