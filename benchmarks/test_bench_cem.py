"""fastxent.cem.minimize against evotorch's CEM on the same objectives and budgets.

    flock /tmp/fx-bench.lock python -m pytest benchmarks/test_bench_cem.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Both run the same algorithm on a separable Gaussian: each generation draws
``popsize`` points, keeps the best ``elite_frac`` of them and refits the mean
and standard deviation to that elite (evotorch's CEM takes the parents' mean
and std with no smoothing, which is ``smoothing=1.0`` here; the
``fastxent-smoothed`` contender uses the default 0.7).  A run stops when the
best value seen reaches ``TARGET`` (the optimum of both objectives is 0) or
after ``MAX_ITER`` generations.

Timed: one run from seed 0 (wall time to reach the target).  Recorded in
``extra_info``: ``samples_to_target`` (objective evaluations until the
target, median over seeds 0-4; ``None`` where a seed never reached it),
``reached`` (how many of the 5 seeds did), and the budget.  evotorch is
optional (``pip install --no-deps evotorch`` plus ray, protobuf, jsonschema,
gymnasium; never an unpinned torch); without it its contender is skipped.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest

from fastxent import cem

TARGET = 1e-6
MAX_ITER = 300
SEEDS = range(5)

# name: (dimension, popsize, initial mean, initial std, numpy objective)
SHIFT = np.linspace(-2.0, 2.0, 10)


def sphere(x):
    return np.sum(x * x, axis=-1)


def rastrigin(x):
    z = x - SHIFT
    return np.sum(z * z + 10.0 * (1.0 - np.cos(2.0 * np.pi * z)), axis=-1)


OBJECTIVES = {
    "sphere-20d": (20, 500, 3.0, 2.0, sphere),
    "rastrigin-10d": (10, 500, 0.0, 5.0, rastrigin),
}
ELITE_FRAC = 0.1


def run_fastxent(name, seed, smoothing):
    d, popsize, mean, std, f = OBJECTIVES[name]
    res = cem.minimize(f, cem.Normal(np.full(d, mean), std), n_samples=popsize, elite_frac=ELITE_FRAC,
                       smoothing=smoothing, max_iter=MAX_ITER, tol=0.0, rng=seed,
                       callback=lambda state: state.best <= TARGET)
    return res.nfev, res.fun


@contextlib.contextmanager
def one_torch_thread(torch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # NumPy's side of the comparison runs on one core too
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_evotorch(name, seed):
    import torch
    from evotorch import Problem
    from evotorch.algorithms import CEM

    d, popsize, mean, std, f = OBJECTIVES[name]

    def batch(x):
        return torch.from_numpy(f(x.numpy()))

    logging.getLogger("evotorch").setLevel(logging.WARNING)
    with one_torch_thread(torch):
        problem = Problem("min", batch, solution_length=d, initial_bounds=(-1.0, 1.0), vectorized=True,
                          dtype=torch.float64, seed=seed)
        searcher = CEM(problem, popsize=popsize, parenthood_ratio=ELITE_FRAC, stdev_init=std,
                       center_init=mean)
        for generation in range(1, MAX_ITER + 1):
            searcher.step()
            best = float(searcher.status["best_eval"])
            if best <= TARGET:
                break
    return generation * popsize, best


CONTENDERS = {
    "fastxent": lambda name, seed: run_fastxent(name, seed, 1.0),
    "fastxent-smoothed": lambda name, seed: run_fastxent(name, seed, 0.7),
    "evotorch": run_evotorch,
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_cem_minimize(benchmark, objective, contender):
    if contender == "evotorch":
        pytest.importorskip("evotorch", reason="evotorch not installed (contender absent)")
    run = CONTENDERS[contender]
    outcomes = [run(objective, seed) for seed in SEEDS]
    hits = [n for n, best in outcomes if best <= TARGET]
    d, popsize, mean, std, _ = OBJECTIVES[objective]
    benchmark.group = f"cem minimize {objective}"
    benchmark.extra_info.update(
        contender=contender,
        objective=objective,
        dimension=d,
        popsize=popsize,
        elite_frac=ELITE_FRAC,
        initial=f"N({mean}, {std}^2)",
        target=TARGET,
        max_iter=MAX_ITER,
        reached=f"{len(hits)}/{len(outcomes)}",
        samples_to_target=float(np.median(hits)) if hits else None,
        samples_to_target_each=[n if best <= TARGET else None for n, best in outcomes],
    )
    nfev, best = benchmark.pedantic(run, args=(objective, 0), rounds=3, warmup_rounds=0, iterations=1)
    assert best <= TARGET or nfev == MAX_ITER * popsize
