"""Combinatorial optimisation with the cross-entropy method: max-cut.

    python examples/cem_maxcut.py                 # n = 400 nodes
    python examples/cem_maxcut.py --n 1000 --min-prob 1e-3 --plot cut.png

Split the nodes of a weighted graph into two sets so that the total weight
of the edges between them is largest.  The instance is the synthetic one of
de Boer, Kroese, Mannor and Rubinstein ("A Tutorial on the Cross-Entropy
Method", 2005, section 5): two halves of m = n/2 nodes, weights uniform on
(0, 1) inside each half and 1 across.  Its optimum is known: the planted cut
between the halves, of weight m^2 (any other cut is lighter, since an
inside weight is below 1).

A cut is a 0/1 vector x (x_i = 1: node i on node 0's side, so x_0 = 1);
``fastxent.cem.maximize`` samples x from independent Bernoulli(p_i), keeps
the best 10 %, and moves p towards their frequencies.  The table shows the
level gamma_t, the best cut so far and how much p moved; with matplotlib
installed the levels and the p vector over the iterations are plotted to a
PNG (--plot, or the temporary directory).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastxent import cem
from _figures import default_path, pyplot, save  # examples/_figures.py


def planted_instance(n, rng):
    """Weights of the synthetic max-cut instance: U(0, 1) inside each half, 1 across."""
    m = n // 2
    w = np.ones((n, n))
    for half in (slice(0, m), slice(m, n)):
        inside = np.triu(rng.random((m, m)), 1)
        w[half, half] = inside + inside.T
    return w


def cut_weight(w):
    """Vectorised objective: the weight of the cut of each 0/1 row of a batch."""
    degree = w.sum(axis=1)

    def f(x):
        x = x.astype(np.float64)
        # sum_{i in V1, j in V2} w_ij = x.degree - x^T W x
        return x @ degree - np.einsum("ni,ni->n", x @ w, x)

    return f


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="number of nodes (even)")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--elite-frac", type=float, default=0.1)
    parser.add_argument("--smoothing", type=float, default=0.7)
    parser.add_argument("--min-prob", type=float, default=0.0, help="floor on every probability")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", default=default_path("cem-maxcut"))
    args = parser.parse_args(argv)

    n, m = args.n, args.n // 2
    w = planted_instance(n, np.random.default_rng(0))
    p0 = np.full(n, 0.5)
    p0[0] = 1.0  # node 0 fixes the side: a cut and its mirror image are one solution
    trace = []

    def callback(state):
        trace.append(state.family.p)
        print(f"{state.iteration:4d}  {state.gamma:12.3f}  {state.best:12.3f}  {state.param_change:8.4f}")

    print(f"max-cut, planted instance: n = {n}, optimum m^2 = {m * m}")
    print(f"N = {args.n_samples}, rho = {args.elite_frac}, smoothing = {args.smoothing}, "
          f"min_prob = {args.min_prob}, seed {args.seed}\n")
    print("iter       gamma_t     best cut   max |dp|")
    start = time.perf_counter()
    res = cem.maximize(cut_weight(w), cem.Bernoulli(p0, min_prob=args.min_prob), n_samples=args.n_samples,
                       elite_frac=args.elite_frac, smoothing=args.smoothing, rng=args.seed, callback=callback)
    seconds = time.perf_counter() - start
    planted = np.r_[np.ones(m), np.zeros(n - m)]
    print(f"\nstopped after {res.nit} iterations ({res.stop_reason}), {res.nfev} cuts evaluated, {seconds:.1f} s")
    print(f"best cut {res.fun:.3f}  (optimum {m * m}); planted cut found: {np.array_equal(res.x, planted)}")
    plot(res, np.array(trace), m * m, args.plot)


def plot(res, trace, optimum, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    it = np.arange(1, res.nit + 1)
    a.plot(it, res.history["gamma"], label="gamma_t")
    a.plot(it, res.history["best"], label="best cut")
    a.axhline(optimum, color="gray", ls=":", label="optimum")
    a.set_xlabel("iteration")
    a.legend(fontsize=7)
    a.set_title("levels")
    image = b.imshow(trace.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                     extent=(0.5, res.nit + 0.5, trace.shape[1] - 0.5, -0.5))
    b.set_xlabel("iteration")
    b.set_ylabel("node")
    b.set_title("p_i (probability of node 0's side)")
    fig.colorbar(image, ax=b)
    save(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
