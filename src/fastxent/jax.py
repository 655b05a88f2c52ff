"""fastxent's fused kernels as differentiable JAX functions (CPU).

    import fastxent.jax as fxj
    loss = fxj.cross_entropy(logits, labels)          # works under jit/grad/vmap

Each loss is a ``jax.custom_vjp``: the forward pass used by differentiation
calls ``*_with_grad`` once, which visits every row once for the loss *and*
its gradient, and keeps only that gradient (shaped like ``logits``) as the
residual; the backward pass scales it by the incoming cotangent. Plain
evaluation (no differentiation) calls the loss-only kernel. Signatures and
semantics are fastxent's NumPy ones (class ``axis=-1``, ``reduction``,
``weight``, ``ignore_index``, ``label_smoothing``, ``base``, ...), not
torch's and not optax's: see ``docs/jax.md`` for the optax equivalents.

Transport: an XLA FFI handler (``jax.ffi``, CPU) that is a ctypes function
over XLA's FFI C API, so nothing is compiled: XLA's own operand and result
buffers become NumPy views, the kernels read the logits in place and write
the gradient straight into XLA's result buffer, with the GIL released.
``jax.pure_callback`` (which copies operands and results) is the
alternative: ``FASTXENT_JAX_TRANSPORT=callback``. Measurements of both and
of a compiled C++ handler: docs/jax.md, "Transport".

Options (``axis``, ``reduction``, ``ignore_index``, ``label_smoothing``,
``temperature``, ``base``, ``num_threads``...) are static Python values;
``labels``/``target``, ``weight`` and ``pos_weight`` are arrays and may be
traced. Gradients flow to ``logits`` only: asking for one with respect to a
target or a weight raises ``NotImplementedError`` naming it (wrap it in
``jax.lax.stop_gradient`` if it is a constant). Integer labels get
``float0`` cotangents. Label ranges and weight signs are checked on the
data, inside the call: under ``jit`` a bad value surfaces as JAX's runtime
error carrying fastxent's ``ValueError`` message.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import operator
import os

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero
except ImportError as exc:  # pragma: no cover - exercised only without jax
    raise ImportError(
        "fastxent.jax needs JAX: pip install 'fastxent[jax]' (or pip install jax)"
    ) from exc

import fastxent as _fx
from fastxent import _api

__all__ = [
    "cross_entropy",
    "kl_div",
    "binary_cross_entropy",
    "log_softmax",
    "softmax",
    "logsumexp",
]

_REDUCTIONS = ("mean", "sum", "none")
_KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_KL_TARGETS = ("probs", "log_probs", "logits")


# --------------------------------------------------------------- validation
# Static options are checked when the function is traced, so a bad one is a
# plain Python exception at the call site, never a runtime error under jit.


def _float_dtype(x, name):
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {dt}")
    return np.dtype(dt)


def _compute_dtype(dt):
    """Reductions and per-row values: float64 for float64 inputs, else float32."""
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _axis(axis, ndim, name="logits"):
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None
    if ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar")
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {axis} is out of bounds for {name} with {ndim} dimensions")
    return a % ndim


def _reduction(reduction, allowed=_REDUCTIONS):
    return _api._check_reduction(reduction, allowed)


def _real(value, name, what):
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number ({what}), got a traced value; "
                        "pass it as a constant or mark it static in jax.jit")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    return v


def _base(base):
    if base is None:
        return None
    b = _real(base, "base", "a positive number other than 1")
    if not (b > 0 and b != 1 and math.isfinite(b)):
        raise ValueError(f"base must be a positive finite number other than 1, got {base!r}")
    return b


_threads = _api._check_threads


def _ignore_index(ignore_index):
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None


def _batch_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


def _expand(g, axis):
    """A per-row cotangent broadcast back along the class axis."""
    return g if jnp.ndim(g) == 0 else jnp.expand_dims(g, axis)


# --------------------------------------------------------------- transport
# One call into fastxent is described by a JSON key: the NumPy function, its
# static keyword arguments, the names of the array arguments, the unbatched
# rank of the logits and whether the gradient is wanted. The key is all the
# compiled program holds (an FFI attribute), so a program from the
# persistent compilation cache or another process finds its host function
# by content, never by a per-process index.


def _key(**spec):
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _lead_index(idx, shape):
    """The element ``idx`` of the vmap dimensions for an argument whose
    dimensions are ``shape`` (size 1 where it is not batched)."""
    return tuple(i if d > 1 else 0 for i, d in zip(idx, shape)) + (Ellipsis,)


@functools.lru_cache(maxsize=None)
def _host(key):
    """``host(args, rets)``: NumPy views of the inputs and of the results,
    which it fills. vmap (``vmap_method="expand_dims"``) gives every argument
    the same leading dimensions, of size 1 where it is not batched; row ops
    take them as more batch rows, losses are run once per batch element."""
    spec = json.loads(key)
    name, kw = spec["fn"], spec["kw"]
    np_fn = getattr(_fx, name)
    if name in ("log_softmax", "softmax"):
        return lambda args, rets: np_fn(args[0], out=rets[0], **kw)
    if name == "logsumexp":
        def rows(args, rets):
            rets[0][...] = np_fn(args[0], **kw)
        return rows
    names, ndim, with_grad = spec["names"], spec["ndim"], spec["grad"]
    np_grad = getattr(_fx, name + "_with_grad")

    def one(args, rets):
        named = dict(zip(names[2:], args[2:]))
        if with_grad:
            loss, _ = np_grad(args[0], args[1], out=rets[1], **named, **kw)
        else:
            loss = np_fn(args[0], args[1], **named, **kw)
        rets[0][...] = loss

    def call(args, rets):
        lead = args[0].ndim - ndim
        if lead == 0:
            return one(args, rets)
        for idx in np.ndindex(*rets[0].shape[:lead]):
            one([a[_lead_index(idx, a.shape[:lead])] for a in args], [r[idx + (Ellipsis,)] for r in rets])

    return call


def _run_callback(key, ndim, results, *args):
    """The pure_callback side: allocate the results (with vmap's leading
    dimensions) and let the host function fill them."""
    args = [np.asarray(a) for a in args]  # CPU arrays: views, not copies
    lead = args[0].ndim - ndim
    shape = np.broadcast_shapes(*(a.shape[:lead] for a in args))
    rets = [np.empty(shape + r.shape, r.dtype) for r in results]
    _host(key)(args, rets)
    return tuple(rets)


def _call(results, arrays, via, **spec):
    """Run the call described by ``spec`` on ``arrays`` (logits first), by
    ``via`` (a ``transport``: it is part of every cached op, since JAX caches
    what a custom_vjp function traces to)."""
    key = _key(ndim=arrays[0].ndim, **spec)
    results = tuple(results)
    if via == "ffi":
        return jax.ffi.ffi_call(_FFI_TARGET, results, vmap_method="expand_dims")(*arrays, op=key)
    return jax.pure_callback(functools.partial(_run_callback, key, arrays[0].ndim, results),
                             results, *arrays, vmap_method="expand_dims")


# --------------------------------------------------------------- XLA FFI
# The host function runs as an XLA FFI handler (jax.ffi): XLA hands it its
# own input and result buffers, which become NumPy views, so the kernels read
# the operands and write the gradient in place. (jax.pure_callback copies
# every operand into a new array and every result back into XLA's buffer.)
# The handler is a ctypes function over the XLA FFI C API (xla/ffi/api/
# c_api.h in the jax wheel): nothing to compile. Only the leading members of
# each struct are declared; XLA keeps those fixed and grows structs at their
# end, which is what struct_size is for.

_FFI_TARGET = "fastxent_numpy"
_XLA_METADATA = 1  # XLA_FFI_Extension_Metadata
_XLA_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_XLA_INVALID_ARGUMENT = 3
_XLA_STRING = 4  # XLA_FFI_AttrType_STRING
_XLA_DTYPES = {
    1: np.dtype(np.bool_), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.uint8), 7: np.dtype(np.uint16), 8: np.dtype(np.uint32),
    9: np.dtype(np.uint64), 10: np.dtype(np.float16), 11: np.dtype(np.float32),
    12: np.dtype(np.float64), 16: np.dtype(jnp.bfloat16),
}


def _struct(name, *fields):
    return type(name, (ctypes.Structure,), {"_fields_": list(fields)})


_Head = (("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p))
_ExtBase = _struct("XLA_FFI_Extension_Base", ("struct_size", ctypes.c_size_t),
                   ("type", ctypes.c_int), ("next", ctypes.c_void_p))
_Version = _struct("XLA_FFI_Api_Version", *_Head, ("major_version", ctypes.c_int),
                   ("minor_version", ctypes.c_int))
_ErrorArgs = _struct("XLA_FFI_Error_Create_Args", *_Head, ("message", ctypes.c_char_p),
                     ("errc", ctypes.c_int))
_Api = _struct("XLA_FFI_Api", *_Head, ("api_version", _Version), ("internal_api", ctypes.c_void_p),
               ("error_create", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorArgs))))
_Buffer = _struct("XLA_FFI_Buffer", *_Head, ("dtype", ctypes.c_int), ("data", ctypes.c_void_p),
                  ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64)))
_ByteSpan = _struct("XLA_FFI_ByteSpan", ("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t))
_List = (*_Head, ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)))
_Args = _struct("XLA_FFI_Args", *_List, ("items", ctypes.POINTER(ctypes.c_void_p)))
_Attrs = _struct("XLA_FFI_Attrs", *_List, ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                 ("items", ctypes.POINTER(ctypes.c_void_p)))
_CallFrame = _struct("XLA_FFI_CallFrame", *_Head, ("api", ctypes.POINTER(_Api)),
                     ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _Args),
                     ("rets", _Args), ("attrs", _Attrs))
_Metadata = _struct("XLA_FFI_Metadata", ("struct_size", ctypes.c_size_t),
                    ("api_version", _Version), ("traits", ctypes.c_uint32))
_MetadataExt = _struct("XLA_FFI_Metadata_Extension", ("extension_base", _ExtBase),
                       ("metadata", ctypes.POINTER(_Metadata)))


def _buffer_view(address, writable):
    b = ctypes.cast(address, ctypes.POINTER(_Buffer)).contents
    dtype = _XLA_DTYPES[b.dtype]
    shape = tuple(b.dims[i] for i in range(b.rank))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    view = np.frombuffer((ctypes.c_char * nbytes).from_address(b.data), dtype).reshape(shape)
    view.flags.writeable = writable
    return view


def _ffi_key(frame):
    attrs = frame.attrs
    for i in range(attrs.size):
        name = attrs.names[i].contents
        if attrs.types[i] == _XLA_STRING and ctypes.string_at(name.ptr, name.len) == b"op":
            value = ctypes.cast(attrs.items[i], ctypes.POINTER(_ByteSpan)).contents
            return ctypes.string_at(value.ptr, value.len).decode()
    raise ValueError("fastxent FFI call without its 'op' attribute")


def _ffi_handler(frame_ptr):
    frame = frame_ptr.contents
    try:
        if frame.extension_start:
            ext = ctypes.cast(frame.extension_start, ctypes.POINTER(_ExtBase)).contents
            if ext.type == _XLA_METADATA:  # XLA asks which API version we speak
                meta = ctypes.cast(frame.extension_start,
                                   ctypes.POINTER(_MetadataExt)).contents.metadata.contents
                version = frame.api.contents.api_version
                meta.api_version.major_version = version.major_version
                meta.api_version.minor_version = version.minor_version
                meta.traits = 0
                return None
        if frame.stage != _XLA_EXECUTE:
            return None
        version = frame.api.contents.api_version
        if version.major_version != 0 or frame.struct_size < ctypes.sizeof(_CallFrame):
            raise RuntimeError(
                f"fastxent.jax does not know XLA FFI API {version.major_version}."
                f"{version.minor_version}; set FASTXENT_JAX_TRANSPORT=callback")
        args = [_buffer_view(frame.args.items[i], False) for i in range(frame.args.size)]
        rets = [_buffer_view(frame.rets.items[i], True) for i in range(frame.rets.size)]
        _host(_ffi_key(frame))(args, rets)
        return None
    except BaseException as exc:  # reported to XLA: JAX raises it at the call
        message = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        err = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, message, _XLA_INVALID_ARGUMENT)
        return frame.api.contents.error_create(ctypes.byref(err))


_FFI_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))(_ffi_handler)


def _register_ffi():
    try:
        jax.ffi.register_ffi_target(_FFI_TARGET, jax.ffi.pycapsule(_FFI_HANDLER), platform="cpu")
    except Exception:  # an XLA without the FFI: the callback still works
        return False
    return True


#: How calls reach the kernels: "ffi" (an XLA FFI handler, zero-copy; the
#: default) or "callback" (jax.pure_callback). FASTXENT_JAX_TRANSPORT picks
#: one at import; the value in force when a function is traced is used.
transport = os.environ.get("FASTXENT_JAX_TRANSPORT", "ffi")
if transport not in ("ffi", "callback"):
    raise ValueError(f"FASTXENT_JAX_TRANSPORT must be 'ffi' or 'callback', got {transport!r}")
if transport == "ffi" and not _register_ffi():
    transport = "callback"


def _no_grad(name, perturbed):
    if perturbed:
        raise NotImplementedError(
            f"fastxent.jax differentiates with respect to logits only, not {name}; "
            f"wrap {name} in jax.lax.stop_gradient if it is a constant")


def _loss_op(name, kwargs, arg_names, loss_shape, loss_dtype, row_axis, via):
    """A custom_vjp over the NumPy loss ``name`` with static ``kwargs``,
    whose forward for differentiation calls ``<name>_with_grad`` once.

    The arrays are ``arg_names`` (logits first; the others, targets and
    weights, are not differentiated). ``loss_shape(logits_shape)`` is the
    loss's shape. ``row_axis``: the class axis when the loss holds one value
    per row (its cotangent is broadcast along that axis), else None.
    """
    names = list(arg_names)

    def loss_spec(x):
        return jax.ShapeDtypeStruct(loss_shape(x.shape), loss_dtype)

    @jax.custom_vjp
    def op(*arrays):
        (loss,) = _call([loss_spec(arrays[0])], arrays, via, fn=name, kw=kwargs, names=names,
                        grad=False)
        return loss

    def fwd(*primals):
        arrays = tuple(p.value for p in primals)
        for p, nm in zip(primals[1:], arg_names[1:]):
            # Integers have no gradient to give (JAX's float0); floats would.
            if jnp.issubdtype(p.value.dtype, jnp.floating):
                _no_grad(nm, p.perturbed)
        x = arrays[0]
        specs = [loss_spec(x), jax.ShapeDtypeStruct(x.shape, x.dtype)]
        loss, grad = _call(specs, arrays, via, fn=name, kw=kwargs, names=names, grad=True)
        return loss, grad

    def bwd(grad, g):
        # None: a symbolic zero, which JAX makes float0 for integer labels.
        rest = (None,) * (len(arg_names) - 1)
        if isinstance(g, SymbolicZero):
            return (None, *rest)
        if row_axis is not None:
            g = _expand(g, row_axis)
        return ((grad * g).astype(grad.dtype), *rest)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    op.__name__ = name
    return op


def _make_loss(name, arg_names, kwargs, per_row, loss_dtype, via):
    """The op of one loss with its static options bound. ``per_row``: the
    class axis when ``reduction="none"`` gives one value per row; "elementwise"
    when it gives one per element; None otherwise."""
    if per_row is None:
        shape, row_axis = (lambda s: ()), None
    elif per_row == "elementwise":
        shape, row_axis = (lambda s: s), None
    else:
        shape, row_axis = (lambda s: _batch_shape(s, per_row)), per_row
    return _loss_op(name, kwargs, arg_names, shape, loss_dtype, row_axis, via)


# --------------------------------------------------------------- losses


@functools.lru_cache(maxsize=256)
def _ce_op(arg_names, soft, axis, ignore_index, reduction, label_smoothing, from_logits, base,
           num_threads, loss_dtype, via):
    kw = dict(axis=axis, reduction=reduction, label_smoothing=label_smoothing,
              from_logits=from_logits, base=base, num_threads=num_threads)
    if not soft:
        kw["ignore_index"] = ignore_index
    return _make_loss("cross_entropy", arg_names, kw, axis if reduction == "none" else None,
                      loss_dtype, via)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, from_logits=True, base=None, num_threads=None):
    """Cross entropy of ``softmax(logits)`` along ``axis`` against ``labels``.

    ``labels``: integer class indices of the logits' shape without ``axis``
    (``ignore_index`` positions are skipped), or floating class
    probabilities of the logits' shape. ``weight``: per-class weights,
    shape ``(C,)``. ``reduction``: "mean" (weighted mean over counted
    labels, as torch), "sum" or "none" (batch-shaped). Same semantics as
    ``fastxent.cross_entropy``; the result is float32 for 16- and 32-bit
    logits, float64 for float64. Differentiable with respect to ``logits``.
    """
    dt = _float_dtype(logits, "logits")
    ndim = jnp.ndim(logits)
    ax = _axis(axis, ndim)
    lab_dt = jnp.result_type(labels)
    soft = bool(jnp.issubdtype(lab_dt, jnp.floating))
    want = jnp.shape(logits) if soft else _batch_shape(jnp.shape(logits), ax)
    if jnp.shape(labels) != want:
        kind = "probability targets" if soft else "integer labels"
        raise ValueError(f"{kind} must have shape {want}, got {jnp.shape(labels)}")
    if not soft and not jnp.issubdtype(lab_dt, jnp.integer):
        raise TypeError(f"labels must be integer class indices or floating probabilities, got {lab_dt}")
    eps = _real(label_smoothing, "label_smoothing", "a number in [0, 1]")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    arrays, names = [logits, labels], ["logits", "labels"]
    if weight is not None:
        c = jnp.shape(logits)[ax]
        if jnp.shape(weight) != (c,):
            raise ValueError(f"weight must have shape ({c},) (one per class), got {jnp.shape(weight)}")
        _float_dtype(weight, "weight")
        arrays.append(weight)
        names.append("weight")
    op = _ce_op(tuple(names), soft, ax - ndim, _ignore_index(ignore_index), _reduction(reduction),
                eps, bool(from_logits), _base(base), _threads(num_threads), _compute_dtype(dt),
                transport)
    return op(*(jnp.asarray(a) for a in arrays))


@functools.lru_cache(maxsize=256)
def _kl_op(axis, target_kind, reduction, temperature, base, num_threads, loss_dtype, via):
    kw = dict(axis=axis, target_kind=target_kind, reduction=reduction, temperature=temperature,
              base=base, num_threads=num_threads)
    return _make_loss("kl_div", ("logits", "target"), kw,
                      axis if reduction == "none" else None, loss_dtype, via)


def kl_div(logits, target, *, axis=-1, target_kind="probs", reduction="batchmean",
           temperature=1.0, base=None, num_threads=None):
    """``KL(P || softmax(logits / T))`` along ``axis``, times ``T**2``.

    ``target`` (the logits' shape) is P as ``target_kind="probs"``,
    ``"log_probs"`` or ``"logits"`` (``P = softmax(target / T)``: the
    distillation case). "batchmean" and "mean" divide the sum by the number
    of rows, "none" gives one value per row. Same semantics as
    ``fastxent.kl_div``; differentiable with respect to ``logits``.
    """
    dt = _float_dtype(logits, "logits")
    ndim = jnp.ndim(logits)
    ax = _axis(axis, ndim)
    if jnp.shape(target) != jnp.shape(logits):
        raise ValueError(f"target must have the logits' shape {jnp.shape(logits)}, got {jnp.shape(target)}")
    _float_dtype(target, "target")
    if not isinstance(target_kind, str) or target_kind not in _KL_TARGETS:
        raise ValueError(f"target_kind must be one of 'probs', 'log_probs', 'logits'; got {target_kind!r}")
    T = _real(temperature, "temperature", "a positive number")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    op = _kl_op(ax - ndim, target_kind, _reduction(reduction, _KL_REDUCTIONS), T, _base(base),
                _threads(num_threads), _compute_dtype(dt), transport)
    return op(jnp.asarray(logits), jnp.asarray(target))


@functools.lru_cache(maxsize=256)
def _bce_op(arg_names, reduction, from_logits, base, num_threads, loss_dtype, via):
    kw = dict(reduction=reduction, from_logits=from_logits, base=base, num_threads=num_threads)
    return _make_loss("binary_cross_entropy", arg_names, kw,
                      "elementwise" if reduction == "none" else None, loss_dtype, via)


def binary_cross_entropy(logits, target, *, weight=None, pos_weight=None, reduction="mean",
                         from_logits=True, base=None, num_threads=None):
    """Elementwise binary cross entropy of ``sigmoid(logits)`` against
    ``target`` (torch's ``binary_cross_entropy_with_logits``; with
    ``from_logits=False`` ``logits`` holds probabilities). ``weight`` and
    ``pos_weight`` broadcast against the input. "none" is elementwise.
    Differentiable with respect to ``logits``."""
    dt = _float_dtype(logits, "logits")
    shape = jnp.shape(logits)
    if jnp.shape(target) != shape:
        raise ValueError(f"target must have the logits' shape {shape}, got {jnp.shape(target)}")
    _float_dtype(target, "target")
    arrays, names = [logits, target], ["logits", "target"]
    for nm, v in (("weight", weight), ("pos_weight", pos_weight)):
        if v is None:
            continue
        _float_dtype(v, nm)
        try:
            np.broadcast_shapes(jnp.shape(v), shape)
        except ValueError:
            raise ValueError(f"{nm} of shape {jnp.shape(v)} does not broadcast to the input shape "
                             f"{shape}") from None
        # Every argument carries the logits' rank, so that vmap's leading
        # dimensions line up; the kernel broadcasts the size-1 dimensions
        # (no logits-sized weight is ever formed).
        v = jnp.asarray(v)
        arrays.append(v.reshape((1,) * (len(shape) - v.ndim) + v.shape))
        names.append(nm)
    op = _bce_op(tuple(names), _reduction(reduction), bool(from_logits), _base(base),
                 _threads(num_threads), _compute_dtype(dt), transport)
    return op(*(jnp.asarray(a) for a in arrays))


# --------------------------------------------------------------- building blocks


def _rows(name, x, axis, num_threads, via, out_shape, out_dtype):
    """A row op; vmap's leading dimensions are more batch rows, so the kernel
    takes them in one call (``axis`` counts from the end)."""
    spec = jax.ShapeDtypeStruct(out_shape(x.shape), out_dtype)
    (y,) = _call([spec], [x], via, fn=name, kw={"axis": axis, "num_threads": num_threads})
    return y


def _normaliser(name, bwd):
    """log_softmax or softmax: the output is the residual, ``bwd(y, g, axis)``
    the cotangent in float32 (or wider)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
    def op(x, axis, num_threads, via):
        return _rows(name, x, axis, num_threads, via, lambda s: s, x.dtype)

    def op_fwd(x, axis, num_threads, via):
        y = op(x, axis, num_threads, via)
        return y, y

    def op_bwd(axis, num_threads, via, y, g):
        dt = jnp.promote_types(g.dtype, jnp.float32)
        return (bwd(y.astype(dt), g.astype(dt), axis).astype(y.dtype),)

    op.defvjp(op_fwd, op_bwd)
    return op


_log_softmax = _normaliser(
    "log_softmax", lambda y, g, axis: g - jnp.exp(y) * jnp.sum(g, axis=axis, keepdims=True))
_softmax = _normaliser(
    "softmax", lambda y, g, axis: y * (g - jnp.sum(g * y, axis=axis, keepdims=True)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _logsumexp(x, axis, num_threads, via):
    return _rows("logsumexp", x, axis, num_threads, via, lambda s: _batch_shape(s, axis),
                 _compute_dtype(np.dtype(x.dtype)))


def _logsumexp_fwd(x, axis, num_threads, via):
    return _logsumexp(x, axis, num_threads, via), x


def _logsumexp_bwd(axis, num_threads, via, x, g):
    p = _softmax(x, axis, num_threads, via)
    return ((jnp.expand_dims(g, axis) * p).astype(x.dtype),)


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _row_input(x, axis):
    _float_dtype(x, "x")
    x = jnp.asarray(x)
    return x, _axis(axis, x.ndim, "x") - x.ndim


def log_softmax(x, *, axis=-1, num_threads=None):
    """``log(softmax(x))`` along ``axis``, in ``x``'s dtype (fastxent.log_softmax)."""
    x, ax = _row_input(x, axis)
    return _log_softmax(x, ax, _threads(num_threads), transport)


def softmax(x, *, axis=-1, num_threads=None):
    """``softmax(x)`` along ``axis``, in ``x``'s dtype (fastxent.softmax)."""
    x, ax = _row_input(x, axis)
    return _softmax(x, ax, _threads(num_threads), transport)


def logsumexp(x, *, axis=-1, num_threads=None):
    """``log(sum(exp(x)))`` along ``axis``: batch-shaped, float32 for 16- and
    32-bit ``x`` (float64 for float64), as ``fastxent.logsumexp``."""
    x, ax = _row_input(x, axis)
    return _logsumexp(x, ax, _threads(num_threads), transport)
