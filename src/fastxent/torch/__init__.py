"""fastxent in PyTorch training loops: drop-in losses with fused backward.

``fastxent.torch.cross_entropy`` and its relatives take torch's signatures
and semantics, so replacing ``torch.nn.functional.X`` by ``fastxent.torch.X``
changes nothing but speed and memory. They are ``torch.library`` custom
operators in the ``fastxent::`` namespace (``torch.ops.fastxent.*``), with
fake implementations and autograd formulas, so they run under autograd,
``torch.compile`` and FakeTensor tracing. CPU tensors only.

Needs ``pip install fastxent[torch]`` (torch, and ml_dtypes for bfloat16).
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastxent.torch needs PyTorch: pip install fastxent[torch]") from exc

from . import _functional, _modules
from ._functional import *  # noqa: F401,F403
from ._head import linear_cross_entropy
from ._modules import *  # noqa: F401,F403
from ._ops import empty_cache

__all__ = _functional.__all__ + _modules.__all__ + ["linear_cross_entropy", "empty_cache"]
