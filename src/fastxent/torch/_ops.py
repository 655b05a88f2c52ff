"""The ``fastxent::`` operators: fastxent's NumPy kernels behind ``torch.library``.

Every operator reads its tensors in place through NumPy views of their
memory (float16/32/64 directly, bfloat16 through an int16 view reinterpreted
as ``ml_dtypes.bfloat16``) and writes its results into tensors allocated
here, so no input is converted or copied on the way to the kernels; the
kernels release the GIL.

The losses return ``(loss, grad)``: the gradient of the loss w.r.t. the
input is computed in the same row visit as the loss and is the only tensor
saved for backward (an N x C tensor; the input itself is not kept alive).
Backward scales it by the upstream gradient, which is skipped when that is
exactly 1 (the common ``loss.backward()``), so the saved tensor itself
becomes the input's gradient.

Each operator has a fake implementation (shapes and dtypes, for FakeTensor,
meta tensors and ``torch.compile``) and an autograd formula. Double backward
through a loss is refused: its saved gradient is a constant to autograd, so a
second derivative would silently miss a term.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad as _fw

import fastxent
from fastxent import _api, _core

try:  # bfloat16 tensors are viewed as ml_dtypes.bfloat16 arrays
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

_REDUCTIONS = ("mean", "sum", "none")
_KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


# --------------------------------------------------------------------------
# Tensors as NumPy views
# --------------------------------------------------------------------------

def _np(t):
    """A NumPy view of a CPU tensor's memory (no copy; a copy for a lazily
    negated view, whose memory holds the values' negatives)."""
    t = t.detach()
    if t.is_neg():
        t = t.resolve_neg()
    if t.dtype == torch.bfloat16:
        if _ml_dtypes is None:
            raise TypeError("bfloat16 tensors need the ml_dtypes package: "
                            "pip install fastxent[torch]")
        return t.view(torch.int16).numpy().view(_ml_dtypes.bfloat16)
    return t.numpy()


def _check_device(op, allow_meta, **tensors):
    """TypeError naming the argument and its device for anything not on the CPU."""
    for name, t in tensors.items():
        if t is None:
            continue
        kind = t.device.type
        if kind == "cpu" or (allow_meta and kind == "meta"):
            continue
        raise TypeError(f"fastxent.torch.{op} computes on the CPU; {name} is on device "
                        f"{t.device!s} (move it with .cpu(), or use torch.nn.functional.{op} there)")


def _check_floating(op, **tensors):
    for name, t in tensors.items():
        if t is not None and not (t.dtype.is_floating_point and not t.dtype.is_complex):
            raise TypeError(f"fastxent.torch.{op}: {name} must have a floating dtype "
                            f"(float16, bfloat16, float32, float64), got {t.dtype}")


def _small_float(t, like):
    """A small parameter tensor (class weights, pos_weight) in the compute dtype
    of ``like`` (float32 for 16-bit inputs); at most a (C,)-sized copy."""
    if t is None:
        return None
    want = torch.float64 if like.dtype == torch.float64 else torch.float32
    return _np(t.detach().to(want))


def _threads(num_threads):
    """The kernels' thread count: ``num_threads``, or torch's at call time (0)."""
    return num_threads if num_threads > 0 else torch.get_num_threads()


def check_threads(num_threads):
    """``num_threads=`` of the public functions as the operators' int (0: torch's)."""
    n = _api._check_threads(num_threads)
    return 0 if n is None else n


def check_reduction(reduction, allowed=_REDUCTIONS):
    return _api._check_reduction(reduction, allowed)


def _as_loss(value, dtype):
    """A fastxent result (NumPy scalar or array) as a tensor of ``dtype``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(dtype)
    return torch.tensor(float(value), dtype=dtype)


def _class_dim(ndim):
    """torch's class dimension: 0 for an unbatched (C,) input, else 1."""
    return 0 if ndim == 1 else 1


# Bound once: eager() runs on every call of an (8, 10) loss.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def eager(t):
    """True outside any tracing and torch.func transform: a plain CPU tensor
    with real memory."""
    return (not _is_compiling() and type(t) is Tensor and t.is_cpu
            and _dispatch_modes() == 0 and not _functorch_active())


def refuse_forward_ad(op, input):
    """NotImplementedError for a dual input (forward-mode AD): the losses have
    no jvp, and a result without a tangent would be a silent wrong answer."""
    if _fw._current_level >= 0 and _fw.unpack_dual(input).tangent is not None:
        raise NotImplementedError(
            f"fastxent.torch.{op} has no forward-mode AD (torch.autograd.forward_ad); "
            f"use torch.nn.functional.{op} for a jvp")


def _no_double_backward(op):
    # create_graph=True runs backward with grad mode on.
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"fastxent.torch.{op} does not support double backward (create_graph=True): "
            "its saved gradient is a constant to autograd, so second derivatives would "
            f"be wrong; use torch.nn.functional.{op} where they are needed")


def scale_grad(grad, grad_out, dim):
    """``grad`` times the upstream gradient of the loss. ``grad_out`` is 0-dim
    for a reduced loss, else shaped like the loss (``grad`` without ``dim``,
    or like ``grad`` itself when ``dim`` is None)."""
    if grad_out.dim() == 0:
        if eager(grad_out) and grad_out.item() == 1.0:
            return grad
        return grad * grad_out
    if dim is not None:
        grad_out = grad_out.unsqueeze(dim)
    return grad * grad_out


def _fused(input, out, want_grad, loss_fn, with_grad_fn, x, target, **kw):
    """(loss, gradient) from fastxent's ``*_with_grad`` (one visit), or (loss,
    empty) from the loss alone. ``out``: the gradient's tensor (``input``
    itself overwrites the input; None: a new one shaped like it)."""
    if want_grad:
        grad = out
        if out is None:
            grad = grad_buffer(input) if input.is_contiguous() and eager(input) else \
                torch.empty_like(input)
        loss, _ = with_grad_fn(x, target, out=x if out is input else _np(grad), **kw)
    else:
        grad = input.new_empty(0)
        loss = loss_fn(x, target, **kw)
    return _as_loss(loss, input.dtype), grad


# --------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------

def _ce_loss_shape(input, target, reduction):
    if reduction != "none":
        return ()
    if input.dim() == 1:
        return ()
    shape = list(input.shape)
    del shape[1]
    return tuple(shape)


def _ce_check_shapes(input, target):
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have at least one dimension (the classes), "
                         "got a 0-dim tensor")
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"cross_entropy: probability targets must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    else:
        want = list(input.shape)
        del want[_class_dim(input.dim())]
        if list(target.shape) != want:
            raise ValueError(f"cross_entropy: class-index targets must have the input's shape "
                             f"without dimension {_class_dim(input.dim())}, {tuple(want)}; "
                             f"got {tuple(target.shape)}")


def ce_forward(input, target, weight, ignore_index, reduction, label_smoothing,
               num_threads, want_grad, out=None):
    """(loss, gradient of the loss w.r.t. input, or an empty tensor).

    ``out``: a tensor shaped like ``input`` for the gradient (``input`` itself
    writes the gradient over the logits)."""
    _check_device("cross_entropy", False, input=input, target=target, weight=weight)
    _check_floating("cross_entropy", input=input)
    _ce_check_shapes(input, target)
    x = _np(input)
    # 1-D and 2-D inputs have their classes last, which takes fastxent's
    # fast path for the default options.
    axis = -1 if input.dim() <= 2 else 1
    kw = dict(axis=axis, weight=_small_float(weight, input), ignore_index=ignore_index,
              reduction=reduction, label_smoothing=label_smoothing,
              num_threads=_threads(num_threads))
    return _fused(input, out, want_grad, fastxent.cross_entropy, fastxent.cross_entropy_with_grad,
                  x, _np(target), **kw)


@torch.library.custom_op("fastxent::cross_entropy", mutates_args=())
def _cross_entropy_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      reduction: str, label_smoothing: float, num_threads: int,
                      want_grad: bool) -> Tuple[Tensor, Tensor]:
    """Cross entropy with torch's semantics (class dimension 1) and, with
    ``want_grad``, its gradient w.r.t. ``input`` from the same visit."""
    return ce_forward(input, target, weight, ignore_index, reduction, label_smoothing,
                      num_threads, want_grad)


@_cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, num_threads, want_grad):
    _check_device("cross_entropy", True, input=input, target=target, weight=weight)
    _check_floating("cross_entropy", input=input)
    check_reduction(reduction)
    _ce_check_shapes(input, target)
    loss = input.new_empty(_ce_loss_shape(input, target, reduction))
    grad = torch.empty_like(input) if want_grad else input.new_empty(0)
    return loss, grad


def _setup_saved_grad(ctx, inputs, output):
    """Losses: save only the fused gradient (an output of the forward)."""
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    # The gradient output has no use downstream: do not build N x C zeros for it.
    ctx.set_materialize_grads(False)
    ctx.input_ndim = inputs[0].dim()
    ctx.want_grad = inputs[-1]


def _saved_grad(ctx, op):
    _no_double_backward(op)
    if not ctx.want_grad:
        raise RuntimeError(f"fastxent::{op} was called with want_grad=False on an input that "
                           "requires grad; call fastxent.torch.{op} instead")
    return ctx.saved_tensors[0]


def _cross_entropy_backward(ctx, grad_loss, _grad):
    grad = _saved_grad(ctx, "cross_entropy")
    if grad_loss is None:
        return (None,) * 8
    return (scale_grad(grad, grad_loss, _class_dim(ctx.input_ndim)),) + (None,) * 7


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_setup_saved_grad)


# --------------------------------------------------------------------------
# kl_div with logits (fastxent's semantics: softmax over dim, T**2 scaling)
# --------------------------------------------------------------------------

def _kl_check(input, target, dim):
    if input.dim() == 0:
        raise ValueError("kl_div_with_logits: input must have at least one dimension")
    if target.shape != input.shape:
        raise ValueError(f"kl_div_with_logits: target must have the input's shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if not -input.dim() <= dim < input.dim():
        raise IndexError(f"kl_div_with_logits: dim {dim} is out of range for a "
                         f"{input.dim()}-dim input")


def kl_logits_forward(input, target, dim, target_kind, reduction, temperature, num_threads,
                      want_grad, out=None):
    _check_device("kl_div_with_logits", False, input=input, target=target)
    _check_floating("kl_div_with_logits", input=input, target=target)
    _kl_check(input, target, dim)
    x = _np(input)
    kw = dict(axis=dim, target_kind=target_kind, reduction=reduction, temperature=temperature,
              num_threads=_threads(num_threads))
    return _fused(input, out, want_grad, fastxent.kl_div, fastxent.kl_div_with_grad,
                  x, _np(target), **kw)


@torch.library.custom_op("fastxent::kl_div_with_logits", mutates_args=())
def _kl_logits_op(input: Tensor, target: Tensor, dim: int, target_kind: str, reduction: str,
                  temperature: float, num_threads: int,
                  want_grad: bool) -> Tuple[Tensor, Tensor]:
    """KL(P || softmax(input / T)) * T**2 along ``dim``, P given by ``target``
    (``target_kind``: logits, probs or log_probs), and its gradient."""
    return kl_logits_forward(input, target, dim, target_kind, reduction, temperature,
                             num_threads, want_grad)


@_kl_logits_op.register_fake
def _(input, target, dim, target_kind, reduction, temperature, num_threads, want_grad):
    _check_device("kl_div_with_logits", True, input=input, target=target)
    _check_floating("kl_div_with_logits", input=input, target=target)
    check_reduction(reduction, _KL_REDUCTIONS)
    _kl_check(input, target, dim)
    shape = ()
    if reduction == "none":
        shape = list(input.shape)
        del shape[dim]
    loss = input.new_empty(shape)
    grad = torch.empty_like(input) if want_grad else input.new_empty(0)
    return loss, grad


def _kl_logits_backward(ctx, grad_loss, _grad):
    grad = _saved_grad(ctx, "kl_div_with_logits")
    if grad_loss is None:
        return (None,) * 8
    return (scale_grad(grad, grad_loss, ctx.dim),) + (None,) * 7


def _kl_logits_setup(ctx, inputs, output):
    _setup_saved_grad(ctx, inputs, output)
    ctx.dim = inputs[2] % inputs[0].dim()


_kl_logits_op.register_autograd(_kl_logits_backward, setup_context=_kl_logits_setup)


# --------------------------------------------------------------------------
# kl_div (torch's semantics: elementwise on log-probabilities)
# --------------------------------------------------------------------------

def _kl_reduce(elementwise, input, reduction):
    if reduction == "none":
        return elementwise
    total = elementwise.sum()
    if reduction == "mean":
        return total / elementwise.numel()
    if reduction == "batchmean" and input.dim() != 0:
        return total / input.shape[0]
    return total


@torch.library.custom_op("fastxent::kl_div", mutates_args=())
def _kl_div_op(input: Tensor, target: Tensor, reduction: str, log_target: bool) -> Tensor:
    """torch's kl_div: ``target * (log(target) - input)`` elementwise (``0 log 0 = 0``)."""
    _check_device("kl_div", False, input=input, target=target)
    if log_target:
        elementwise = torch.exp(target) * (target - input)
    else:
        elementwise = torch.xlogy(target, target) - target * input
    return _kl_reduce(elementwise, input, reduction)


@_kl_div_op.register_fake
def _(input, target, reduction, log_target):
    _check_device("kl_div", True, input=input, target=target)
    shape = torch.broadcast_shapes(input.shape, target.shape) if reduction == "none" else ()
    return input.new_empty(shape, dtype=torch.promote_types(input.dtype, target.dtype))


def _kl_div_setup(ctx, inputs, output):
    input, target, reduction, log_target = inputs
    # d/d input of the elementwise loss is -target (-exp(target)): it does
    # not depend on the input, which is not kept.
    ctx.save_for_backward(target)
    ctx.reduction, ctx.log_target = reduction, log_target
    ctx.numel, ctx.rows = input.numel(), (input.shape[0] if input.dim() else 1)
    ctx.input_dtype = input.dtype


def _kl_div_backward(ctx, grad_loss):
    _no_double_backward("kl_div")
    (target,) = ctx.saved_tensors
    grad = torch.exp(target) if ctx.log_target else target.clone()
    scale = {"mean": ctx.numel, "batchmean": ctx.rows}.get(ctx.reduction)
    if scale is not None:
        grad.div_(-scale)
    else:
        grad.neg_()
    return (grad * grad_loss).to(ctx.input_dtype), None, None, None


_kl_div_op.register_autograd(_kl_div_backward, setup_context=_kl_div_setup)


# --------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# --------------------------------------------------------------------------

def bce_forward(input, target, weight, pos_weight, reduction, num_threads, want_grad, out=None):
    _check_device("binary_cross_entropy_with_logits", False, input=input, target=target,
                  weight=weight, pos_weight=pos_weight)
    _check_floating("binary_cross_entropy_with_logits", input=input, target=target)
    if target.shape != input.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: target must have the input's "
                         f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
    x = _np(input)
    kw = dict(weight=_small_float(weight, input), pos_weight=_small_float(pos_weight, input),
              reduction=reduction, num_threads=_threads(num_threads))
    return _fused(input, out, want_grad, fastxent.binary_cross_entropy,
                  fastxent.binary_cross_entropy_with_grad, x, _np(target), **kw)


@torch.library.custom_op("fastxent::binary_cross_entropy_with_logits", mutates_args=())
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
            reduction: str, num_threads: int, want_grad: bool) -> Tuple[Tensor, Tensor]:
    """torch's binary_cross_entropy_with_logits and its gradient w.r.t. input."""
    return bce_forward(input, target, weight, pos_weight, reduction, num_threads, want_grad)


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, num_threads, want_grad):
    _check_device("binary_cross_entropy_with_logits", True, input=input, target=target,
                  weight=weight, pos_weight=pos_weight)
    check_reduction(reduction)
    loss = input.new_empty(input.shape if reduction == "none" else ())
    grad = torch.empty_like(input) if want_grad else input.new_empty(0)
    return loss, grad


def _bce_backward(ctx, grad_loss, _grad):
    grad = _saved_grad(ctx, "binary_cross_entropy_with_logits")
    if grad_loss is None:
        return (None,) * 7
    return (scale_grad(grad, grad_loss, None),) + (None,) * 6


_bce_op.register_autograd(_bce_backward, setup_context=_setup_saved_grad)


# --------------------------------------------------------------------------
# log_softmax, softmax
# --------------------------------------------------------------------------

def _normalise(fn, op, input, dim, num_threads):
    _check_device(op, False, input=input)
    _check_floating(op, input=input)
    out = torch.empty_like(input)
    if input.dim() == 0:  # torch: a scalar is a row of one class
        fn(_np(input).reshape(1), out=_np(out).reshape(1), num_threads=_threads(num_threads))
    else:
        fn(_np(input), axis=dim, out=_np(out), num_threads=_threads(num_threads))
    return out


@torch.library.custom_op("fastxent::log_softmax", mutates_args=())
def _log_softmax_op(input: Tensor, dim: int, num_threads: int) -> Tensor:
    """``input - logsumexp(input, dim)``, in input's dtype."""
    return _normalise(fastxent.log_softmax, "log_softmax", input, dim, num_threads)


@torch.library.custom_op("fastxent::softmax", mutates_args=())
def _softmax_op(input: Tensor, dim: int, num_threads: int) -> Tensor:
    """``exp(input - logsumexp(input, dim))``, in input's dtype."""
    return _normalise(fastxent.softmax, "softmax", input, dim, num_threads)


def _normalise_fake(op):
    def fake(input, dim, num_threads):
        _check_device(op, True, input=input)
        _check_floating(op, input=input)
        return torch.empty_like(input)
    return fake


_log_softmax_op.register_fake(_normalise_fake("log_softmax"))
_softmax_op.register_fake(_normalise_fake("softmax"))


def _save_output(ctx, inputs, output):
    # Like torch: backward needs only the output; the input is not kept.
    ctx.save_for_backward(output)
    ctx.dim = inputs[1] if output.dim() else 0


def _log_softmax_backward(ctx, grad_out):
    # ATen's fused backward; differentiable, so double backward works too.
    (out,) = ctx.saved_tensors
    return torch._log_softmax_backward_data(grad_out, out, ctx.dim, out.dtype), None, None


def _softmax_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    return torch._softmax_backward_data(grad_out, out, ctx.dim, out.dtype), None, None


_log_softmax_op.register_autograd(_log_softmax_backward, setup_context=_save_output)
_softmax_op.register_autograd(_softmax_backward, setup_context=_save_output)


# --------------------------------------------------------------------------
# logsumexp
# --------------------------------------------------------------------------

def _lse_dims(dim, ndim):
    dims = sorted({d % max(ndim, 1) for d in dim})
    if not dims:
        raise ValueError("logsumexp: dim must name at least one dimension")
    return dims


def _lse_shape(shape, dims, keepdim):
    if keepdim:
        return [1 if i in dims else s for i, s in enumerate(shape)]
    return [s for i, s in enumerate(shape) if i not in dims]


@torch.library.custom_op("fastxent::logsumexp", mutates_args=())
def _logsumexp_op(input: Tensor, dim: List[int], keepdim: bool, num_threads: int) -> Tensor:
    """``log(sum(exp(input)))`` over ``dim`` (one or several dimensions)."""
    _check_device("logsumexp", False, input=input)
    _check_floating("logsumexp", input=input)
    nt = _threads(num_threads)
    if input.dim() == 0:
        return input.clone()
    dims = _lse_dims(dim, input.dim())
    if len(dims) == 1:
        res = fastxent.logsumexp(_np(input), axis=dims[0], num_threads=nt)
    else:
        # Several dimensions: gather them last as one axis (a copy unless
        # they are already adjacent in memory).
        rest = [i for i in range(input.dim()) if i not in dims]
        moved = input.permute(rest + dims)
        rows = moved.reshape(moved.shape[:len(rest)] + (-1,))
        res = fastxent.logsumexp(_np(rows), axis=-1, num_threads=nt)
    out = _as_loss(np.asarray(res), input.dtype)
    return out.reshape(_lse_shape(input.shape, dims, keepdim))


@_logsumexp_op.register_fake
def _(input, dim, keepdim, num_threads):
    _check_device("logsumexp", True, input=input)
    _check_floating("logsumexp", input=input)
    if input.dim() == 0:
        return torch.empty_like(input)
    return input.new_empty(_lse_shape(input.shape, _lse_dims(dim, input.dim()), keepdim))


def _logsumexp_setup(ctx, inputs, output):
    input, dim, keepdim, num_threads = inputs
    ctx.save_for_backward(input)
    ctx.dims = _lse_dims(dim, input.dim()) if input.dim() else []
    ctx.keepdim, ctx.num_threads = keepdim, num_threads


def _logsumexp_backward(ctx, grad_out):
    (input,) = ctx.saved_tensors
    if input.dim() == 0:
        return grad_out.clone(), None, None, None
    if not ctx.keepdim:
        for d in ctx.dims:
            grad_out = grad_out.unsqueeze(d)
    # softmax over the reduced dimensions, exact (not exp(input - rounded
    # output)) and differentiable through fastxent::softmax, so double
    # backward works.
    dims = ctx.dims
    if len(dims) == 1:
        probs = _softmax_op(input, dims[0], ctx.num_threads)
    else:
        rest = [i for i in range(input.dim()) if i not in dims]
        moved = input.permute(rest + dims)
        flat = moved.reshape(moved.shape[:len(rest)] + (-1,))
        probs = _softmax_op(flat, flat.dim() - 1, ctx.num_threads).reshape(moved.shape)
        probs = probs.permute([(rest + dims).index(i) for i in range(input.dim())])
    if not torch.is_grad_enabled() and eager(probs):
        return probs.mul_(grad_out), None, None, None
    return probs * grad_out, None, None, None


_logsumexp_op.register_autograd(_logsumexp_backward, setup_context=_logsumexp_setup)


# --------------------------------------------------------------------------
# In-place backward (eager only): the gradient is written over the input
# --------------------------------------------------------------------------

def _storage_refs(t):
    # +1: the storage object made here to ask.
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def check_inplace(op, input):
    """Refuse ``inplace_backward=True`` unless overwriting ``input`` is safe to
    autograd: not a leaf, and its memory held by no other tensor (a tensor a
    node saved for backward holds it, as does any other view of it)."""
    base = input._base
    if input.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        raise RuntimeError(
            f"fastxent.torch.{op}(inplace_backward=True): the input is a leaf tensor that "
            "requires grad (or a view of one); its values are parameters and cannot be "
            "overwritten by the gradient. Pass inplace_backward=False")
    # One reference from the input's Python object; a view adds its base's
    # (the base's Python object, made here if need be, and the view's own).
    refs, want = input._use_count(), 1
    storage, want_storage = _storage_refs(input), 1
    if base is not None:
        refs += base._use_count() - 2
        want_storage += 1
    if refs != want or storage != want_storage:
        raise RuntimeError(
            f"fastxent.torch.{op}(inplace_backward=True): the input's memory is also held "
            "elsewhere (by a tensor autograd saved for backward, or by another view of it), "
            "so overwriting it with the gradient could corrupt another gradient. Pass "
            "inplace_backward=False, or pass the input as a temporary that nothing else "
            "uses (e.g. model(x).view(-1, C) rather than a view of a tensor kept alive)")


class EagerLoss(torch.autograd.Function):
    """The operators' autograd formula as an autograd.Function, for eager
    mode, where torch.library's dispatch would cost more than (8, 10) losses
    take to compute.

    ``forward_fn(input, *args, out=...)`` is one of the ``*_forward``
    functions above; ``dim`` is the class dimension a per-row upstream
    gradient is broadcast along (None: elementwise). With ``inplace`` the
    gradient is written over the input's memory (``check_inplace`` first)."""

    @staticmethod
    def forward(ctx, input, forward_fn, dim, op, inplace, *args):
        loss, grad = forward_fn(input, *args, out=input if inplace else None)
        if inplace:
            # Any node that did save the input now fails its version check
            # instead of reading a gradient as if it were the input.
            torch.autograd.graph.increment_version(input)
        ctx.save_for_backward(grad)
        ctx.dim, ctx.op, ctx.nargs = dim, op, len(args)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _no_double_backward(ctx.op)
        (grad,) = ctx.saved_tensors
        return (scale_grad(grad, grad_loss, ctx.dim),) + (None,) * (4 + ctx.nargs)


# The public functions use EagerLoss outside tracing (tests switch it off to
# run the operators' own autograd formulas in eager mode).
EAGER_LOSSES = True


# --------------------------------------------------------------------------
# Gradient buffers
# --------------------------------------------------------------------------

# A fresh logits-sized tensor per training step costs more than the loss:
# the kernel pages it in (zero-filled by the OS, a page fault per 4 KiB) on
# the first write, about 4x the time the fused visit itself takes at
# (4096, 32000) float32. So eager losses write their gradient into a buffer
# kept from an earlier step once nothing else uses it, as a caching
# allocator would. A buffer is a NumPy array: every tensor made from it
# holds one reference to it through its storage, so a reference count of
# one (the cache's) means no tensor, view or autograd node can see it.
_CACHE_MIN_BYTES = 1 << 20  # smaller tensors come cheaply from malloc
_CACHE_MAX_BUFFERS = 4
_cache = []  # most recently used last
_cache_lock = threading.Lock()
CACHE_GRADIENTS = os.environ.get("FASTXENT_TORCH_CACHE", "1") != "0"


def empty_cache():
    """Release the gradient buffers fastxent.torch keeps for reuse."""
    with _cache_lock:
        _cache.clear()


def _free_buffer(nbytes):
    for i in range(len(_cache)):
        # References: the list's and getrefcount's argument.
        if _cache[i].nbytes == nbytes and sys.getrefcount(_cache[i]) == 2:
            return _cache.pop(i)
    return None


def grad_buffer(like):
    """An uninitialised tensor shaped and typed like the contiguous ``like``,
    from the cache when a buffer of its size is free."""
    nbytes = like.numel() * like.element_size()
    if not CACHE_GRADIENTS or nbytes < _CACHE_MIN_BYTES:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    with _cache_lock:
        buf = _free_buffer(nbytes)
        if buf is None:
            # torch's allocator, as the tensor would have come from
            buf = torch.empty(nbytes, dtype=torch.uint8).numpy()
            if len(_cache) >= _CACHE_MAX_BUFFERS:
                _cache.pop(0)
        _cache.append(buf)
        # Made under the lock: from here the tensor's reference marks it used.
        return torch.from_numpy(buf).view(like.dtype).view(like.shape)


# --------------------------------------------------------------------------
# The common call in eager mode
# --------------------------------------------------------------------------

# The kernels' dtype codes (csrc/fastxent.h, enum fx_dtype).
_MEAN_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


class _MeanCrossEntropy(torch.autograd.Function):
    """``cross_entropy(input, target)`` with the default options on a
    contiguous 2-D floating input and int64 target: the kernels read
    the tensors at their addresses, since a NumPy view per tensor costs as
    much as an (8, 10) loss does."""

    @staticmethod
    def forward(ctx, input, target, ignore_index, dtype, n, c):
        if n * c < _CACHE_MIN_BYTES // 8:
            # Kept as an attribute, which is cheaper than saving it, for as
            # long as the graph: small enough not to matter.
            grad = ctx.grad = torch.empty_like(input)
        else:
            # Saved, so that backward releases it for the cache.
            grad = grad_buffer(input)
            ctx.save_for_backward(grad)
            ctx.grad = None
        loss = _core.cross_entropy_mean_at(input.data_ptr(), n, c, dtype, target.data_ptr(),
                                           ignore_index, grad.data_ptr(),
                                           torch.get_num_threads())
        return torch.full((), loss, dtype=input.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            _no_double_backward("cross_entropy")
        grad = ctx.grad
        if grad is None:
            grad = ctx.saved_tensors[0]
        # The backward of the loss itself: grad_loss is 1 and grad the answer.
        if grad_loss.item() != 1.0:
            grad = grad * grad_loss
        return grad, None, None, None, None, None


_mean_ce_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _MeanCrossEntropy)


def mean_cross_entropy(input, target, ignore_index):
    """The default-options cross entropy of a plain 2-D CPU input in eager
    mode, or None for any other call (the general path then decides)."""
    dtype = _MEAN_DTYPES.get(input.dtype)
    if (dtype is None or not EAGER_LOSSES or type(target) is not Tensor
            or target.dtype != torch.int64 or input.dim() != 2 or target.dim() != 1
            or target.requires_grad or not eager(input) or not target.is_cpu
            or not input.is_contiguous() or not target.is_contiguous() or input.is_neg()
            or _fw._current_level >= 0):
        return None
    n, c = input.shape
    if n == 0 or c == 0 or len(target) != n:
        return None
    if torch.is_grad_enabled() and input.requires_grad:
        # Function.apply's Python wrapper only unwraps functorch tensors,
        # which eager() has ruled out.
        return _mean_ce_apply(input, target, ignore_index, dtype, n, c)
    loss = _core.cross_entropy_mean_at(input.data_ptr(), n, c, dtype, target.data_ptr(),
                                       ignore_index, 0, torch.get_num_threads())
    return torch.full((), loss, dtype=input.dtype)
