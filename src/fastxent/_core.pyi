from typing import Optional

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
) -> None: ...
def expm(x: np.ndarray) -> np.ndarray: ...
def expm_f32_max_ulp(lo: float, hi: float) -> tuple[float, float]: ...
