"""Tests of fastxent.cem, the cross-entropy method.

Every reference value is computed here, independently of the code under
test: the bridge-network probability by numerical integration, max-cut
optima by enumeration (or by the planted-cut bound proved below), TSP optima
by enumerating tours, densities with scipy.stats, the Markov-chain tour law
by summing it over all tours.  Sample sizes are stated with each test; each
runs in well under a second on one core, except those marked ``slow``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, stats

from fastxent import cem

# ---------------------------------------------------------------------------
# The bridge network (de Boer et al. 2005, section 2)
# ---------------------------------------------------------------------------

BRIDGE_MEANS = np.array([0.25, 0.4, 0.1, 0.3, 0.2])
BRIDGE_GAMMA = 2.0


def bridge_length(x):
    """Shortest path from A to B over edges 1..5 (paths 14, 135, 234, 25)."""
    return np.minimum.reduce([x[:, 0] + x[:, 3], x[:, 0] + x[:, 2] + x[:, 4],
                              x[:, 1] + x[:, 2] + x[:, 3], x[:, 1] + x[:, 4]])


def _bridge_inner(x1, x2, u=BRIDGE_MEANS, g=BRIDGE_GAMMA):
    """P(S >= g | X1=x1, X2=x2), integrating X3, X4, X5 exactly.

    Given x1, x2, x3 the event is X4 >= a, X5 >= b with
    a = max(g-x1, g-x2-x3, 0), b = max(g-x2, g-x1-x3, 0), of probability
    exp(-a/u4 - b/u5).  Between the breakpoints of a and b in x3 both are
    linear, so the integral against the density of X3 is a sum of
    exponentials.
    """
    _, _, u3, u4, u5 = u
    pts = sorted({0.0, *(p for p in (x1 - x2, x2 - x1, g - x1, g - x2) if p > 0)}) + [math.inf]
    total = 0.0
    for lo, hi in zip(pts[:-1], pts[1:]):
        mid = lo + 1.0 if math.isinf(hi) else 0.5 * (lo + hi)
        # Each of a, b is c - s * x3 on this interval, s in {0, 1}: the
        # candidate that is largest at the midpoint.
        a0, sa = max([(g - x1, 0.0), (g - x2, 1.0), (0.0, 0.0)], key=lambda c: c[0] - c[1] * mid)
        b0, sb = max([(g - x2, 0.0), (g - x1, 1.0), (0.0, 0.0)], key=lambda c: c[0] - c[1] * mid)
        c0 = -a0 / u4 - b0 / u5
        k = -1.0 / u3 + sa / u4 + sb / u5
        if math.isinf(hi):
            seg = -math.exp(c0 + k * lo) / k
        elif abs(k) < 1e-14:
            seg = math.exp(c0) * (hi - lo)
        else:
            seg = math.exp(c0) * (math.exp(k * hi) - math.exp(k * lo)) / k
        total += seg / u3
    return total


def bridge_exact(u=BRIDGE_MEANS, g=BRIDGE_GAMMA):
    """P(S(X) >= g) by adaptive quadrature over (X1, X2) of the exact inner part.

    Outside [0, g)^2 the event no longer depends on X1 (X2) beyond X1 >= g
    (X2 >= g), whose tail probability factors out.
    """
    u1, u2 = u[0], u[1]

    def f1(x):
        return math.exp(-x / u1) / u1

    def f2(x):
        return math.exp(-x / u2) / u2

    opts = dict(epsabs=0.0, epsrel=1e-11, limit=200)

    def over_x2(x1):
        kinks = [p for p in (x1, 2 * x1 - g, (x1 + g) / 2, g - x1) if 0 < p < g]
        return integrate.quad(lambda x2: f2(x2) * _bridge_inner(x1, x2, u, g), 0, g,
                              points=kinks or None, **opts)[0]

    square = integrate.quad(lambda x1: f1(x1) * over_x2(x1), 0, g, points=[g / 2], **opts)[0]
    t1, t2 = math.exp(-g / u1), math.exp(-g / u2)
    edge1 = t1 * integrate.quad(lambda x2: f2(x2) * _bridge_inner(g, x2, u, g), 0, g, **opts)[0]
    edge2 = t2 * integrate.quad(lambda x1: f1(x1) * _bridge_inner(x1, g, u, g), 0, g, **opts)[0]
    return square + edge1 + edge2 + t1 * t2 * _bridge_inner(g, g, u, g)


@pytest.fixture(scope="module")
def bridge_value():
    return bridge_exact()


def test_bridge_exact_value_is_right():
    # The integration itself, checked where the answer is elementary: at
    # g -> 0 nothing is excluded (probability 1), and with X3 nearly 0 the
    # bridge shortcut makes S = min(X1, X2) + min(X4, X5) a sum of two
    # independent exponentials of rates 1/u1+1/u2 and 1/u4+1/u5.
    assert bridge_exact(g=1e-9) == pytest.approx(1.0, abs=1e-8)
    u = np.array([0.25, 0.4, 1e-9, 0.3, 0.2])
    r1, r2 = 1 / u[0] + 1 / u[1], 1 / u[3] + 1 / u[4]
    g = 0.5
    hypo = (r2 * math.exp(-r1 * g) - r1 * math.exp(-r2 * g)) / (r2 - r1)
    assert bridge_exact(u=u, g=g) == pytest.approx(hypo, rel=1e-6)


def test_bridge_rare_event_matches_exact(bridge_value):
    # N = 1000 per level, rho = 0.1, N1 = 100_000 final samples, as in the tutorial.
    res = cem.rare_event(bridge_length, cem.Exponential(BRIDGE_MEANS), BRIDGE_GAMMA,
                         n_samples=1000, rho=0.1, n_final=100_000, rng=2005)
    assert res.reached and res.levels[-1] == BRIDGE_GAMMA
    assert np.all(np.diff(res.levels) > 0)
    assert res.rel_error < 0.05
    assert abs(res.estimate - bridge_value) <= 3 * res.rel_error * bridge_value
    assert res.ci[0] < res.estimate < res.ci[1]
    assert res.log_estimate == pytest.approx(math.log(res.estimate))
    # The tilt lengthens the four outer edges, which every path uses.
    means = res.params["mean"]
    assert np.all(means[[0, 1, 3, 4]] > 1.5 * BRIDGE_MEANS[[0, 1, 3, 4]])


def test_bridge_confidence_interval_coverage(bridge_value):
    # 100 independent runs (seeds 0..99), N = 1000, N1 = 10_000, 95 % intervals.
    # A correctly calibrated 95 % interval covers the exact value at least 89
    # times in 100 with probability 0.996 (binomial); deterministic given the seeds.
    covered = 0
    for seed in range(100):
        res = cem.rare_event(bridge_length, cem.Exponential(BRIDGE_MEANS), BRIDGE_GAMMA,
                             n_samples=1000, n_final=10_000, rng=seed)
        covered += res.ci[0] <= bridge_value <= res.ci[1]
    assert covered >= 89


def test_rare_event_below_float64_range():
    # P(mean of 4 N(0,1) >= 20 ...) via S = sum/2 ~ N(0,1): P(S >= 40) is
    # about 1e-350, below the smallest float64; the log estimate must hold it.
    # N = 1000 per level, N1 = 10_000, mean-only (exponentially tilted) Normal.
    res = cem.rare_event(lambda x: x.sum(axis=1) / 2, cem.Normal(np.zeros(4), 1.0, fit_std=False), 40.0,
                         n_samples=1000, n_final=10_000, rng=7)
    exact = stats.norm.logsf(40.0)
    assert exact < math.log(np.finfo(np.float64).tiny)
    assert res.reached
    assert abs(res.log_estimate - exact) < 4 * res.rel_error
    assert res.rel_error < 0.2


def test_rare_event_unreachable_gamma_is_reported():
    # S <= 10 always: gamma = 11 can never be reached; the run must end and say so.
    res = cem.rare_event(lambda x: x.sum(axis=1), cem.Bernoulli(np.full(10, 0.5)), 11.0,
                         n_samples=200, max_iter=50, rng=0)
    assert not res.reached
    assert res.nit < 50  # the stall rule, not max_iter, ended it
    assert "not reached" in res.message
    assert res.estimate == 0.0 and res.n_hits == 0
    res = cem.rare_event(lambda x: x.sum(axis=1), cem.Normal(np.zeros(2), 1.0), 1e6,
                         n_samples=100, max_iter=3, rng=0)
    assert not res.reached and res.nit == 3 and "max_iter=3" in res.message


# ---------------------------------------------------------------------------
# Max-cut (de Boer et al. 2005, section 5)
# ---------------------------------------------------------------------------


def cut_value(cost):
    """Vectorised cut: sum over i in V1 (x_i = 1), j in V2 (x_j = 0) of cost[i, j]."""
    def f(x):
        x = x.astype(np.float64)
        return ((x @ cost) * (1.0 - x)).sum(axis=1)

    return f


def random_graph(n, rng, density=0.5):
    w = rng.random((n, n)) * (rng.random((n, n)) < density)
    w = np.triu(w, 1)
    return w + w.T


def planted_cut(n, rng):
    """The tutorial's synthetic instance: U(0, 1) weights inside each half
    (zero diagonal), weight 1 across.

    With m = n/2, moving k nodes of V1 and l of V2 across gives a cut of at
    most (m-k)(m-l) + kl + [(m-k)k + l(m-l)] * max weight inside
    < m^2 - (k-l)^2 <= m^2 unless the cut is the planted one, since the
    inside weights are below 1: the planted cut (value m^2) is the unique
    maximum.
    """
    m = n // 2
    cost = np.ones((n, n))
    for block in (slice(0, m), slice(m, n)):
        z = np.triu(rng.random((m, m)), 1)
        cost[block, block] = z + z.T
    return cost


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maxcut_small_graphs_vs_brute_force(seed):
    # n = 12 nodes: all 2^11 cuts with node 0 in V1 enumerated. N = 300, rho = 0.1.
    rng = np.random.default_rng(seed)
    n = 12
    cost = random_graph(n, rng)
    f = cut_value(cost)
    every = np.array(list(itertools.product((0, 1), repeat=n - 1)))
    every = np.hstack([np.ones((len(every), 1), dtype=int), every])
    optimum = f(every).max()
    p = np.full(n, 0.5)
    p[0] = 1.0  # node 0 stays in V1: the cut and its mirror are one solution
    res = cem.maximize(f, cem.Bernoulli(p), n_samples=300, elite_frac=0.1, rng=seed)
    assert res.fun == pytest.approx(optimum, rel=1e-12)
    assert f(res.x[None])[0] == pytest.approx(res.fun)
    assert res.success


def solve_planted(n, n_samples, min_prob=0.0):
    cost = planted_cut(n, np.random.default_rng(0))
    p = np.full(n, 0.5)
    p[0] = 1.0
    return cem.maximize(cut_value(cost), cem.Bernoulli(p, min_prob=min_prob), n_samples=n_samples, rng=1)


def test_maxcut_planted_n400():
    # The tutorial's instance size: n = 400, N = 1000, rho = 0.1, smoothing 0.7.
    n = 400
    res = solve_planted(n, 1000)
    assert res.fun == pytest.approx((n // 2) ** 2, rel=1e-12)
    assert np.array_equal(res.x, np.r_[np.ones(n // 2), np.zeros(n // 2)])
    # gamma_hat rises to the optimum and the Bernoulli vector degenerates onto it
    assert res.history["gamma"][-1] == pytest.approx((n // 2) ** 2, rel=1e-12)
    assert np.all(np.diff(res.history["best"]) >= 0)
    assert res.success


@pytest.mark.slow
def test_maxcut_planted_n1000_needs_the_floor():
    # n = 1000, N = 1000, rho = 0.1 (about 20 s). Without a floor one node's
    # probability collapses to the wrong side early and the run settles one
    # node short of the optimum; min_prob = 1e-3 keeps it from locking in.
    n = 1000
    assert solve_planted(n, 1000).fun < (n // 2) ** 2 - 1
    res = solve_planted(n, 1000, min_prob=1e-3)
    assert res.fun == pytest.approx((n // 2) ** 2, rel=1e-12)


# ---------------------------------------------------------------------------
# Continuous multi-extremal optimisation, TSP
# ---------------------------------------------------------------------------

SHIFT = np.array([1.3, -0.7, 2.1, 0.4, -1.9])


def rastrigin(x):
    """Shifted Rastrigin: about 11^5 local minima in the start box; the
    global minimum is 0, at x = SHIFT (each term z^2 + 10(1 - cos 2 pi z) >= 0,
    zero only at z = 0)."""
    z = x - SHIFT
    return (z * z + 10.0 * (1.0 - np.cos(2.0 * np.pi * z))).sum(axis=-1)


def test_rastrigin_global_minimum():
    # d = 5, N = 500, rho = 0.1, start N(0, 5^2) per coordinate.
    res = cem.minimize(rastrigin, cem.Normal(np.zeros(5), 5.0), n_samples=500, tol=1e-8, rng=0)
    assert res.fun < 1e-8
    np.testing.assert_allclose(res.x, SHIFT, atol=1e-4)
    assert res.success
    assert res.history["gamma"].shape == (res.nit,)
    assert res.nfev == 500 * res.nit


def test_bimodal_1d_prefers_the_higher_peak():
    # The tutorial's S(x) = exp(-(x-2)^2) + 0.8 exp(-(x+2)^2): start at the lower
    # peak's side; the optimum (by scipy's bounded scalar search on [0, 4])
    # sits near x = 2. N = 100, rho = 0.1.
    def s(x):
        return np.exp(-((x[:, 0] - 2) ** 2)) + 0.8 * np.exp(-((x[:, 0] + 2) ** 2))

    from scipy.optimize import minimize_scalar

    ref = minimize_scalar(lambda t: -s(np.array([[t]]))[0], bounds=(0, 4), method="bounded",
                          options={"xatol": 1e-10})
    res = cem.maximize(s, cem.Normal([-3.0], [10.0]), n_samples=100, tol=1e-9, rng=3)
    assert res.x[0] == pytest.approx(ref.x, abs=1e-4)
    assert res.fun == pytest.approx(-ref.fun, abs=1e-9)


def tour_length(dist):
    def f(tours):
        return dist[tours, np.roll(tours, -1, axis=1)].sum(axis=1)

    return f


def test_tsp_small_vs_enumeration():
    # 9 random cities in the unit square: all 8! tours from city 0 enumerated.
    # N = 1000, rho = 0.05 (the tutorial uses rho = 0.01 with N = 5 n^2 on larger tours).
    rng = np.random.default_rng(11)
    n = 9
    pts = rng.random((n, 2))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    f = tour_length(dist)
    every = np.array([(0, *p) for p in itertools.permutations(range(1, n))])
    optimum = f(every).min()
    res = cem.minimize(f, cem.Permutation(n), n_samples=1000, elite_frac=0.05, rng=0)
    assert res.fun == pytest.approx(optimum, rel=1e-12)
    assert sorted(res.x) == list(range(n)) and res.x[0] == 0
    # The degenerate chain walks the optimal tour (either direction).
    best = res.family.most_likely_tour()
    assert f(best[None])[0] == pytest.approx(optimum, rel=1e-12)


# ---------------------------------------------------------------------------
# Families: sampling, densities, closed-form updates, floors
# ---------------------------------------------------------------------------


def test_normal_family(rng):
    fam = cem.Normal([1.0, -2.0], [0.5, 3.0])
    x = fam.sample(200_000, rng)
    assert x.shape == (200_000, 2)
    np.testing.assert_allclose(x.mean(0), [1.0, -2.0], atol=0.03)
    np.testing.assert_allclose(x.std(0), [0.5, 3.0], rtol=0.01)
    y = rng.standard_normal((7, 2))
    ref = stats.norm.logpdf(y, [1.0, -2.0], [0.5, 3.0]).sum(1)
    np.testing.assert_allclose(fam.log_pdf(y), ref, rtol=1e-13)
    w = rng.random(7)
    fit = fam.fit(y, w)
    mean = np.average(y, axis=0, weights=w)
    np.testing.assert_allclose(fit.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(fit.std, np.sqrt(np.average((y - mean) ** 2, axis=0, weights=w)), rtol=1e-13)
    floored = cem.Normal(0.0, 1.0, min_std=0.1).fit(np.ones((5,)))
    assert floored.std == 0.1


def test_exponential_family(rng):
    fam = cem.Exponential([0.5, 2.0])
    x = fam.sample(200_000, rng)
    np.testing.assert_allclose(x.mean(0), [0.5, 2.0], rtol=0.01)
    y = rng.random((6, 2))
    ref = stats.expon.logpdf(y, scale=[0.5, 2.0]).sum(1)
    np.testing.assert_allclose(fam.log_pdf(y), ref, rtol=1e-13)
    assert fam.log_pdf(np.array([[-1.0, 1.0]]))[0] == -np.inf
    w = rng.random(6)
    np.testing.assert_allclose(fam.fit(y, w).mean, np.average(y, axis=0, weights=w), rtol=1e-13)


def test_bernoulli_family(rng):
    p = np.array([0.0, 0.2, 0.9, 1.0])
    fam = cem.Bernoulli(p)
    x = fam.sample(100_000, rng)
    assert x.dtype == np.intp and set(np.unique(x)) <= {0, 1}
    np.testing.assert_allclose(x.mean(0), p, atol=0.005)
    y = np.array([[0, 1, 1, 1], [1, 0, 0, 1]])
    ref = stats.bernoulli.logpmf(y, p).sum(1)
    np.testing.assert_allclose(fam.log_pdf(y), ref, rtol=1e-13)
    w = np.array([0.25, 0.75])
    np.testing.assert_allclose(fam.fit(y, w).p, [0.75, 0.25, 0.25, 1.0])


def test_bernoulli_floor_does_not_compound():
    fam = cem.Bernoulli(np.full(3, 0.5), min_prob=0.05)
    ones = np.ones((10, 3), dtype=int)
    for _ in range(5):
        fam, _ = fam._smoothed_update(ones, np.full(10, 0.1), 1.0)
    np.testing.assert_allclose(fam.p, 0.95)
    assert fam.spread() == pytest.approx(0.05)


def test_categorical_family(rng):
    probs = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    fam = cem.Categorical(probs)
    x = fam.sample(100_000, rng)
    assert x.shape == (100_000, 2)
    for j in range(2):
        np.testing.assert_allclose(np.bincount(x[:, j], minlength=3) / len(x), probs[j], atol=0.005)
    y = np.array([[0, 0], [2, 0], [1, 1]])
    with np.errstate(divide="ignore"):
        ref = np.log(probs[0][y[:, 0]]) + np.log(probs[1][y[:, 1]])
    np.testing.assert_array_equal(fam.log_pdf(y), ref)
    fit = fam.fit(y, [0.5, 0.25, 0.25])
    np.testing.assert_allclose(fit.probs, [[0.5, 0.25, 0.25], [0.75, 0.25, 0.0]])
    floored = cem.Categorical(probs, min_prob=0.01).fit(y[:1])
    assert floored.probs.min() == pytest.approx(0.01)
    np.testing.assert_allclose(floored.probs.sum(-1), 1.0)


def test_permutation_law_sums_to_one_and_matches_sampling(rng):
    # Sum of exp(log_pdf) over all 4! tours from city 0 of 5 cities is 1, and
    # sampled frequencies follow it (200_000 tours, chi-square at 0.1 %).
    n = 5
    P = rng.random((n, n))
    fam = cem.Permutation(P)
    tours = np.array([(0, *p) for p in itertools.permutations(range(1, n))])
    prob = np.exp(fam.log_pdf(tours))
    assert prob.sum() == pytest.approx(1.0, rel=1e-12)
    # Independent check of one tour's probability by hand: the chain's product.
    t = tours[5]
    Q = P.copy()
    np.fill_diagonal(Q, 0)
    by_hand, left = 1.0, set(range(1, n))
    for a, b in zip(t[:-1], t[1:]):
        by_hand *= Q[a, b] / sum(Q[a, j] for j in left)
        left.remove(b)
    assert prob[5] == pytest.approx(by_hand, rel=1e-12)
    sample = fam.sample(200_000, rng)
    index = {tuple(row): i for i, row in enumerate(tours)}
    counts = np.bincount([index[tuple(row)] for row in sample[:20_000]], minlength=len(tours))
    chi2 = stats.chisquare(counts, prob * counts.sum())
    assert chi2.pvalue > 1e-3
    assert fam.log_pdf(np.array([[0, 1, 1, 2, 3]]))[0] == -np.inf


def test_permutation_update_counts_transitions():
    fam = cem.Permutation(4)
    tours = np.array([[0, 1, 2, 3], [0, 2, 1, 3]])
    fit = fam.fit(tours, [0.75, 0.25])
    expected = np.zeros((4, 4))
    for (tour, w) in ((tours[0], 0.75), (tours[1], 0.25)):
        for a, b in zip(tour, np.roll(tour, -1)):
            expected[a, b] += w
    np.testing.assert_allclose(fit.transition, expected)


# ---------------------------------------------------------------------------
# Behaviour: reproducibility, per-sample objectives, NaN, callbacks, progress
# ---------------------------------------------------------------------------


def sphere(x):
    return (x * x).sum(axis=1)


def test_reproducible_from_seed_and_generator():
    fam = cem.Normal(np.ones(3), 2.0)
    a = cem.minimize(sphere, fam, n_samples=50, max_iter=20, rng=123)
    b = cem.minimize(sphere, fam, n_samples=50, max_iter=20, rng=np.random.default_rng(123))
    assert a.fun == b.fun
    np.testing.assert_array_equal(a.history["gamma"], b.history["gamma"])
    c = cem.minimize(sphere, fam, n_samples=50, max_iter=20, rng=124)
    assert c.fun != a.fun


def test_per_sample_objective_equals_vectorised():
    fam = cem.Normal(np.ones(3), 2.0)
    a = cem.minimize(sphere, fam, n_samples=50, max_iter=10, rng=5)
    b = cem.minimize(lambda x: float(np.dot(x, x)), fam, n_samples=50, max_iter=10, rng=5, vectorized=False)
    np.testing.assert_allclose(a.history["gamma"], b.history["gamma"], rtol=1e-14)


def test_nan_scores_count_as_worst():
    # Half the plane returns NaN; the minimum of x^2 over x >= 0.5 is at 0.5.
    def f(x):
        return np.where(x[:, 0] < 0.5, np.nan, x[:, 0] ** 2)

    res = cem.minimize(f, cem.Normal([3.0], [2.0]), n_samples=200, rng=0)
    assert res.x[0] == pytest.approx(0.5, abs=1e-3)
    assert not np.isnan(res.fun)


def test_callback_stops_and_sees_state():
    seen = []

    def cb(state):
        seen.append((state.iteration, state.gamma, state.best, state.nfev, state.param_change))
        return state.iteration == 3

    res = cem.minimize(sphere, cem.Normal(np.ones(2), 1.0), n_samples=40, rng=0, callback=cb)
    assert res.stop_reason == "callback" and res.nit == 3 and not res.success
    assert [s[0] for s in seen] == [1, 2, 3]
    assert seen[-1][3] == 120
    np.testing.assert_array_equal([s[1] for s in seen], res.history["gamma"])
    np.testing.assert_array_equal([s[4] for s in seen], res.history["param_change"])


def test_max_iter_and_injection():
    # Injection keeps the variance up while gamma moves: the spread after 15
    # iterations is larger than without it (N = 100).
    fam = cem.Normal(np.full(4, 5.0), 1.0)
    plain = cem.minimize(sphere, fam, n_samples=100, max_iter=15, rng=0)
    injected = cem.minimize(sphere, fam, n_samples=100, max_iter=15, rng=0, injection=0.5)
    assert plain.stop_reason == "max_iter" and "max_iter=15" in plain.message
    assert injected.family.spread() > plain.family.spread()
    with pytest.raises(ValueError, match="injection"):
        cem.minimize(sphere, cem.Bernoulli([0.5]), injection=0.1)


def test_maximize_and_minimize_agree():
    fam = cem.Normal(np.ones(2), 1.0)
    lo = cem.minimize(sphere, fam, n_samples=60, max_iter=10, rng=9)
    hi = cem.maximize(lambda x: -sphere(x), fam, n_samples=60, max_iter=10, rng=9)
    assert hi.fun == -lo.fun
    np.testing.assert_array_equal(hi.history["gamma"], -lo.history["gamma"])


def test_progress_with_tqdm(capsys):
    pytest.importorskip("tqdm")
    cem.minimize(sphere, cem.Normal(np.ones(2), 1.0), n_samples=40, max_iter=3, rng=0, progress=True)
    err = capsys.readouterr().err
    assert "cem.minimize" in err and "gamma=" in err and "best=" in err


def test_progress_without_tqdm(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    cem.rare_event(bridge_length, cem.Exponential(BRIDGE_MEANS), 1.0, n_samples=200, rng=0, progress=True)
    err = capsys.readouterr().err
    assert "cem.rare_event: iteration 1/100" in err and "gamma=" in err and err.endswith("\n")


def load_example(name):
    """Import examples/<name>.py (which imports its sibling examples/_figures.py)."""
    import importlib.util
    import pathlib
    import sys

    folder = pathlib.Path(__file__).resolve().parents[1] / "examples"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, args, expect", [
    ("cem_rare_event", ["--n-final", "20000"], "inside the CI: True"),
    ("cem_maxcut", ["--n", "100", "--n-samples", "300"], "planted cut found: True"),
])
def test_examples_run_and_plot(name, args, expect, tmp_path, capsys):
    png = tmp_path / "plot.png"
    load_example(name).main(args + ["--plot", str(png)])
    out = capsys.readouterr().out
    assert expect in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in out
    else:
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_submodule_import():
    import fastxent
    from fastxent import cem as again

    assert again is cem and fastxent.cem is cem


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(elite_frac=0.0), "elite_frac"),
        (dict(elite_frac=1.0), "elite_frac"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(smoothing=1.5), "smoothing"),
        (dict(n_samples=5), r"n_samples=5 .*at least 10"),
        (dict(n_samples=0), "n_samples"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(callback=3), "callback"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cem.minimize(sphere, cem.Normal(np.zeros(2), 1.0), **kwargs)


def test_bad_objectives():
    fam = cem.Normal(np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="f must be callable"):
        cem.minimize(42, fam)
    with pytest.raises(ValueError, match=r"f must return .*shape \(100,\), got shape \(100, 2\)"):
        cem.minimize(lambda x: x, fam)
    with pytest.raises(ValueError, match="vectorized=False"):
        cem.minimize(lambda x: 1.0, fam)
    with pytest.raises(ValueError, match="NaN for every one of the 100 samples"):
        cem.minimize(lambda x: np.full(len(x), np.nan), fam)
    with pytest.raises(ValueError, match="real numbers"):
        cem.minimize(lambda x: ["a"] * len(x), fam)
    with pytest.raises(ValueError, match="family must be"):
        cem.minimize(sphere, "normal")
    with pytest.raises(ValueError, match="S must be callable"):
        cem.rare_event(None, fam, 1.0)
    with pytest.raises(ValueError, match="gamma must be a finite"):
        cem.rare_event(sphere, fam, math.inf)
    with pytest.raises(ValueError, match="rho"):
        cem.rare_event(sphere, fam, 1.0, rho=1.0)
    with pytest.raises(ValueError, match=r"n_samples=9 with rho=0.1"):
        cem.rare_event(sphere, fam, 1.0, n_samples=9)


def test_bad_family_parameters():
    with pytest.raises(ValueError, match="std"):
        cem.Normal(0.0, -1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        cem.Normal(np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match="mean must be > 0"):
        cem.Exponential([1.0, 0.0])
    with pytest.raises(ValueError, match="p must lie"):
        cem.Bernoulli([1.5])
    with pytest.raises(ValueError, match="min_prob"):
        cem.Bernoulli([0.5], min_prob=0.5)
    with pytest.raises(ValueError, match="min_prob"):
        cem.Categorical([[0.5, 0.25, 0.25]], min_prob=0.4)
    with pytest.raises(ValueError, match="square"):
        cem.Permutation(np.ones((2, 3)))
    with pytest.raises(ValueError, match="n >= 2"):
        cem.Permutation(1)
    with pytest.raises(ValueError, match="finite"):
        cem.Normal([np.nan], [1.0])
