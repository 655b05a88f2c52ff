"""Vocabulary-parallel cross entropy over ``torch.distributed``.

In tensor-parallel training each rank of a process group holds the logits of
one slice ``[vocab_start, vocab_start + C_local)`` of the vocabulary, and no
rank holds a whole row. ``vocab_parallel_cross_entropy`` computes the cross
entropy of the whole rows with fastxent's shard kernels
(``fastxent.shard_stats``, ``fastxent.shard_grad``):

* forward: each rank reduces its slice to per-row statistics; one
  all-reduce (MAX) of the row maxima, one all-reduce (SUM) of a packed
  buffer (the sums of exponentials rescaled to the global maxima, the target
  logits, the in-shard flags, the label-smoothing sums, the class counts),
  then every rank computes the same loss (the merge rule of
  ``fastxent._shard``);
* backward: each rank's gradient from its own logits and the saved global
  log-sum-exp, with no communication.

Works with every backend that has MAX and SUM all-reduces on CPU tensors
(gloo). Needs ``torch`` (``pip install fastxent[torch]``).
"""
from __future__ import annotations

import importlib.util

import numpy as np

if importlib.util.find_spec("torch") is None:  # pragma: no cover - depends on the environment
    raise ImportError("fastxent.torch.distributed needs PyTorch: pip install fastxent[torch] "
                      "(torch==2.13.0)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .. import _api, _shard

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _to_numpy(t):
    """A CPU tensor's data as a NumPy array without a copy (bfloat16 as
    ml_dtypes' bfloat16)."""
    t = t.detach()
    if t.device.type != "cpu":
        raise ValueError(f"vocab_parallel_cross_entropy computes on CPU tensors; got device {t.device}")
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover
            raise TypeError("bfloat16 logits need ml_dtypes (pip install ml_dtypes)") from None
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_numpy(a, dtype):
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a).to(dtype)


def _collective(op_name, tensor, op, group, rank):
    try:
        dist.all_reduce(tensor, op=op, group=group)
    except Exception as exc:
        raise RuntimeError(
            f"vocab_parallel_cross_entropy: the all-reduce ({op_name}) failed on rank {rank}: "
            f"a rank of the group may have died, or not reached the same call within the "
            f"group's timeout ({type(exc).__name__}: {exc})") from exc


def _layout(group, c_local, vocab_start):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the group passed as group=")
    inferred = vocab_start is None
    v0 = rank * c_local if inferred else vocab_start
    return rank, world, v0, inferred


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, group, vocab_start, ignore_index, reduction,
                label_smoothing, num_threads):
        x = _to_numpy(logits)
        y = _to_numpy(target)
        w = None if weight is None else _to_numpy(weight)
        c_local = x.shape[-1]
        rank, world, v0, inferred = _layout(group, c_local, vocab_start)
        num_classes = None if w is None else w.shape[0]
        smooth = label_smoothing > 0
        st = _shard.shard_stats(x, y, vocab_start=v0, weight=w, ignore_index=ignore_index,
                                num_classes=num_classes, logit_sum=smooth,
                                num_threads=num_threads)

        gmax = torch.from_numpy(np.array(st.max, dtype=np.float64, copy=True).reshape(-1))
        _collective("MAX", gmax, dist.ReduceOp.MAX, group, rank)
        M = gmax.numpy().reshape(np.shape(st.max))
        sc = _shard.rescale_shard_stats(st, M)
        n = M.size
        fields = [sc.sumexp, sc.target_logit, sc.in_shard] + ([sc.logit_sum] if smooth else [])
        buf = np.empty(len(fields) * n + 3)
        for i, f in enumerate(fields):
            buf[i * n:(i + 1) * n] = np.reshape(f, -1)
        buf[-3:] = (sc.weight_sum, c_local, float(c_local) ** 2)
        packed = torch.from_numpy(buf)
        _collective("SUM", packed, dist.ReduceOp.SUM, group, rank)
        red = packed.numpy()
        total_c = int(round(red[-2]))
        if inferred and (total_c != world * c_local or red[-1] != world * float(c_local) ** 2):
            raise ValueError(
                f"the ranks hold shards of different sizes (this rank: {c_local} classes, "
                f"{total_c} in all over {world} ranks): pass vocab_start= explicitly")
        if num_classes is not None and total_c != num_classes:
            raise ValueError(f"the shards hold {total_c} classes in all but weight has "
                             f"{num_classes} entries")

        def field(i):
            return red[i * n:(i + 1) * n].reshape(M.shape)

        merged = _shard.ShardStats(
            M, field(0), field(1), field(2) > 0.5,
            field(3) if smooth else None, float(red[-3]), total_c)
        loss = _shard.shard_loss(merged, y, weight=w, ignore_index=ignore_index,
                                 reduction=reduction, label_smoothing=label_smoothing)
        ctx.save_for_backward(logits, target, weight)
        ctx.lse = merged.lse
        ctx.opts = dict(vocab_start=v0, num_classes=total_c, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing,
                        num_threads=num_threads)
        return torch.as_tensor(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, weight = ctx.saved_tensors
        g = _to_numpy(grad_loss.to(torch.float64).contiguous())
        grad = _shard.shard_grad(
            _to_numpy(logits), _to_numpy(target), ctx.lse,
            weight=None if weight is None else _to_numpy(weight),
            grad_output=g if g.ndim else float(g), **ctx.opts)
        return _from_numpy(grad, logits.dtype), None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits, target, *, group=None, vocab_start=None,
                                 ignore_index=-100, weight=None, reduction="mean",
                                 label_smoothing=0.0, num_threads=None):
    """Cross entropy of rows whose classes are split across the ranks of ``group``.

    ``local_logits``: this rank's logits, shape ``(..., C_local)`` (classes
    last), for the classes ``[vocab_start, vocab_start + C_local)``;
    ``vocab_start=None`` takes the slices in rank order, all of one size
    (``rank * C_local``), and checks that they are. ``target``: the global
    class indices, shape ``(...)``, the same on every rank. ``weight``: the
    full ``(C,)`` class weights (the same on every rank), or None.
    ``ignore_index``, ``reduction`` and ``label_smoothing`` mean what they
    mean in ``torch.nn.functional.cross_entropy``, whose result (on the
    concatenated logits) this equals. Every rank returns the same loss, a
    tensor of ``local_logits``' dtype, differentiable w.r.t. ``local_logits``.

    Every rank of the group must make the call (it holds two all-reduces);
    a rank that dies or never comes makes the others raise ``RuntimeError``
    once the group's timeout (``init_process_group(timeout=...)``) expires.
    """
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("local_logits and target must be torch tensors, got "
                        f"{type(local_logits).__name__} and {type(target).__name__}")
    if local_logits.ndim < 1:
        raise ValueError("local_logits must have a class axis (its last)")
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(f"target must have the shape of local_logits without its last axis "
                         f"{tuple(local_logits.shape[:-1])}, got {tuple(target.shape)}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight)
    eps = _api._check_smoothing(label_smoothing)
    return _VocabParallelCE.apply(local_logits, target, weight, group, vocab_start,
                                  ignore_index, reduction, eps, num_threads)
