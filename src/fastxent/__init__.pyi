from typing import Any, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import reference as reference

__version__: str
__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "logsumexp",
    "log_softmax",
    "softmax",
    "entropy",
    "kl_div",
    "kl_div_with_grad",
    "binary_cross_entropy",
    "binary_cross_entropy_with_grad",
    "set_num_threads",
    "get_num_threads",
    "ShardStats",
    "ShardGradParts",
    "shard_stats",
    "rescale_shard_stats",
    "combine_shard_stats",
    "shard_loss",
    "shard_grad",
    "show_config",
    "__version__",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "jsd",
    "jsd_with_grad",
    "CrossEntropyStats",
]

_Reduction = Literal["mean", "sum", "none"]
_KLReduction = Literal["batchmean", "mean", "sum", "none"]
_TargetKind = Literal["probs", "log_probs", "logits"]
_Array = npt.ArrayLike
_Result = Union[np.floating[Any], npt.NDArray[np.floating[Any]]]

def cross_entropy(
    logits: _Array,
    labels: _Array,
    *,
    axis: int = ...,
    weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    from_logits: bool = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
    z_loss: float = ...,
    softcap: Optional[float] = ...,
    sample_weight: Optional[_Array] = ...,
    n_valid: Optional[float] = ...,
    return_stats: bool = ...,
) -> Any: ...
def cross_entropy_with_grad(
    logits: _Array,
    labels: _Array,
    *,
    axis: int = ...,
    weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    from_logits: bool = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
    grad_output: Union[float, _Array] = ...,
    out: Optional[np.ndarray] = ...,
    z_loss: float = ...,
    softcap: Optional[float] = ...,
    sample_weight: Optional[_Array] = ...,
    n_valid: Optional[float] = ...,
    return_stats: bool = ...,
) -> Tuple[Any, ...]: ...
def logsumexp(x: _Array, *, axis: int = ..., num_threads: Optional[int] = ...) -> _Result: ...
def log_softmax(
    x: _Array, *, axis: int = ..., out: Optional[np.ndarray] = ..., num_threads: Optional[int] = ...
) -> np.ndarray: ...
def softmax(
    x: _Array, *, axis: int = ..., out: Optional[np.ndarray] = ..., num_threads: Optional[int] = ...
) -> np.ndarray: ...
def entropy(
    logits: _Array,
    *,
    axis: int = ...,
    from_logits: bool = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
) -> _Result: ...
def kl_div(
    logits: _Array,
    target: _Array,
    *,
    axis: int = ...,
    target_kind: _TargetKind = ...,
    reduction: _KLReduction = ...,
    temperature: float = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
) -> _Result: ...
def kl_div_with_grad(
    logits: _Array,
    target: _Array,
    *,
    axis: int = ...,
    target_kind: _TargetKind = ...,
    reduction: _KLReduction = ...,
    temperature: float = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
    grad_output: Union[float, _Array] = ...,
    out: Optional[np.ndarray] = ...,
) -> Tuple[_Result, np.ndarray]: ...
def binary_cross_entropy(
    logits: _Array,
    target: _Array,
    *,
    weight: Optional[_Array] = ...,
    pos_weight: Optional[_Array] = ...,
    reduction: _Reduction = ...,
    from_logits: bool = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
) -> _Result: ...
def binary_cross_entropy_with_grad(
    logits: _Array,
    target: _Array,
    *,
    weight: Optional[_Array] = ...,
    pos_weight: Optional[_Array] = ...,
    reduction: _Reduction = ...,
    from_logits: bool = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
    grad_output: Union[float, _Array] = ...,
    out: Optional[np.ndarray] = ...,
) -> Tuple[_Result, np.ndarray]: ...
def set_num_threads(n: Optional[int]) -> None: ...
def get_num_threads() -> int: ...
def show_config(print_: bool = ...) -> dict[str, Any]: ...

class CrossEntropyStats(NamedTuple):
    lse: Any
    z_loss: Any
    argmax: npt.NDArray[np.int64]
    accuracy: Any

def linear_cross_entropy(
    hidden: _Array,
    weight: _Array,
    labels: _Array,
    *,
    bias: Optional[_Array] = ...,
    class_weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: Optional[float] = ...,
    sample_weight: Optional[_Array] = ...,
    n_valid: Optional[float] = ...,
    base: Optional[float] = ...,
    return_stats: bool = ...,
    num_threads: Optional[int] = ...,
    chunk_size: Optional[int] = ...,
) -> Any: ...
def linear_cross_entropy_with_grad(
    hidden: _Array,
    weight: _Array,
    labels: _Array,
    *,
    bias: Optional[_Array] = ...,
    class_weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: Optional[float] = ...,
    sample_weight: Optional[_Array] = ...,
    n_valid: Optional[float] = ...,
    base: Optional[float] = ...,
    return_stats: bool = ...,
    num_threads: Optional[int] = ...,
    chunk_size: Optional[int] = ...,
    grad_output: Union[float, _Array] = ...,
) -> Tuple[Any, ...]: ...
def jsd(
    student_logits: _Array,
    teacher_logits: _Array,
    *,
    beta: float = ...,
    temperature: float = ...,
    target_kind: Literal["logits", "log_probs", "probs"] = ...,
    labels: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: Literal["batchmean", "mean", "sum", "none"] = ...,
    axis: int = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
) -> _Result: ...
def jsd_with_grad(
    student_logits: _Array,
    teacher_logits: _Array,
    *,
    beta: float = ...,
    temperature: float = ...,
    target_kind: Literal["logits", "log_probs", "probs"] = ...,
    labels: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: Literal["batchmean", "mean", "sum", "none"] = ...,
    axis: int = ...,
    base: Optional[float] = ...,
    num_threads: Optional[int] = ...,
    grad_output: Union[float, _Array] = ...,
    out: Optional[np.ndarray] = ...,
) -> Tuple[_Result, np.ndarray]: ...
class ShardStats(NamedTuple):
    max: np.ndarray
    sumexp: np.ndarray
    target_logit: np.ndarray
    in_shard: np.ndarray
    logit_sum: Optional[np.ndarray]
    weight_sum: float
    num_classes: int
    @property
    def lse(self) -> np.ndarray: ...

class ShardGradParts(NamedTuple):
    exp: np.ndarray
    max: np.ndarray
    target_logit: np.ndarray

def shard_stats(
    logits_shard: _Array,
    labels: _Array,
    *,
    vocab_start: int,
    axis: int = ...,
    weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    num_classes: Optional[int] = ...,
    logit_sum: bool = ...,
    return_grad_parts: bool = ...,
    out: Optional[np.ndarray] = ...,
    num_threads: Optional[int] = ...,
) -> Union[ShardStats, Tuple[ShardStats, ShardGradParts]]: ...
def rescale_shard_stats(stats: ShardStats, global_max: _Array) -> ShardStats: ...
def combine_shard_stats(stats: Union[ShardStats, Sequence[ShardStats]]) -> ShardStats: ...
def shard_loss(
    stats: Union[ShardStats, Sequence[ShardStats]],
    labels: _Array,
    *,
    weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    base: Optional[float] = ...,
) -> _Result: ...
def shard_grad(
    logits_shard: Optional[_Array],
    labels: _Array,
    global_lse: _Array,
    *,
    vocab_start: int,
    num_classes: Optional[int] = ...,
    axis: int = ...,
    weight: Optional[_Array] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    base: Optional[float] = ...,
    grad_output: Union[float, _Array] = ...,
    out: Optional[np.ndarray] = ...,
    grad_parts: Optional[ShardGradParts] = ...,
    num_threads: Optional[int] = ...,
) -> np.ndarray: ...
