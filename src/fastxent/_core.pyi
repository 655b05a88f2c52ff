from typing import Any, Optional, Union

import numpy as np

CE_HARD: int
CE_SOFT: int
CE_PROBS_HARD: int
CE_PROBS_SOFT: int
LOGSUMEXP: int
LOG_SOFTMAX: int
SOFTMAX: int
ENTROPY: int
ENTROPY_PROBS: int
KL_PROBS: int
KL_LOG_PROBS: int
KL_LOGITS: int
BCE_LOGITS: int
BCE_PROBS: int
SHARD_STATS: int
SHARD_GRAD: int
CE_OPTS_HARD: int
CE_OPTS_SOFT: int
JSD_PROBS: int
JSD_LOG_PROBS: int
JSD_LOGITS: int
MAX_THREADS: int

def init_status() -> int: ...
def available_isas() -> list[str]: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def set_omp_threads(n: int) -> None: ...
def set_default_threads(n: int) -> None: ...
def threads(num_threads: Optional[int] = ...) -> int: ...
def run(
    op: int,
    x: np.ndarray,
    *,
    num_threads: Optional[int] = ...,
    xdtype: int = ...,
    labels: Optional[np.ndarray] = ...,
    ignore_index: int = ...,
    target: Optional[np.ndarray] = ...,
    weight: Optional[np.ndarray] = ...,
    w_sum: float = ...,
    smoothing: float = ...,
    temperature: float = ...,
    pos_weight: Optional[np.ndarray] = ...,
    out: Optional[np.ndarray] = ...,
    grad_output: Union[float, np.ndarray, None] = ...,
    gout: Optional[np.ndarray] = ...,
    loss_out: Optional[np.ndarray] = ...,
    reduction: str = ...,
    denom: float = ...,
    scale: float = ...,
    vocab_start: int = ...,
    row_in: Optional[np.ndarray] = ...,
    softcap: float = ...,
    z_loss: float = ...,
    zscale: Optional[np.ndarray] = ...,
    lse_out: Optional[np.ndarray] = ...,
    argmax_out: Optional[np.ndarray] = ...,
    beta: float = ...,
) -> Any: ...
def label_error(value: Any, position: tuple[int, ...], n_classes: int, ignore_index: Any) -> ValueError: ...
def cross_entropy_mean_at(
    x: int,
    n: int,
    c: int,
    dtype: int,
    labels: int,
    ignore_index: int,
    out: int,
    num_threads: int,
) -> float: ...
def cross_entropy_common(
    x: Any,
    labels: Any,
    axis: Any,
    weight: Any,
    ignore_index: Any,
    reduction: Any,
    label_smoothing: Any,
    from_logits: Any,
    base: Any,
    num_threads: Any,
    want_grad: bool = ...,
    grad_output: Any = ...,
    out: Any = ...,
) -> Any: ...
def rows_common(
    op: int,
    x: Any,
    axis: Any,
    num_threads: Any,
    out: Any = ...,
    from_logits: Any = ...,
    base: Any = ...,
) -> Any: ...
def xla_ffi_handler() -> Any: ...
def expm(x: np.ndarray) -> np.ndarray: ...
def expm_f32_max_ulp(lo: float, hi: float) -> tuple[float, float]: ...
def expsum(x: np.ndarray) -> np.ndarray: ...
def expsum_f32_mismatches(lo: float, hi: float) -> tuple[int, float]: ...
def tanh(x: np.ndarray) -> np.ndarray: ...
