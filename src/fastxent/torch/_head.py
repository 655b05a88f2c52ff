"""``fastxent.torch.linear_cross_entropy``: torch's signature over
``fastxent.linear_cross_entropy`` (the head without the (N, V) logits).

An ``autograd.Function`` (eager mode; like torch's own chunked path, it is
opaque to ``torch.compile``).  For "mean" and "sum" the gradients come out
of the forward call and backward only scales them by the upstream scalar;
for "none" the upstream gradient is one value per row and enters the weight
gradient row by row, so backward calls the head again with it (Liger's
issue #968: scaling precomputed gradients would be wrong there).
"""
from __future__ import annotations

import numpy as np
import torch

import fastxent

from ._ops import _as_loss, _np, check_reduction, check_threads

__all__ = ["linear_cross_entropy"]


def _tensor(a):
    """A NumPy result as a tensor (bfloat16 through an int16 view)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias, options):
        h, w, y = _np(input), _np(linear_weight), target.detach().numpy()
        b = None if linear_bias is None else _np(linear_bias)
        wants = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        ctx.options, ctx.has_bias = options, linear_bias is not None
        ctx.precomputed = wants and options["reduction"] != "none"
        if ctx.precomputed:
            loss, *grads = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, **options)
            ctx.save_for_backward(*[_tensor(g) for g in grads])
        else:
            loss = fastxent.linear_cross_entropy(h, w, y, bias=b, **options)
            ctx.save_for_backward(input, linear_weight, target, linear_bias)
        return _as_loss(loss, input.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise NotImplementedError("fastxent.torch.linear_cross_entropy does not support "
                                      "double backward (create_graph=True)")
        if ctx.precomputed:
            grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        else:
            input, linear_weight, target, linear_bias = ctx.saved_tensors
            _, *res = fastxent.linear_cross_entropy_with_grad(
                _np(input), _np(linear_weight), target.numpy(),
                bias=None if linear_bias is None else _np(linear_bias),
                grad_output=grad_loss.detach().double().numpy(), **ctx.options)
            grads = [_tensor(g) for g in res]
        d_bias = grads[2] if ctx.has_bias else None
        return grads[0], grads[1], None, d_bias, None


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0,
                         options=None, z_loss=0.0, softcap=None, num_threads=None):
    """``torch.nn.functional.linear_cross_entropy`` (integer targets) computed
    by ``fastxent.linear_cross_entropy``: never materialises the logits.

    ``options`` (torch's chunking options) is accepted and ignored: the
    chunking is fastxent's.  ``z_loss`` and ``softcap`` are fastxent's
    options (docs/lm-head.md).  Gradients w.r.t. ``input``,
    ``linear_weight`` and ``linear_bias``; class weights get none."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target),
                    ("linear_bias", linear_bias), ("weight", weight)):
        if t is not None and t.device.type != "cpu":
            raise TypeError(f"fastxent.torch.linear_cross_entropy computes on the CPU; {name} "
                            f"is on device {t.device!s}")
    if target.dtype.is_floating_point:
        raise TypeError("fastxent.torch.linear_cross_entropy takes integer class targets, got "
                        f"{target.dtype}")
    opts = dict(class_weight=None if weight is None else weight.detach().double().numpy(),
                ignore_index=-100 if ignore_index is None else int(ignore_index),
                reduction=check_reduction(reduction), label_smoothing=float(label_smoothing),
                z_loss=z_loss, softcap=softcap,
                num_threads=check_threads(num_threads) or torch.get_num_threads())
    return _LinearCrossEntropy.apply(input, linear_weight, target, linear_bias, opts)
