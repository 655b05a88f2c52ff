"""torch.nn.functional's signatures over the ``fastxent::`` operators."""
from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction

from . import _ops

__all__ = [
    "cross_entropy",
    "kl_div",
    "kl_div_with_logits",
    "binary_cross_entropy_with_logits",
    "log_softmax",
    "softmax",
    "logsumexp",
]


def _reduction_of(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def _no_grad_wanted(op, **tensors):
    """NotImplementedError naming an argument whose gradient autograd would ask for."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise NotImplementedError(
                f"fastxent.torch.{op} computes gradients w.r.t. input only; {name} "
                f"requires grad. Pass {name}.detach() (or use torch.nn.functional.{op} "
                f"for a gradient w.r.t. {name})")


def _wants_grad(input):
    return torch.is_grad_enabled() and input.requires_grad


def _loss(op, forward_fn, input, dim, inplace_backward, *args):
    """A loss: ``torch.ops.fastxent.<op>(input, *args, want_grad)``, or in
    eager mode the same computation through ``EagerLoss`` (or, with no
    gradient wanted, no autograd at all). ``inplace_backward`` applies in
    eager mode only: under tracing the compiler plans memory itself."""
    _ops.refuse_forward_ad(op, input)
    want_grad = _wants_grad(input)
    if _ops.EAGER_LOSSES and _ops.eager(input):
        if not want_grad:
            return forward_fn(input, *args, False)[0]
        inplace = bool(inplace_backward)
        if inplace:
            _ops.check_inplace(op, input)
        return _ops.EagerLoss.apply(input, forward_fn, dim, op, inplace, *args, True)
    if inplace_backward and want_grad and _ops.eager(input):
        _ops.check_inplace(op, input)
        return _ops.EagerLoss.apply(input, forward_fn, dim, op, True, *args, True)
    loss, _ = getattr(torch.ops.fastxent, op)(input, *args, want_grad)
    return loss


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, inplace_backward=False,
                  num_threads=None):
    """``torch.nn.functional.cross_entropy``, fused: one visit of each row gives
    the loss and its gradient, which is all that is saved for backward.

    Classes along dimension 1 (0 for an unbatched ``(C,)`` input), any extra
    dimensions; ``target`` holds class indices (any integer dtype) or class
    probabilities shaped like ``input``. ``inplace_backward=True`` writes the
    gradient over ``input``'s memory (see the documentation for when that is
    safe; refused when autograd still needs ``input``). ``num_threads``
    defaults to ``torch.get_num_threads()``.
    """
    if (weight is None and size_average is None and reduce is None and reduction == "mean"
            and label_smoothing == 0.0 and not inplace_backward and num_threads is None
            and type(ignore_index) is int):
        loss = _ops.mean_cross_entropy(input, target, ignore_index)
        if loss is not None:
            return loss
    reduction = _ops.check_reduction(_reduction_of(size_average, reduce, reduction))
    nt = _ops.check_threads(num_threads)
    _no_grad_wanted("cross_entropy", target=target, weight=weight)
    return _loss("cross_entropy", _ops.ce_forward, input, _ops._class_dim(input.dim()),
                 inplace_backward, target, weight, int(ignore_index), reduction,
                 float(label_smoothing), nt)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """``torch.nn.functional.kl_div``: ``input`` holds log-probabilities,
    ``target`` probabilities (log-probabilities with ``log_target=True``);
    the loss is elementwise, and ``reduction`` has torch's meaning ("mean":
    over every element; "batchmean": over ``input.size(0)``; "none":
    elementwise). Only ``target``, not ``input``, is kept for backward.

    For distillation from logits, ``kl_div_with_logits`` fuses both softmaxes.
    """
    reduction = _ops.check_reduction(_reduction_of(size_average, reduce, reduction),
                                     _ops._KL_REDUCTIONS)
    if target.shape != input.shape:
        raise ValueError(f"kl_div: target must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    _no_grad_wanted("kl_div", target=target)
    return torch.ops.fastxent.kl_div(input, target, reduction, bool(log_target))


def kl_div_with_logits(input, target, *, dim=-1, target_kind="logits", reduction="batchmean",
                       temperature=1.0, inplace_backward=False, num_threads=None):
    """``KL(P || softmax(input / T)) * T**2`` along ``dim``: the distillation loss.

    ``P`` is ``softmax(target / T)`` for ``target_kind="logits"`` (the teacher's
    logits; neither softmax is materialised), else ``target`` itself as
    ``"probs"`` or ``"log_probs"``. fastxent's reductions: "batchmean" and
    "mean" divide the sum by the number of rows (the product of every
    dimension but ``dim``), "sum", and "none" (one value per row).
    """
    reduction = _ops.check_reduction(reduction, _ops._KL_REDUCTIONS)
    if not isinstance(target_kind, str) or target_kind not in ("logits", "probs", "log_probs"):
        raise ValueError("target_kind must be one of 'logits', 'probs', 'log_probs'; "
                         f"got {target_kind!r}")
    nt = _ops.check_threads(num_threads)
    _no_grad_wanted("kl_div_with_logits", target=target)
    return _loss("kl_div_with_logits", _ops.kl_logits_forward, input,
                 int(dim) % max(input.dim(), 1), inplace_backward, target, int(dim), target_kind,
                 reduction, float(temperature), nt)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None, *,
                                     inplace_backward=False, num_threads=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits``, loss and
    gradient from one elementwise pass; ``weight`` broadcast to ``input``,
    ``pos_weight`` broadcast against it (a ``(C,)`` vector along the last
    dimension). Both must be finite and non-negative."""
    reduction = _ops.check_reduction(_reduction_of(size_average, reduce, reduction))
    nt = _ops.check_threads(num_threads)
    _no_grad_wanted("binary_cross_entropy_with_logits", target=target, weight=weight,
                    pos_weight=pos_weight)
    return _loss("binary_cross_entropy_with_logits", _ops.bce_forward, input, None,
                 inplace_backward, target, weight, pos_weight, reduction, nt)


def _softmax_dim(op, dim, ndim, stacklevel):
    if dim is None:
        warnings.warn(f"Implicit dimension choice for {op} has been deprecated. "
                      "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
        return 0 if ndim in (0, 1, 3) else 1
    if ndim == 0:
        if dim not in (0, -1):
            raise IndexError(f"{op}: dim {dim} is out of range for a 0-dim input")
        return 0
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} is out of range for a {ndim}-dim input")
    return dim % ndim


def log_softmax(input, dim=None, _stacklevel=3, dtype=None, *, num_threads=None):
    """``torch.nn.functional.log_softmax``: ``x - max - log(sum(exp(x - max)))``."""
    if dtype is not None:
        input = input.to(dtype)
    dim = _softmax_dim("log_softmax", dim, input.dim(), _stacklevel)
    return torch.ops.fastxent.log_softmax(input, dim, _ops.check_threads(num_threads))


def softmax(input, dim=None, _stacklevel=3, dtype=None, *, num_threads=None):
    """``torch.nn.functional.softmax``: ``exp(x - logsumexp(x))``."""
    if dtype is not None:
        input = input.to(dtype)
    dim = _softmax_dim("softmax", dim, input.dim(), _stacklevel)
    return torch.ops.fastxent.softmax(input, dim, _ops.check_threads(num_threads))


def logsumexp(input, dim, keepdim=False, *, num_threads=None):
    """``torch.logsumexp``: ``log(sum(exp(input)))`` over ``dim`` (an int or a
    tuple of ints). Integer inputs are computed in torch's default dtype."""
    if not input.dtype.is_floating_point:
        input = input.to(torch.get_default_dtype())
    dims = [int(dim)] if isinstance(dim, int) else [int(d) for d in dim]
    nd = max(input.dim(), 1)
    for d in dims:
        if not -nd <= d < nd:
            raise IndexError(f"logsumexp: dim {d} is out of range for a {input.dim()}-dim input")
    return torch.ops.fastxent.logsumexp(input, dims, bool(keepdim),
                                        _ops.check_threads(num_threads))
