"""Loss modules: torch's own classes, their forward computed by fastxent.

Each subclasses its ``torch.nn`` counterpart, so constructor arguments,
buffers, ``state_dict`` and ``isinstance`` checks are torch's; the extra
keyword-only arguments are ``inplace_backward`` (where it applies) and
``num_threads``.
"""
from __future__ import annotations

import torch

from . import _functional as F

__all__ = ["CrossEntropyLoss", "KLDivLoss", "BCEWithLogitsLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` over ``fastxent.torch.cross_entropy``."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, inplace_backward=False,
                 num_threads=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.num_threads = num_threads

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               inplace_backward=self.inplace_backward,
                               num_threads=self.num_threads)


class KLDivLoss(torch.nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` over ``fastxent.torch.kl_div`` (torch's semantics)."""

    def forward(self, input, target):
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` over ``fastxent.torch.binary_cross_entropy_with_logits``."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None, *, inplace_backward=False, num_threads=None):
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.inplace_backward = inplace_backward
        self.num_threads = num_threads

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction,
            inplace_backward=self.inplace_backward, num_threads=self.num_threads)
