"""fastxent quickstart: the cross entropy of a language-model-sized batch.

    python examples/quickstart.py              # logits of shape (4096, 32000)
    python examples/quickstart.py 1024 32000   # N C: a smaller (or larger) problem

Computes the mean cross entropy of random float32 logits with fastxent, its
fused loss + gradient into a preallocated buffer, and the same loss with the
plain NumPy float64 reference (fastxent.reference); prints the values side by
side, the median times and the speed-up.
"""

import contextlib
import io
import sys
import time

import numpy as np

import fastxent
from fastxent import reference


def median_time(fn, repeats=5, budget_s=2.0):
    """Median wall time of ``fn()`` over up to ``repeats`` calls after one
    untimed warm-up call (which also pays for first-touch page faults); no
    more calls start once ``budget_s`` seconds are spent, warm-up included,
    but at least one is timed."""
    start = time.perf_counter()
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return float(np.median(times)), result


def main(argv):
    if len(argv) not in (1, 3):
        sys.exit(__doc__)
    n, c = (int(argv[1]), int(argv[2])) if len(argv) == 3 else (4096, 32000)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, c), dtype=np.float32) * np.float32(3.0)
    labels = rng.integers(0, c, size=n)  # int64 class indices in [0, C)
    grad = np.empty_like(logits)  # reused by every call: no N x C allocation

    t_loss, loss = median_time(lambda: fastxent.cross_entropy(logits, labels))
    t_grad, (loss_g, _) = median_time(
        lambda: fastxent.cross_entropy_with_grad(logits, labels, out=grad)
    )
    # The reference converts to float64 and materialises several N x C
    # float64 temporaries (seconds and GBs at the default size): with this
    # budget it runs twice, the warm-up call and one timed call.
    t_ref, loss_ref = median_time(lambda: reference.cross_entropy(logits, labels), repeats=3)

    # The gradient against the reference, on a slice of rows (cheap).
    rows = slice(0, min(n, 256))
    _, grad_rows = fastxent.cross_entropy_with_grad(logits[rows], labels[rows])
    _, grad_rows_ref = reference.cross_entropy_with_grad(logits[rows], labels[rows])
    grad_err = float(np.max(np.abs(grad_rows.astype(np.float64) - grad_rows_ref)))

    print(f"logits {logits.shape} {logits.dtype}, labels {labels.shape} {labels.dtype}\n")
    print(f"{'':34}{'loss':>20}{'median time':>14}")
    print(f"{'fastxent.cross_entropy':34}{float(loss):>20.9f}{t_loss * 1e3:>11.2f} ms")
    print(f"{'fastxent.cross_entropy_with_grad':34}{float(loss_g):>20.9f}{t_grad * 1e3:>11.2f} ms")
    print(f"{'fastxent.reference (float64)':34}{float(loss_ref):>20.9f}{t_ref * 1e3:>11.2f} ms")
    print()
    print(f"|loss - reference|          {abs(float(loss) - float(loss_ref)):.3g}")
    print(f"max |grad - reference|      {grad_err:.3g}  (first {grad_rows.shape[0]} rows)")
    print(f"speed-up over the reference {t_ref / t_loss:.1f}x for the loss; "
          f"{t_ref / t_grad:.1f}x for loss + gradient against the reference's loss alone")
    gbps = logits.nbytes / t_loss / 1e9
    print(f"fastxent forward reads the logits at {gbps:.1f} GB/s")
    print()

    # show_config() reports version, ISA, OpenMP and threads; print its text,
    # or the dict it returns if it prints nothing.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        config = fastxent.show_config()
    print(buf.getvalue().rstrip() or config)


if __name__ == "__main__":
    main(sys.argv)
