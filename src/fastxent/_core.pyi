from typing import Any, Optional

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

def init_status() -> int: ...
def available_isas() -> list[str]: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def set_omp_threads(n: int) -> None: ...
def run(
    op: int,
    x: np.ndarray,
    labels: Optional[np.ndarray],
    target: Optional[np.ndarray],
    weight: Optional[np.ndarray],
    w_sum: float,
    ignore_index: int,
    smoothing: float,
    out: Optional[np.ndarray],
    row_out: Optional[np.ndarray],
    gscale: Optional[np.ndarray],
    num_threads: int,
    temperature: float = ...,
    xdtype: int = ...,
) -> None: ...
def sum_f64(v: np.ndarray) -> float: ...
def cross_entropy_fast(
    x: Any,
    labels: Any,
    ignore_index: int,
    num_threads: int,
    want_grad: bool = ...,
    grad_output: float = ...,
    out: Optional[np.ndarray] = ...,
) -> Any: ...
def blocks_fast(op: int, x: Any, out: Optional[np.ndarray], num_threads: int) -> Any: ...
def run_elementwise(
    op: int,
    x: np.ndarray,
    target: Optional[np.ndarray],
    weight: Optional[np.ndarray],
    pos_weight: Optional[np.ndarray],
    loss_out: Optional[np.ndarray],
    out: Optional[np.ndarray],
    row_out: Optional[np.ndarray],
    gscale: Optional[np.ndarray],
    gout: Optional[np.ndarray],
    num_threads: int,
    xdtype: int = ...,
) -> None: ...
def expm(x: np.ndarray) -> np.ndarray: ...
def expm_f32_max_ulp(lo: float, hi: float) -> tuple[float, float]: ...
