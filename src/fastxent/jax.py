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

Transport: ``jax.pure_callback`` into the public NumPy functions. The
arrays reach NumPy without a copy on CPU, the kernels release the GIL, and
``vmap`` hands the callback the batched arrays in one call
(``vmap_method="expand_dims"``) which it walks in C order. An XLA FFI
handler was measured against it (docs/jax.md, "Transport"); the callback
keeps the package a pure-Python layer over the one compiled extension.

Options (``axis``, ``reduction``, ``ignore_index``, ``label_smoothing``,
``temperature``, ``base``, ``num_threads``...) are static Python values;
``labels``/``target``, ``weight`` and ``pos_weight`` are arrays and may be
traced. Gradients flow to ``logits`` only: asking for one with respect to a
target or a weight raises ``NotImplementedError`` naming it (wrap it in
``jax.lax.stop_gradient`` if it is a constant). Integer labels get
``float0`` cotangents. Label ranges and weight signs are checked on the
data, inside the callback: under ``jit`` a bad value surfaces as JAX's
runtime error carrying fastxent's ``ValueError`` message.
"""

from __future__ import annotations

import functools
import math
import operator

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
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}; got {reduction!r}")
    return reduction


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


def _threads(num_threads):
    if num_threads is None:
        return None
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise TypeError(f"num_threads must be an integer or None, got {num_threads!r}") from None
    if not 1 <= n <= 1024:
        raise ValueError(f"num_threads must be in [1, 1024], got {num_threads!r}")
    return n


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


# --------------------------------------------------------------- callbacks


def _host(fn, core_ndim, results):
    """``fn`` over NumPy arrays, lifted to the leading dimensions that
    ``vmap_method="expand_dims"`` adds (each argument has them, of size 1
    where it is not batched); ``results`` are the unbatched result specs."""

    def call(*args):
        args = [np.asarray(a) for a in args]  # CPU arrays: views, not copies
        lead = args[0].ndim - core_ndim
        if lead == 0:
            outs = fn(*args)
        else:
            shape = np.broadcast_shapes(*(a.shape[:lead] for a in args))
            outs = [np.empty(shape + r.shape, r.dtype) for r in results]
            for idx in np.ndindex(*shape):
                sub = [a[tuple(i if d > 1 else 0 for i, d in zip(idx, a.shape[:lead]))] for a in args]
                for o, v in zip(outs, fn(*sub)):
                    o[idx] = v
        return tuple(np.asarray(o, r.dtype) for o, r in zip(outs, results))

    return call


def _callback(fn, core_ndim, results, *args):
    return jax.pure_callback(_host(fn, core_ndim, results), tuple(results), *args,
                             vmap_method="expand_dims")


def _no_grad(name, perturbed):
    if perturbed:
        raise NotImplementedError(
            f"fastxent.jax differentiates with respect to logits only, not {name}; "
            f"wrap {name} in jax.lax.stop_gradient if it is a constant")


def _loss_op(name, np_loss, np_with_grad, arg_names, loss_shape, loss_dtype, row_axis):
    """A custom_vjp over ``np_loss(*arrays) -> loss``, whose forward for
    differentiation is ``np_with_grad(*arrays) -> (loss, grad)``.

    ``arrays[0]`` is the logits; the others (targets, weights) are not
    differentiated. ``loss_shape(logits_shape)`` is the loss's shape.
    ``row_axis``: the class axis when the loss holds one value per row (its
    cotangent is broadcast along that axis), else None.
    """

    def loss_spec(x):
        return jax.ShapeDtypeStruct(loss_shape(x.shape), loss_dtype)

    @jax.custom_vjp
    def op(*arrays):
        x = arrays[0]
        (loss,) = _callback(lambda *a: (np_loss(*a),), x.ndim, [loss_spec(x)], *arrays)
        return loss

    def fwd(*primals):
        arrays = tuple(p.value for p in primals)
        for p, nm in zip(primals[1:], arg_names[1:]):
            # Integers have no gradient to give (JAX's float0); floats would.
            if jnp.issubdtype(p.value.dtype, jnp.floating):
                _no_grad(nm, p.perturbed)
        x = arrays[0]
        specs = [loss_spec(x), jax.ShapeDtypeStruct(x.shape, x.dtype)]
        loss, grad = _callback(np_with_grad, x.ndim, specs, *arrays)
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


def _bound(np_fn, arg_names, kwargs):
    """``np_fn(logits, target, <optional arrays by name>, **kwargs)``."""

    def call(*arrays):
        named = dict(zip(arg_names[2:], arrays[2:]))
        return np_fn(arrays[0], arrays[1], **named, **kwargs)

    return call


def _make_loss(name, np_loss, np_with_grad, arg_names, kwargs, per_row, loss_dtype):
    """The op of one loss with its static options bound. ``per_row``: the
    class axis when ``reduction="none"`` gives one value per row; "elementwise"
    when it gives one per element; None otherwise."""
    if per_row is None:
        shape, row_axis = (lambda s: ()), None
    elif per_row == "elementwise":
        shape, row_axis = (lambda s: s), None
    else:
        shape, row_axis = (lambda s: _batch_shape(s, per_row)), per_row
    return _loss_op(name, _bound(np_loss, arg_names, kwargs),
                    _bound(np_with_grad, arg_names, kwargs), arg_names, shape, loss_dtype,
                    row_axis)


# --------------------------------------------------------------- losses


@functools.lru_cache(maxsize=256)
def _ce_op(arg_names, soft, axis, ignore_index, reduction, label_smoothing, from_logits, base,
           num_threads, loss_dtype):
    kw = dict(axis=axis, reduction=reduction, label_smoothing=label_smoothing,
              from_logits=from_logits, base=base, num_threads=num_threads)
    if not soft:
        kw["ignore_index"] = ignore_index
    return _make_loss("cross_entropy", _fx.cross_entropy, _fx.cross_entropy_with_grad,
                      arg_names, kw, axis if reduction == "none" else None, loss_dtype)


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
                eps, bool(from_logits), _base(base), _threads(num_threads), _compute_dtype(dt))
    return op(*(jnp.asarray(a) for a in arrays))


@functools.lru_cache(maxsize=256)
def _kl_op(axis, target_kind, reduction, temperature, base, num_threads, loss_dtype):
    kw = dict(axis=axis, target_kind=target_kind, reduction=reduction, temperature=temperature,
              base=base, num_threads=num_threads)
    return _make_loss("kl_div", _fx.kl_div, _fx.kl_div_with_grad, ("logits", "target"), kw,
                      axis if reduction == "none" else None, loss_dtype)


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
                _threads(num_threads), _compute_dtype(dt))
    return op(jnp.asarray(logits), jnp.asarray(target))


@functools.lru_cache(maxsize=256)
def _bce_op(arg_names, reduction, from_logits, base, num_threads, loss_dtype):
    kw = dict(reduction=reduction, from_logits=from_logits, base=base, num_threads=num_threads)
    return _make_loss("binary_cross_entropy", _fx.binary_cross_entropy,
                      _fx.binary_cross_entropy_with_grad, arg_names, kw,
                      "elementwise" if reduction == "none" else None, loss_dtype)


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
        # The callback's arguments all carry the logits' rank (vmap adds
        # leading dimensions to each), so the weights are broadcast first.
        arrays.append(jnp.broadcast_to(v, shape))
        names.append(nm)
    op = _bce_op(tuple(names), _reduction(reduction), bool(from_logits), _base(base),
                 _threads(num_threads), _compute_dtype(dt))
    return op(*(jnp.asarray(a) for a in arrays))


# --------------------------------------------------------------- building blocks


def _rows(np_fn, x, axis, num_threads, out_shape, out_dtype):
    """A row op over the callback; vmap's leading dimensions are more batch
    rows, so the kernel takes them in one call (``axis`` counts from the end)."""
    spec = jax.ShapeDtypeStruct(out_shape(x.shape), out_dtype)

    def host(a):
        return (np.asarray(np_fn(np.asarray(a), axis=axis, num_threads=num_threads), out_dtype),)

    (y,) = jax.pure_callback(host, (spec,), x, vmap_method="expand_dims")
    return y


def _normaliser(np_fn, bwd):
    """log_softmax or softmax: the output is the residual, ``bwd(y, g, axis)``
    the cotangent in float32 (or wider)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
    def op(x, axis, num_threads):
        return _rows(np_fn, x, axis, num_threads, lambda s: s, x.dtype)

    def op_fwd(x, axis, num_threads):
        y = op(x, axis, num_threads)
        return y, y

    def op_bwd(axis, num_threads, y, g):
        dt = jnp.promote_types(g.dtype, jnp.float32)
        return (bwd(y.astype(dt), g.astype(dt), axis).astype(y.dtype),)

    op.defvjp(op_fwd, op_bwd)
    return op


_log_softmax = _normaliser(
    _fx.log_softmax, lambda y, g, axis: g - jnp.exp(y) * jnp.sum(g, axis=axis, keepdims=True))
_softmax = _normaliser(
    _fx.softmax, lambda y, g, axis: y * (g - jnp.sum(g * y, axis=axis, keepdims=True)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _logsumexp(x, axis, num_threads):
    return _rows(_fx.logsumexp, x, axis, num_threads, lambda s: _batch_shape(s, axis),
                 _compute_dtype(np.dtype(x.dtype)))


def _logsumexp_fwd(x, axis, num_threads):
    return _logsumexp(x, axis, num_threads), x


def _logsumexp_bwd(axis, num_threads, x, g):
    p = _softmax(x, axis, num_threads)
    return ((jnp.expand_dims(g, axis) * p).astype(x.dtype),)


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _row_input(x, axis):
    _float_dtype(x, "x")
    x = jnp.asarray(x)
    return x, _axis(axis, x.ndim, "x") - x.ndim


def log_softmax(x, *, axis=-1, num_threads=None):
    """``log(softmax(x))`` along ``axis``, in ``x``'s dtype (fastxent.log_softmax)."""
    x, ax = _row_input(x, axis)
    return _log_softmax(x, ax, _threads(num_threads))


def softmax(x, *, axis=-1, num_threads=None):
    """``softmax(x)`` along ``axis``, in ``x``'s dtype (fastxent.softmax)."""
    x, ax = _row_input(x, axis)
    return _softmax(x, ax, _threads(num_threads))


def logsumexp(x, *, axis=-1, num_threads=None):
    """``log(sum(exp(x)))`` along ``axis``: batch-shaped, float32 for 16- and
    32-bit ``x`` (float64 for float64), as ``fastxent.logsumexp``."""
    x, ax = _row_input(x, axis)
    return _logsumexp(x, ax, _threads(num_threads))
