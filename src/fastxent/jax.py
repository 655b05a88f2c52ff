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

Transport: an XLA FFI handler (``jax.ffi``, CPU) written in C and compiled
into ``fastxent._core`` (``csrc/xla_ffi.c``): the kernels read XLA's operand
buffers in place and write the loss and the gradient straight into XLA's
result buffers, with no Python and no GIL on the way. ``jax.pure_callback``
(which copies operands and results and runs Python) is the alternative:
``FASTXENT_JAX_TRANSPORT=callback``. Measurements of both: docs/jax.md,
"Transport".

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
from fastxent import _api, _core

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


_ignore_index = _api._check_ignore_index


def _classes_last(x, axis, name="logits"):
    """``x`` with its class axis (checked to have at least one class) last:
    the handler and the callback only ever see rows of contiguous classes."""
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, name)
    if x.shape[ax] == 0:
        raise ValueError(f"{name} has no classes: axis {axis} has length 0 (C == 0)")
    return x if ax == x.ndim - 1 else jnp.moveaxis(x, ax, -1)


def _batch_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


def _expand(g, axis):
    """A per-row cotangent broadcast back along the class axis."""
    return g if jnp.ndim(g) == 0 else jnp.expand_dims(g, axis)


# --------------------------------------------------------------- transport
# One call into fastxent: the function, its static keyword arguments, the
# names of the array arguments, the unbatched rank of the logits and whether
# the gradient is wanted. The class axis is always last by then (the public
# functions move it). Everything a compiled program needs is in its
# operands and attributes, so a program from the persistent compilation
# cache or another process finds its function by content, never by a
# per-process index.


def _key(**spec):
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _lead_index(idx, shape):
    """The element ``idx`` of the vmap dimensions for an argument whose
    dimensions are ``shape`` (size 1 where it is not batched)."""
    return tuple(i if d > 1 else 0 for i, d in zip(idx, shape)) + (Ellipsis,)


@functools.lru_cache(maxsize=None)
def _host(key):
    """The pure_callback side: ``host(args, rets)`` over NumPy arrays of the
    inputs and of the results, which it fills. vmap
    (``vmap_method="expand_dims"``) gives every argument the same leading
    dimensions, of size 1 where it is not batched; row ops take them as more
    batch rows, losses are run once per batch element."""
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
    """Allocate the results (with vmap's leading dimensions) and let the
    host function fill them."""
    args = [np.asarray(a) for a in args]  # CPU arrays: views, not copies
    lead = args[0].ndim - ndim
    shape = np.broadcast_shapes(*(a.shape[:lead] for a in args))
    rets = [np.empty(shape + r.shape, r.dtype) for r in results]
    _host(key)(args, rets)
    return tuple(rets)


# The handler's attributes (csrc/xla_ffi.c): typed scalars, read without
# parsing.
_FFI_FN = {"cross_entropy": 0, "kl_div": 1, "binary_cross_entropy": 2, "log_softmax": 3,
           "softmax": 4, "logsumexp": 5}
_FFI_REDUCTION = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}
_FFI_KIND = {"probs": 0, "log_probs": 1, "logits": 2}


def _ffi_attrs(ndim, fn, kw, names=(), grad=False):
    i64, f64 = np.int64, np.float64
    attrs = {"fn": i64(_FFI_FN[fn]), "ndim": i64(ndim), "threads": i64(kw["num_threads"] or 0)}
    if fn not in ("cross_entropy", "kl_div", "binary_cross_entropy"):
        return attrs
    base = kw["base"]
    attrs.update(grad=i64(grad), reduction=i64(_FFI_REDUCTION[kw["reduction"]]),
                 scale=f64(1.0 if base is None else 1.0 / math.log(base)))
    if fn == "kl_div":
        attrs.update(kind=i64(_FFI_KIND[kw["target_kind"]]), temperature=f64(kw["temperature"]))
        return attrs
    attrs.update(from_logits=i64(kw["from_logits"]),
                 weights=i64(("weight" in names) + 2 * ("pos_weight" in names)))
    if fn == "cross_entropy":
        attrs.update(smoothing=f64(kw["label_smoothing"]), ignore_index=i64(kw.get("ignore_index", 0)))
    return attrs


def _call(results, arrays, via, **spec):
    """Run the call described by ``spec`` on ``arrays`` (logits first), by
    ``via`` (a ``transport``: it is part of every cached op, since JAX caches
    what a custom_vjp function traces to)."""
    ndim = arrays[0].ndim
    results = tuple(results)
    if via == "ffi":
        attrs = _ffi_attrs(ndim, **spec)
        return jax.ffi.ffi_call(_FFI_TARGET, results, vmap_method="expand_dims")(*arrays, **attrs)
    key = _key(ndim=ndim, **spec)
    return jax.pure_callback(functools.partial(_run_callback, key, ndim, results),
                             results, *arrays, vmap_method="expand_dims")


# --------------------------------------------------------------- XLA FFI
# The kernels run as an XLA FFI handler written in C (csrc/xla_ffi.c,
# compiled into fastxent._core against the XLA FFI C API header vendored in
# csrc/third_party): XLA hands it its own operand and result buffers, which
# it reads and writes in place, with no Python and no GIL on the way.
# (jax.pure_callback copies every operand into a new array and every result
# back into XLA's buffer, and runs Python on every call.)

_FFI_TARGET = "fastxent"


def _register_ffi():
    try:
        jax.ffi.register_ffi_target(_FFI_TARGET, _core.xla_ffi_handler(), platform="cpu",
                                    api_version=1)
    except Exception:  # an XLA without the FFI: the callback still works
        return False
    return True


#: How calls reach the kernels: "ffi" (the XLA FFI handler, zero-copy; the
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
# The class axis is moved last before the op (JAX moves the gradient back),
# and targets and weights are cast to the compute dtype, as the NumPy
# functions would cast them: the op's arrays are exactly what the kernels read.


@functools.lru_cache(maxsize=256)
def _ce_op(arg_names, soft, ignore_index, reduction, label_smoothing, from_logits, base,
           num_threads, loss_dtype, via):
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, from_logits=from_logits,
              base=base, num_threads=num_threads)
    if not soft:
        kw["ignore_index"] = ignore_index
    return _make_loss("cross_entropy", arg_names, kw, -1 if reduction == "none" else None,
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
    cdt = _compute_dtype(dt)
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
    labels = _classes_last(labels, ax, "labels").astype(cdt) if soft else jnp.asarray(labels)
    arrays, names = [_classes_last(logits, ax), labels], ["logits", "labels"]
    if weight is not None:
        c = jnp.shape(logits)[ax]
        if jnp.shape(weight) != (c,):
            raise ValueError(f"weight must have shape ({c},) (one per class), got {jnp.shape(weight)}")
        _float_dtype(weight, "weight")
        arrays.append(jnp.asarray(weight).astype(cdt))
        names.append("weight")
    op = _ce_op(tuple(names), soft, _ignore_index(ignore_index), _reduction(reduction), eps,
                bool(from_logits), _base(base), _threads(num_threads), cdt, transport)
    return op(*arrays)


@functools.lru_cache(maxsize=256)
def _kl_op(target_kind, reduction, temperature, base, num_threads, loss_dtype, via):
    kw = dict(target_kind=target_kind, reduction=reduction, temperature=temperature, base=base,
              num_threads=num_threads)
    return _make_loss("kl_div", ("logits", "target"), kw, -1 if reduction == "none" else None,
                      loss_dtype, via)


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
    cdt = _compute_dtype(dt)
    op = _kl_op(target_kind, _reduction(reduction, _KL_REDUCTIONS), T, _base(base),
                _threads(num_threads), cdt, transport)
    return op(_classes_last(logits, ax), _classes_last(target, ax, "target").astype(cdt))


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
    cdt = _compute_dtype(dt)
    shape = jnp.shape(logits)
    if jnp.shape(target) != shape:
        raise ValueError(f"target must have the logits' shape {shape}, got {jnp.shape(target)}")
    _float_dtype(target, "target")
    arrays, names = [jnp.asarray(logits), jnp.asarray(target).astype(cdt)], ["logits", "target"]
    for nm, v in (("weight", weight), ("pos_weight", pos_weight)):
        if v is None:
            continue
        _float_dtype(v, nm)
        try:
            np.broadcast_shapes(jnp.shape(v), shape)
        except ValueError:
            raise ValueError(f"{nm} of shape {jnp.shape(v)} does not broadcast to the input shape "
                             f"{shape}") from None
        if jnp.ndim(v) > len(shape):
            raise ValueError(f"{nm} of shape {jnp.shape(v)} has more dimensions than the input "
                             f"shape {shape}")
        # Every argument carries the logits' rank, so that vmap's leading
        # dimensions line up; the kernel broadcasts the size-1 dimensions
        # (no logits-sized weight is formed when one row serves all).
        v = jnp.asarray(v).astype(cdt)
        arrays.append(v.reshape((1,) * (len(shape) - v.ndim) + v.shape))
        names.append(nm)
    op = _bce_op(tuple(names), _reduction(reduction), bool(from_logits), _base(base),
                 _threads(num_threads), cdt, transport)
    return op(*arrays)


# --------------------------------------------------------------- building blocks


def _rows(name, x, axis, num_threads, via, out_dtype):
    """A row op along ``axis``; vmap's leading dimensions are more batch
    rows, so the kernel takes them in one call."""
    xm = jnp.moveaxis(x, axis, -1)
    shape = xm.shape if name != "logsumexp" else xm.shape[:-1]
    spec = jax.ShapeDtypeStruct(shape, out_dtype)
    (y,) = _call([spec], [xm], via, fn=name, kw={"num_threads": num_threads})
    return y if name == "logsumexp" else jnp.moveaxis(y, -1, axis)


def _normaliser(name, bwd):
    """log_softmax or softmax: the output is the residual, ``bwd(y, g, axis)``
    the cotangent in float32 (or wider)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
    def op(x, axis, num_threads, via):
        return _rows(name, x, axis, num_threads, via, x.dtype)

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
    return _rows("logsumexp", x, axis, num_threads, via, _compute_dtype(np.dtype(x.dtype)))


def _logsumexp_fwd(x, axis, num_threads, via):
    return _logsumexp(x, axis, num_threads, via), x


def _logsumexp_bwd(axis, num_threads, via, x, g):
    p = _softmax(x, axis, num_threads, via)
    return ((jnp.expand_dims(g, axis) * p).astype(x.dtype),)


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _row_input(x, axis):
    _float_dtype(x, "x")
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, "x")
    if x.shape[ax] == 0:
        raise ValueError(f"x has no classes: axis {axis} has length 0 (C == 0)")
    return x, ax - x.ndim


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
