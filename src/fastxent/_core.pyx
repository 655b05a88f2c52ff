# cython: autotestdict=False

# The thin binding: arrays in, one C job out, the GIL released around it.
#
# fastxent._api validates every value (labels, options, dtypes, shapes,
# overlap) and lays every input out as (N, C) rows. `run` re-checks only the
# geometry the kernels index by (2-D, contiguous rows, matching shapes and
# dtypes, writeable outputs, the job fields its op reads), so that no call
# through it can read or write out of bounds. A call crosses into this
# module once: `run` builds the job, runs it and returns the reduced loss
# (or the per-row values).
#
# The common calls with default options (`cross_entropy_common`,
# `rows_common`) are parsed and checked here whole, so that a tiny call
# costs little more than its kernel. They build their job with the same
# field setters, resolve threads, scale the gradient and reduce with the
# same functions as `run`, so they give the same bits; for anything else
# they return None and _api takes the general path.
#
# Adding an op: name it in the enum below, give it a line in `_IO` (the job
# fields it reads and writes) and, if it reads a field no op read before, a
# keyword of `run` and a setter.

from libc.stdint cimport int64_t
from libc.string cimport memset
from libc.stdlib cimport malloc, free
from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport NAN
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # A NumPy scalar of descr's type from the value at data (base: unused
    # for numbers).
    object PyArray_Scalar(void *data, cnp.dtype descr, object base)

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
        int64_t vocab_start
        const double *row_in
        double softcap
        double z_loss
        const double *zscale
        double *lse_out
        int64_t *argmax_out
        double beta

    enum:  # fx_op
        FX_CE_HARD
        FX_CE_SOFT
        FX_CE_PROBS_HARD
        FX_CE_PROBS_SOFT
        FX_LOGSUMEXP
        FX_LOG_SOFTMAX
        FX_SOFTMAX
        FX_ENTROPY
        FX_ENTROPY_PROBS
        FX_KL_PROBS
        FX_KL_LOG_PROBS
        FX_KL_LOGITS
        FX_BCE_LOGITS
        FX_BCE_PROBS
        FX_SHARD_STATS
        FX_SHARD_GRAD
        FX_CE_OPTS_HARD
        FX_CE_OPTS_SOFT
        FX_JSD_PROBS
        FX_JSD_LOG_PROBS
        FX_JSD_LOGITS
        FX_NUM_OPS

    enum:  # fx_dtype
        FX_F32
        FX_F64
        FX_F16
        FX_BF16

    int fx_init()
    int fx_num_isas()
    const char *fx_isa_name(int i)
    int fx_set_isa(const char *name)
    const char *fx_get_isa()
    int fx_openmp_enabled()
    int fx_max_threads()
    void fx_set_omp_threads(int n)
    void fx_run(int op, int dtype, const fx_job *job, int num_threads)
    int64_t fx_run_labelled(int op, int dtype, const fx_job *job, int num_threads,
                            int64_t *counted, double *total)
    void fx_expm_f32_array(const float *x, float *y, int64_t n)
    void fx_expm_f64_array(const double *x, double *y, int64_t n)
    void fx_tanh_f32_array(const float *x, float *y, int64_t n)
    void fx_tanh_f64_array(const double *x, double *y, int64_t n)
    double fx_expm_f32_max_ulp(float lo, float hi, float *worst_x)
    void fx_expsum_f32_array(const float *x, float *y, int64_t n)
    int64_t fx_expsum_f32_mismatches(float lo, float hi, float *last_x)
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
SHARD_STATS = FX_SHARD_STATS
SHARD_GRAD = FX_SHARD_GRAD
CE_OPTS_HARD = FX_CE_OPTS_HARD
CE_OPTS_SOFT = FX_CE_OPTS_SOFT
JSD_PROBS = FX_JSD_PROBS
JSD_LOG_PROBS = FX_JSD_LOG_PROBS
JSD_LOGITS = FX_JSD_LOGITS

# The job fields each op reads and writes besides x (the rows).
cdef enum:
    _LABELS = 1    # labels, ignore_index (required); class weights w, w_sum, smoothing
    _TARGET = 2    # t: rows like x (required); class weights w, w_sum, smoothing
    _ROWS = 4      # writes row_out, one float64 per row
    _OUT = 8       # writes out, rows like x (required)
    _GRAD = 16     # may write the gradient into out, times gscale
    _TEMP = 32     # temperature
    _ELEM = 64     # elementwise: weight, pos_weight and gout as rows, loss_out
    _SHARD = 128   # a vocabulary shard: vocab_start; see _run_shard
    _OPTS = 256    # softcap, z_loss and zscale; writes lse_out, argmax_out if given
    _MASK = 512    # labels optional: rows labelled ignore_index count nothing
    _BETA = 1024   # beta

cdef int _IO[<int>FX_NUM_OPS]
_IO[FX_CE_HARD] = _LABELS | _ROWS | _GRAD
_IO[FX_CE_PROBS_HARD] = _LABELS | _ROWS | _GRAD
_IO[FX_CE_SOFT] = _TARGET | _ROWS | _GRAD
_IO[FX_CE_PROBS_SOFT] = _TARGET | _ROWS | _GRAD
_IO[FX_LOGSUMEXP] = _ROWS
_IO[FX_ENTROPY] = _ROWS
_IO[FX_ENTROPY_PROBS] = _ROWS
_IO[FX_LOG_SOFTMAX] = _OUT
_IO[FX_SOFTMAX] = _OUT
_IO[FX_KL_PROBS] = _TARGET | _ROWS | _GRAD | _TEMP
_IO[FX_KL_LOG_PROBS] = _TARGET | _ROWS | _GRAD | _TEMP
_IO[FX_KL_LOGITS] = _TARGET | _ROWS | _GRAD | _TEMP
_IO[FX_BCE_LOGITS] = _TARGET | _ROWS | _GRAD | _ELEM
_IO[FX_BCE_PROBS] = _TARGET | _ROWS | _GRAD | _ELEM
_IO[FX_SHARD_STATS] = _LABELS | _SHARD
_IO[FX_SHARD_GRAD] = _LABELS | _SHARD
_IO[FX_CE_OPTS_HARD] = _LABELS | _ROWS | _GRAD | _OPTS
_IO[FX_CE_OPTS_SOFT] = _TARGET | _ROWS | _GRAD | _OPTS
_IO[FX_JSD_PROBS] = _TARGET | _ROWS | _GRAD | _TEMP | _MASK | _BETA
_IO[FX_JSD_LOG_PROBS] = _TARGET | _ROWS | _GRAD | _TEMP | _MASK | _BETA
_IO[FX_JSD_LOGITS] = _TARGET | _ROWS | _GRAD | _TEMP | _MASK | _BETA

_init_status = fx_init()


def init_status():
    """0, or -1 when FASTXENT_ISA named an ISA that is not available here."""
    return _init_status


def available_isas():
    """The instruction sets compiled in and runnable on this CPU, best last."""
    return [fx_isa_name(i).decode() for i in range(fx_num_isas())]


def get_isa():
    """The instruction set whose kernels run now."""
    return fx_get_isa().decode()


def set_isa(name):
    """Switch the kernels of the whole process (for tests and benchmarks)."""
    if fx_set_isa(str(name).encode()) != 0:
        raise ValueError(f"ISA {name!r} is not available here; available: {available_isas()}")


def openmp_enabled():
    """Whether the kernels were built with OpenMP."""
    return bool(fx_openmp_enabled())


def max_threads():
    """omp_get_max_threads() (1 without OpenMP)."""
    return fx_max_threads()


def set_omp_threads(int n):
    """omp_set_num_threads(n) (for tests)."""
    fx_set_omp_threads(n)


# --------------------------------------------------------------------------
# Threads: the one place a call's thread count is resolved
# --------------------------------------------------------------------------

cdef enum:
    _MAX_THREADS = 1024
MAX_THREADS = _MAX_THREADS
cdef int _default_threads = 0  # fastxent.set_num_threads's count; 0: follow OpenMP


def set_default_threads(int n):
    """The count of calls with num_threads=None (0: OpenMP's, read at each call)."""
    global _default_threads, fx_xla_default_threads
    if not 0 <= n <= _MAX_THREADS:
        raise ValueError(f"internal: thread count {n}")
    _default_threads = n
    fx_xla_default_threads = n  # the XLA FFI handler's default (xla_ffi.c)


cdef int _threads(object num_threads) except -1:
    """A call's thread count: num_threads (already checked to lie in
    [1, MAX_THREADS]) or, for None, set_num_threads's count or OpenMP's."""
    cdef int n
    if num_threads is None:
        if _default_threads > 0:
            return _default_threads
        n = fx_max_threads()
        return n if n > 0 else 1
    n = num_threads
    if n < 1:
        raise ValueError("internal: num_threads must be >= 1")
    return n


def threads(num_threads=None):
    """The thread count a call given num_threads (None: the default) uses."""
    return _threads(num_threads)


cdef inline bint _threads_ok(object num_threads):
    """num_threads is None or an int in [1, MAX_THREADS] (else _api explains)."""
    return num_threads is None or (type(num_threads) is int and 1 <= num_threads <= _MAX_THREADS)


# --------------------------------------------------------------------------
# Job fields: each set in one place, with the geometry C indexes it by
# --------------------------------------------------------------------------

cdef int64_t _ld(cnp.ndarray a, int64_t n, int64_t c, int num, str name) except? -1:
    """Row stride in elements of a (n, c) array of type num with contiguous rows."""
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


cdef int _set_x(fx_job *job, cnp.ndarray x, int xdtype, int *cnum) except -1:
    """A job over the rows of x and nothing else; returns the kernels' dtype
    code. xdtype: FX_F16 or FX_BF16 for 16-bit rows, else -1 (x's dtype).
    *cnum: the type number of targets and weights (float32 for 16-bit x)."""
    cdef int num = cnp.PyArray_TYPE(x)
    cdef int dt
    if xdtype == FX_F16 or xdtype == FX_BF16:
        if cnp.PyArray_ITEMSIZE(x) != 2 or (xdtype == FX_F16 and num != cnp.NPY_FLOAT16):
            raise ValueError("internal: 16-bit rows expected")
        dt = xdtype
        cnum[0] = cnp.NPY_FLOAT32
    elif num == cnp.NPY_FLOAT32:
        dt = FX_F32
        cnum[0] = num
    elif num == cnp.NPY_FLOAT64:
        dt = FX_F64
        cnum[0] = num
    else:
        raise TypeError("internal: kernels take float32, float64 or 16-bit rows")
    if cnp.PyArray_NDIM(x) != 2:
        raise ValueError("internal: x must be 2-D")
    memset(job, 0, sizeof(fx_job))
    job.n_rows = x.shape[0]
    job.n_cols = x.shape[1]
    job.x = cnp.PyArray_DATA(x)
    job.x_ld = _ld(x, job.n_rows, job.n_cols, num, "x")
    job.temperature = 1.0
    return dt


cdef int _set_labels(fx_job *job, cnp.ndarray labels, int64_t ignore_index) except -1:
    if (cnp.PyArray_NDIM(labels) != 1 or labels.shape[0] != job.n_rows
            or cnp.PyArray_TYPE(labels) != cnp.NPY_INT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(labels)):
        raise ValueError("internal: labels must be contiguous int64 of length n")
    job.labels = <const int64_t *>cnp.PyArray_DATA(labels)
    job.ignore_index = ignore_index
    return 0


cdef int _set_class_weight(fx_job *job, cnp.ndarray weight, int cnum) except -1:
    if (cnp.PyArray_NDIM(weight) != 1 or weight.shape[0] != job.n_cols
            or cnp.PyArray_TYPE(weight) != cnum or not cnp.PyArray_IS_C_CONTIGUOUS(weight)):
        raise ValueError("internal: weight must be contiguous, of length C, in x's dtype")
    job.w = cnp.PyArray_DATA(weight)
    return 0


cdef int _set_out(fx_job *job, cnp.ndarray out, int num) except -1:
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("internal: out is read-only")
    job.out_ld = _ld(out, job.n_rows, job.n_cols, num, "out")
    job.out = cnp.PyArray_DATA(out)
    return 0


cdef const void *_in_rows(cnp.ndarray a, fx_job *job, int num, str name,
                          int64_t *ld) except? NULL:
    """An input of x's geometry: its data, with its row stride in *ld."""
    ld[0] = _ld(a, job.n_rows, job.n_cols, num, name)
    return cnp.PyArray_DATA(a)


# --------------------------------------------------------------------------
# Reductions and the gradient scale, shared by run and the common calls
# --------------------------------------------------------------------------

cdef enum:
    _NONE = 0
    _SUM = 1
    _MEAN = 2


cdef int _reduction(str reduction) except -1:
    if reduction == "mean":
        return _MEAN
    if reduction == "sum":
        return _SUM
    if reduction == "none":
        return _NONE
    raise ValueError(f"internal: reduction {reduction!r}")


cdef inline double _grad_factor(int red, double denom, double scale):
    """d(loss)/d(row value): scale, over denom for a mean (0 when nothing counted)."""
    if red == _MEAN:
        return scale / denom if denom != 0 else 0.0
    return scale


cdef cnp.dtype _F32 = np.dtype(np.float32)
cdef cnp.dtype _F64 = np.dtype(np.float64)


cdef object _loss(double total, int red, double denom, double scale, int dt):
    """The fixed-order sum of the row values as the loss: over denom for a
    mean (NaN when nothing counted), times scale, in the compute dtype."""
    cdef float f
    if red == _MEAN:
        total = total / denom if denom != 0 else NAN
    total = total * scale
    if dt == FX_F64:
        return PyArray_Scalar(&total, _F64, None)
    f = <float>total
    return PyArray_Scalar(&f, _F32, None)


cdef enum:
    _STACK_ROWS = 256  # row values of a reduced call kept on the stack up to here
    _TINY_ELEMENTS = 1024  # reduced calls up to here hold the GIL (well under 1 us of work)


cdef object _execute(int op, int dt, fx_job *job, int nt, int red, double denom,
                     double scale):
    """Run a job whose fields are set, except row_out; returns the loss
    (red _SUM or _MEAN), the float64 row values (_NONE), or None for an op
    that writes no row values."""
    cdef double stack_rows[_STACK_ROWS]
    cdef double total
    cdef cnp.ndarray rv
    cdef int64_t n = job.n_rows
    if not _IO[op] & _ROWS:
        with nogil:
            fx_run(op, dt, job, nt)
        return None
    if red == _NONE:
        rv = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT64, 0)
        job.row_out = <double *>cnp.PyArray_DATA(rv)
        with nogil:
            fx_run(op, dt, job, nt)
        return rv
    job.row_out = stack_rows
    if n > _STACK_ROWS:
        job.row_out = <double *>malloc(n * sizeof(double))
        if job.row_out == NULL:
            raise MemoryError()
    if n * job.n_cols <= _TINY_ELEMENTS:
        # Letting go of the GIL and taking it back costs a sixth of such a call.
        fx_run(op, dt, job, nt)
        total = fx_sum_f64(job.row_out, n)
    else:
        with nogil:
            fx_run(op, dt, job, nt)
            total = fx_sum_f64(job.row_out, n)
    if job.row_out != stack_rows:
        free(job.row_out)
    job.row_out = NULL
    return _loss(total, red, denom, scale, dt)


cdef object _ce_mean_labelled(fx_job *job, int dt, int nt):
    """The mean cross entropy of a job whose labels are unchecked: each block
    of labels is checked as its rows run (fx_run_labelled), so they are read
    from memory once, behind the arithmetic; a bad label raises as
    fx_check_labels's would."""
    cdef int64_t n = job.n_rows, counted = 0, bad
    cdef double total = 0.0
    job.row_out = <double *>malloc(n * sizeof(double))
    if job.row_out == NULL:
        raise MemoryError()
    with nogil:
        bad = fx_run_labelled(FX_CE_HARD, dt, job, nt, &counted, &total)
    free(job.row_out)
    job.row_out = NULL
    if bad >= 0:
        raise label_error(job.labels[bad], (bad,), job.n_cols, job.ignore_index)
    return _loss(total, _MEAN, <double>counted, 1.0, dt)


def run(int op, cnp.ndarray x not None, *, num_threads=None, int xdtype=-1,
        cnp.ndarray labels=None, int64_t ignore_index=0,
        cnp.ndarray target=None, cnp.ndarray weight=None, double w_sum=0.0,
        double smoothing=0.0, double temperature=1.0, cnp.ndarray pos_weight=None,
        cnp.ndarray out=None, grad_output=1.0, cnp.ndarray gout=None,
        cnp.ndarray loss_out=None, str reduction="none", double denom=0.0,
        double scale=1.0, int64_t vocab_start=0, cnp.ndarray row_in=None,
        double softcap=0.0, double z_loss=0.0, cnp.ndarray zscale=None,
        cnp.ndarray lse_out=None, cnp.ndarray argmax_out=None, double beta=0.5):
    """Run op (fastxent.h) over the rows of the 2-D array x.

    x: (n, c) rows of float32 or float64, or 16-bit rows with xdtype FX_F16
    or FX_BF16 (then target, weight, pos_weight, gout and loss_out are
    float32). The keywords are the job fields the op reads (see _IO):
    labels (n,) int64; target (n, c); weight (c,) class weights, or for an
    elementwise op (n, c) rows like pos_weight (row stride 0: broadcast);
    out (n, c) for the gradient or the (log-)softmax; loss_out (n, c).
    The gradient written into out is grad_output (a number, or (n,)
    contiguous float64 per row) times the reduction's factor
    (scale, over denom for "mean"), times gout elementwise when given.

    Returns, for an op with row values, their fixed-order sum reduced as
    reduction says ("mean": over denom) times scale, in the compute dtype;
    for reduction "none" the (n,) float64 row values themselves (unscaled);
    otherwise None. The shard ops take vocab_start and row_in (_run_shard).
    The cross entropy options ops take softcap (0: none), z_loss and, with
    out, zscale ((n,) contiguous float64, the z-loss part's gradient factor
    per row, required when z_loss > 0), and fill lse_out ((n,) float64) and
    argmax_out ((n,) int64) when given. The JSD ops take beta and, as an
    ignore mask, labels (optional).
    """
    cdef fx_job job
    cdef int cnum
    cdef int dt = _set_x(&job, x, xdtype, &cnum)
    cdef int io = _IO[op] if 0 <= op < FX_NUM_OPS else 0
    cdef int red = _reduction(reduction)
    cdef double gs = 0.0
    cdef cnp.ndarray gsa = None
    cdef int nt = _threads(num_threads)
    if io == 0:
        raise ValueError(f"internal: no op {op}")
    if io & _LABELS:
        if labels is None:
            raise ValueError("internal: labels are required")
        _set_labels(&job, labels, ignore_index)
    elif io & _MASK and labels is not None:
        _set_labels(&job, labels, ignore_index)
    if io & _TARGET:
        if target is None:
            raise ValueError("internal: target is required")
        job.t = _in_rows(target, &job, cnum, "target", &job.t_ld)
    if io & (_LABELS | _TARGET) and not io & _ELEM:
        if weight is not None:
            _set_class_weight(&job, weight, cnum)
        job.w_sum = w_sum
        job.smoothing = smoothing
    if io & _ELEM:
        if weight is not None:
            job.w = _in_rows(weight, &job, cnum, "weight", &job.w_ld)
        if pos_weight is not None:
            job.pw = _in_rows(pos_weight, &job, cnum, "pos_weight", &job.pw_ld)
        if loss_out is not None:
            if not cnp.PyArray_ISWRITEABLE(loss_out):
                raise ValueError("internal: loss_out is read-only")
            job.loss_out = <void *>_in_rows(loss_out, &job, cnum, "loss_out", &job.loss_ld)
        if gout is not None:
            job.gout = _in_rows(gout, &job, cnum, "grad_output", &job.gout_ld)
    if io & _SHARD:
        return _run_shard(op, dt, cnum, &job, x, out, row_in, vocab_start, nt)
    if io & _TEMP:
        if not temperature > 0:
            raise ValueError("internal: temperature must be positive")
        job.temperature = temperature
    if io & _BETA:
        if not 0.0 <= beta <= 1.0:
            raise ValueError("internal: beta must be in [0, 1]")
        job.beta = beta
    if io & _OPTS:
        if not (softcap >= 0 and z_loss >= 0):
            raise ValueError("internal: softcap and z_loss must be >= 0")
        job.softcap = softcap
        job.z_loss = z_loss
        if lse_out is not None:
            job.lse_out = <double *>_per_row(lse_out, job.n_rows, cnp.NPY_FLOAT64, "lse_out")
        if argmax_out is not None:
            job.argmax_out = <int64_t *>_per_row(argmax_out, job.n_rows, cnp.NPY_INT64,
                                                 "argmax_out")
        if out is not None and z_loss > 0:
            job.zscale = <const double *>_per_row(zscale, job.n_rows, cnp.NPY_FLOAT64, "zscale",
                                                      False)
    if io & _OUT:
        if out is None:
            raise ValueError("internal: out is required")
        _set_out(&job, out, cnp.PyArray_TYPE(x))
    elif out is not None:
        if not io & _GRAD:
            raise ValueError("internal: this op writes no gradient")
        _set_out(&job, out, cnp.PyArray_TYPE(x))
        gsa = _gscale(&job, grad_output, _grad_factor(red, denom, scale), &gs)
    return _execute(op, dt, &job, nt, red, denom, scale)


cdef object _run_shard(int op, int dt, int cnum, fx_job *job, cnp.ndarray x, cnp.ndarray out,
                       cnp.ndarray row_in, int64_t vocab_start, int nt):
    """The shard ops (rows/shard.h), labels and weights set. FX_SHARD_STATS
    returns the (n, 5) float64 statistics; out, if given, receives
    exp(x - max) in the compute dtype. FX_SHARD_GRAD writes the gradient
    into out (x's type, required) from row_in, (n, 4) contiguous float64."""
    cdef cnp.ndarray rv = None
    job.vocab_start = vocab_start
    if op == FX_SHARD_STATS:
        if out is not None:
            _set_out(job, out, cnum)
        rv = cnp.PyArray_EMPTY(2, [job.n_rows, 5], cnp.NPY_FLOAT64, 0)
        job.row_out = <double *>cnp.PyArray_DATA(rv)
    else:
        if out is None or row_in is None:
            raise ValueError("internal: out and row_in are required")
        _set_out(job, out, cnp.PyArray_TYPE(x))
        if job.n_rows > 1 and _ld(row_in, job.n_rows, 4, cnp.NPY_FLOAT64, "row_in") != 4:
            raise ValueError("internal: row_in must be contiguous")
        job.row_in = <const double *>cnp.PyArray_DATA(row_in)
    with nogil:
        fx_run(op, dt, job, nt)
    return rv


cdef void *_per_row(cnp.ndarray a, int64_t n, int num, str name,
                   bint writes=True) except NULL:
    """The data of a (n,) contiguous array of type num (writeable if writes)."""
    if (a is None or cnp.PyArray_NDIM(a) != 1 or a.shape[0] != n
            or cnp.PyArray_TYPE(a) != num or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or (writes and not cnp.PyArray_ISWRITEABLE(a))):
        raise ValueError(f"internal: {name} must be a contiguous (n,) array of the right "
                         f"dtype{', writeable' if writes else ''}")
    cdef void *p = cnp.PyArray_DATA(a)
    if p == NULL:  # n == 0: any valid pointer, never dereferenced
        p = <void *>&_one_double
    return p


cdef double _one_double = 0.0


cdef cnp.ndarray _gscale(fx_job *job, grad_output, double factor, double *gs):
    """Point job.gscale at grad_output times factor: *gs for a number, else
    a new array of one value per row (returned, to be kept alive)."""
    cdef cnp.ndarray g, res
    cdef const double *pg
    cdef double *pr
    cdef int64_t i, n = job.n_rows
    if not isinstance(grad_output, cnp.ndarray):
        gs[0] = <double>grad_output * factor
        job.gscale = gs
        job.gscale_step = 0
        return None
    g = <cnp.ndarray>grad_output
    if (cnp.PyArray_NDIM(g) != 1 or g.shape[0] != n or cnp.PyArray_TYPE(g) != cnp.NPY_FLOAT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(g)):
        raise ValueError("internal: grad_output must be contiguous float64 of length n")
    res = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT64, 0)
    pg = <const double *>cnp.PyArray_DATA(g)
    pr = <double *>cnp.PyArray_DATA(res)
    for i in range(n):
        pr[i] = pg[i] * factor
    job.gscale = pr
    job.gscale_step = 1 if n != 1 else 0
    return res


# --------------------------------------------------------------------------
# The common calls: default options on a 2-D C-contiguous float array
# --------------------------------------------------------------------------

cdef inline bint _last_axis(object axis):
    return type(axis) is int and axis == -1


cdef int _common_dtype(x):
    """x's type number when it is a 2-D C-contiguous aligned native float32
    or float64 ndarray with at least one row and one column; -1 otherwise."""
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


cdef bint _overlaps(cnp.ndarray a, cnp.ndarray b):
    """Whether the byte ranges of two contiguous arrays intersect."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef cnp.ndarray _common_out(out, cnp.ndarray xa, cnp.ndarray la):
    """out= of a common call: a new array like xa when None; out itself when
    it is an array like xa (C-contiguous, aligned, native, writeable) that
    is xa itself or shares no memory with xa (nor with la, when given);
    None otherwise (the general path then decides)."""
    cdef int tnum = cnp.PyArray_TYPE(xa)
    if out is None:
        return cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(xa), tnum, 0)
    if type(out) is not np.ndarray:
        return None
    cdef cnp.ndarray ga = <cnp.ndarray>out
    if (cnp.PyArray_NDIM(ga) != 2 or ga.shape[0] != xa.shape[0] or ga.shape[1] != xa.shape[1]
            or cnp.PyArray_TYPE(ga) != tnum or not cnp.PyArray_IS_C_CONTIGUOUS(ga)
            or not cnp.PyArray_ISALIGNED(ga) or not cnp.PyArray_ISNOTSWAPPED(ga)
            or not cnp.PyArray_ISWRITEABLE(ga)):
        return None
    if (la is not None and _overlaps(ga, la)) or (ga is not xa and _overlaps(ga, xa)):
        return None
    return ga


def label_error(value, position, int64_t n_classes, ignore_index):
    """The ValueError for a label outside [0, C) that is not ignore_index."""
    return ValueError(f"label {value} at position {position} is out of range [0, {n_classes})"
                      f" and is not ignore_index ({ignore_index})")


def cross_entropy_common(x, labels, axis, weight, ignore_index, reduction, label_smoothing,
                         from_logits, base, num_threads, bint want_grad=False,
                         grad_output=1.0, out=None):
    """fastxent.cross_entropy[_with_grad] for its common call, or None.

    The common call: default options (any ignore_index), a 2-D C-contiguous
    aligned native float32/float64 x with C > 0 and at least one row,
    contiguous int64 labels; with want_grad, a float grad_output and out as
    in _common_out. Every label is checked here (a bad one raises as _api
    does); everything else is left to the general path."""
    if not (weight is None and from_logits is True and base is None and _last_axis(axis)
            and type(reduction) is str and reduction == "mean"
            and (type(label_smoothing) is float or type(label_smoothing) is int)
            and label_smoothing == 0 and type(ignore_index) is int
            and _threads_ok(num_threads)):
        return None
    if want_grad and type(grad_output) is not float:
        return None
    cdef int tnum = _common_dtype(x)
    if tnum < 0 or type(labels) is not np.ndarray:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.ndarray la = <cnp.ndarray>labels
    if (cnp.PyArray_NDIM(la) != 1 or cnp.PyArray_TYPE(la) != cnp.NPY_INT64
            or la.shape[0] != xa.shape[0] or not cnp.PyArray_IS_C_CONTIGUOUS(la)
            or not cnp.PyArray_ISALIGNED(la) or not cnp.PyArray_ISNOTSWAPPED(la)):
        return None
    cdef cnp.ndarray ga = None
    if want_grad:
        ga = _common_out(out, xa, la)
        if ga is None:
            return None
    cdef int64_t ii
    try:
        ii = ignore_index
    except OverflowError:
        return None
    cdef fx_job job
    cdef int cnum
    cdef int dt = _set_x(&job, xa, -1, &cnum)
    cdef int64_t counted = 0
    _set_labels(&job, la, ii)
    job.w_sum = <double>job.n_cols
    if not want_grad and job.n_rows * job.n_cols > _TINY_ELEMENTS:
        return _ce_mean_labelled(&job, dt, _threads(num_threads))
    cdef int64_t bad = fx_check_labels(job.labels, job.n_rows, job.n_cols, ii, &counted)
    if bad >= 0:
        raise label_error(job.labels[bad], (bad,), job.n_cols, ii)
    cdef double gs
    if want_grad:
        _set_out(&job, ga, tnum)
        _gscale(&job, grad_output, _grad_factor(_MEAN, <double>counted, 1.0), &gs)
    loss = _execute(FX_CE_HARD, dt, &job, _threads(num_threads), _MEAN, <double>counted, 1.0)
    if want_grad:
        return loss, ga
    return loss


def cross_entropy_mean_at(size_t x, int64_t n, int64_t c, int dtype, size_t labels,
                          int64_t ignore_index, size_t out, int num_threads):
    """The mean cross entropy of n contiguous rows of c logits of the kernels'
    dtype code dtype (0 float32, 1 float64, 2 float16, 3 bfloat16) at address
    x with int64 labels at address labels, its gradient written to the
    contiguous rows of the same dtype at out (0: no gradient), as a float.

    For callers whose memory NumPy cannot view without cost (fastxent.torch's
    eager path, where a view per tensor costs as much as an (8, 10) loss);
    the caller vouches for the addresses, sizes and contiguity. Labels are
    checked here as everywhere else."""
    if n < 1 or c < 1 or num_threads < 1 or not FX_F32 <= dtype <= FX_BF16:
        raise ValueError(f"internal: n={n}, c={c}, dtype={dtype}, num_threads={num_threads}")
    cdef fx_job job
    memset(&job, 0, sizeof(fx_job))
    job.n_rows = n
    job.n_cols = c
    job.x = <const void *>x
    job.x_ld = c if n > 1 else 0
    job.temperature = 1.0
    job.labels = <const int64_t *>labels
    job.ignore_index = ignore_index
    job.w_sum = <double>c
    if out == 0 and n * c > _TINY_ELEMENTS:
        return float(_ce_mean_labelled(&job, dtype, num_threads))
    cdef int64_t counted = 0
    cdef int64_t bad = fx_check_labels(job.labels, n, c, ignore_index, &counted)
    if bad >= 0:
        raise label_error(job.labels[bad], (bad,), c, ignore_index)
    cdef double gs
    if out != 0:
        job.out = <void *>out
        job.out_ld = job.x_ld
        gs = _grad_factor(_MEAN, <double>counted, 1.0)
        job.gscale = &gs
        job.gscale_step = 0
    return float(_execute(FX_CE_HARD, dtype, &job, num_threads, _MEAN,
                          <double>counted, 1.0))


def rows_common(int op, x, axis, num_threads, out=None, from_logits=True, base=None):
    """logsumexp / entropy (row values) or log_softmax / softmax (rows) for
    the common call, or None: default options, the last axis of a 2-D
    C-contiguous aligned native float32/float64 x with at least one row
    and one column; out as in _common_out. Everything else goes through the
    general path, which runs the same kernel: same bits."""
    if not (from_logits is True and base is None and _last_axis(axis)
            and _threads_ok(num_threads)):
        return None
    cdef int tnum = _common_dtype(x)
    if tnum < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef bint writes_rows = _IO[op] & _OUT
    if not writes_rows and out is not None:
        return None
    cdef cnp.ndarray ga = None
    cdef fx_job job
    cdef int cnum
    cdef int dt = _set_x(&job, xa, -1, &cnum)
    if writes_rows:
        ga = _common_out(out, xa, None)
        if ga is None:
            return None
        _set_out(&job, ga, tnum)
    cdef object rv = _execute(op, dt, &job, _threads(num_threads), _NONE, 0.0, 1.0)
    if writes_rows:
        return ga
    if dt == FX_F64:
        return rv
    # float32 results, rounded once from the float64 row values as astype does.
    cdef int64_t i, n = job.n_rows
    cdef cnp.ndarray r32 = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT32, 0)
    cdef float *p32 = <float *>cnp.PyArray_DATA(r32)
    cdef const double *p64 = <const double *>cnp.PyArray_DATA(<cnp.ndarray>rv)
    for i in range(n):
        p32[i] = <float>p64[i]
    return r32


# --------------------------------------------------------------------------
# The XLA FFI handler (csrc/xla_ffi.c), for fastxent.jax
# --------------------------------------------------------------------------

cdef extern from "xla_ffi.h":
    void *fx_xla_handler_address()
    int fx_xla_default_threads


def xla_ffi_handler():
    """The XLA FFI handler (API version 1) as a PyCapsule for
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")."""
    return PyCapsule_New(fx_xla_handler_address(), NULL, NULL)


# --------------------------------------------------------------------------
# Accuracy probes of the exp and tanh kernels
# --------------------------------------------------------------------------

ctypedef void (*_vec_f32)(const float *x, float *y, int64_t n) noexcept nogil
ctypedef void (*_vec_f64)(const double *x, double *y, int64_t n) noexcept nogil


cdef object _probe(cnp.ndarray x, _vec_f32 f32, _vec_f64 f64, str name):
    """f32 or f64 (the active ISA's kernel) over the values of x, in x's shape."""
    x = cnp.PyArray_GETCONTIGUOUS(x)
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(1, [x.size], cnp.PyArray_TYPE(x), 0)
    cdef int64_t n = x.size
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            f32(<const float *>cnp.PyArray_DATA(x), <float *>cnp.PyArray_DATA(y), n)
    elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT64:
        with nogil:
            f64(<const double *>cnp.PyArray_DATA(x), <double *>cnp.PyArray_DATA(y), n)
    else:
        raise TypeError(f"{name} takes float32 or float64")
    return y.reshape((<object>x).shape)


def expm(cnp.ndarray x):
    """The active ISA's exp kernel for x <= 16 (expm.h), for accuracy tests."""
    return _probe(x, fx_expm_f32_array, fx_expm_f64_array, "expm")


def expsum(cnp.ndarray x):
    """The active ISA's exp of terms that are only summed (expm.h's
    fx_expsum), float32, for its tests."""
    if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32:
        raise TypeError("expsum takes float32")
    return _probe(x, fx_expsum_f32_array, fx_expm_f64_array, "expsum")


def expsum_f32_mismatches(float lo, float hi):
    """(count, largest argument) of the float32 in [lo, hi] for which the
    active ISA's fx_expsum_f32 and fx_expm_f32 differ in any bit."""
    if not (lo <= hi):
        raise ValueError("need lo <= hi")
    cdef float last = 0
    cdef int64_t count
    with nogil:
        count = fx_expsum_f32_mismatches(lo, hi, &last)
    return count, last


def tanh(cnp.ndarray x):
    """The active ISA's tanh kernel (tanhm.h), for accuracy tests."""
    return _probe(x, fx_tanh_f32_array, fx_tanh_f64_array, "tanh")


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
