"""Rare-event estimation with the cross-entropy method: the bridge network.

    python examples/cem_rare_event.py
    python examples/cem_rare_event.py --gamma 3 --n-final 1000000 --plot bridge.png

Five roads join A to B: edges 1 and 2 leave A, edges 4 and 5 reach B, and
edge 3 bridges the middle, so the four routes are 1-4, 1-3-5, 2-3-4 and 2-5.
The edge lengths are independent exponentials with means
u = (0.25, 0.4, 0.1, 0.3, 0.2).  How likely is the shortest route to be at
least gamma = 2 long?  (de Boer, Kroese, Mannor and Rubinstein, "A Tutorial
on the Cross-Entropy Method", 2005, section 2.)

About one draw in 75 000 qualifies, so plain Monte Carlo with a budget of
a hundred thousand draws sees one or two hits.  ``fastxent.cem.rare_event``
raises the level in steps, tilts the exponential means towards the event,
and estimates the probability by importance sampling with the tilted
means.  The exact value, by numerical integration (see tests/test_cem.py),
is 1.3425e-05.  With matplotlib installed the levels and tilted means are
plotted to a PNG (--plot, or the temporary directory).
"""

from __future__ import annotations

import argparse

import numpy as np

from fastxent import cem
from _figures import default_path, pyplot, save  # examples/_figures.py

MEANS = np.array([0.25, 0.4, 0.1, 0.3, 0.2])
EXACT_GAMMA_2 = 1.3424597e-05  # numerical integration, tests/test_cem.py::bridge_exact


def shortest_route(x):
    """Length of the shortest A-B route for a batch of edge lengths, shape (n, 5)."""
    return np.minimum.reduce([x[:, 0] + x[:, 3], x[:, 0] + x[:, 2] + x[:, 4],
                              x[:, 1] + x[:, 2] + x[:, 3], x[:, 1] + x[:, 4]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--n-samples", type=int, default=1000, help="samples per level (N)")
    parser.add_argument("--n-final", type=int, default=100_000, help="importance-sampling run (N1)")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=2005)
    parser.add_argument("--plot", default=default_path("cem-bridge"))
    args = parser.parse_args(argv)

    tilts = [MEANS]
    res = cem.rare_event(shortest_route, cem.Exponential(MEANS), args.gamma, n_samples=args.n_samples,
                         rho=args.rho, n_final=args.n_final, rng=args.seed,
                         callback=lambda state: tilts.append(state.family.mean))

    print(f"P(shortest route >= {args.gamma:g}), edge means {MEANS.tolist()}")
    print(f"N = {args.n_samples} per level, rho = {args.rho}, N1 = {args.n_final}, seed {args.seed}\n")
    print(" t   gamma_t    tilted means v_t")
    for t, (level, v) in enumerate(zip(res.levels, tilts[1:]), start=1):
        print(f"{t:2d}  {level:8.4f}    " + "  ".join(f"{m:6.3f}" for m in v))
    lo, hi = res.ci
    print(f"\nestimate {res.estimate:.4e}   relative error {res.rel_error:.3f}   "
          f"{res.confidence:.0%} CI [{lo:.4e}, {hi:.4e}]")
    if args.gamma == 2.0 and np.array_equal(MEANS, [0.25, 0.4, 0.1, 0.3, 0.2]):
        print(f"exact    {EXACT_GAMMA_2:.4e}   (inside the CI: {lo <= EXACT_GAMMA_2 <= hi})")

    crude = shortest_route(np.random.default_rng(args.seed).exponential(MEANS, (res.nfev, 5)))
    hits = int(np.sum(crude >= args.gamma))
    print(f"plain Monte Carlo, same budget of {res.nfev} draws: {hits} hit(s), estimate {hits / res.nfev:.4e}")
    plot(res, np.array(tilts), args.gamma, args.plot)


def plot(res, tilts, gamma, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(np.arange(1, len(res.levels) + 1), res.levels, marker="o")
    a.axhline(gamma, color="gray", ls=":", label="gamma")
    a.set_xlabel("level t")
    a.set_ylabel("gamma_t")
    a.set_title("levels")
    for j in range(tilts.shape[1]):
        b.plot(np.arange(len(tilts)), tilts[:, j], marker=".", label=f"edge {j + 1}")
    b.set_xlabel("level t")
    b.set_ylabel("mean")
    b.set_title("tilted means")
    b.legend(fontsize=7)
    save(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
