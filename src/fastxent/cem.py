"""The cross-entropy method: rare-event estimation and optimisation.

The cross-entropy (CE) method of Rubinstein (de Boer, Kroese, Mannor and
Rubinstein, "A Tutorial on the Cross-Entropy Method", Annals of Operations
Research 134, 2005) draws a sample from a parametric family, keeps the elite
fraction of it (the samples scoring at or beyond the level gamma_hat), and
refits the family to the elite by maximum likelihood, which is the update
that minimises the cross entropy (Kullback-Leibler divergence) between the
elite's distribution and the family.  Repeated, the family concentrates on
the region of high scores:

* :func:`maximize` / :func:`minimize` use that to optimise a score over the
  family's sample space (continuous, binary, categorical or tours);
* :func:`rare_event` estimates ``P(S(X) >= gamma)`` for a rare level gamma by
  raising the level step by step, weighting the elite by likelihood ratios
  against the nominal parameters, then running importance sampling with the
  tilted parameters.

Everything is plain NumPy and vectorised over the sample: the objective gets
a batch ``X`` of shape ``(n_samples, *family.shape)`` and returns
``n_samples`` scores (``vectorized=False`` takes a per-sample callable).
Runs are reproducible from ``rng``: a seed or a ``numpy.random.Generator``.

The families and their closed-form CE updates (weights ``w`` sum to 1):

=============  ===================================  ==========================
family         sample                               update
=============  ===================================  ==========================
Normal         ``mean + std * z``                   weighted mean and std
Exponential    ``mean * e``                         weighted mean
Bernoulli      ``u < p``                            weighted frequency of 1
Categorical    inverse CDF per coordinate           weighted class frequencies
Permutation    Markov chain over unvisited cities   weighted transition counts
=============  ===================================  ==========================
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ._api import logsumexp

__all__ = [
    "Family",
    "Normal",
    "Exponential",
    "Bernoulli",
    "Categorical",
    "Permutation",
    "CEMState",
    "CEMResult",
    "RareEventResult",
    "minimize",
    "maximize",
    "rare_event",
]


# ---------------------------------------------------------------------------
# Sampling families
# ---------------------------------------------------------------------------


def _float_array(value, name):
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of real numbers, got {value!r}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr


def _check_floor(value, name, upper):
    if not isinstance(value, numbers.Real) or not (0.0 <= value < upper):
        raise ValueError(f"{name} must be a number in [0, {upper:.6g}), got {value!r}")
    return float(value)


class Family:
    """A parametric sampling distribution with a closed-form CE update.

    Subclasses hold their parameters as float64 arrays (see :attr:`params`)
    and are immutable: an update returns a new instance.  ``shape`` is the
    shape of one sample; a batch has shape ``(n, *shape)``.
    """

    shape: tuple = ()

    @property
    def params(self) -> dict:
        """The parameters, by name (copies)."""
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """The number of free parameters (sets the default sample size)."""
        return int(sum(np.size(v) for v in self.params.values()))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent samples, shape ``(n, *shape)``."""
        raise NotImplementedError

    def log_pdf(self, x) -> np.ndarray:
        """Log density (or log probability) of each sample of the batch ``x``."""
        raise NotImplementedError

    def fit(self, x, weights=None) -> "Family":
        """The weighted maximum-likelihood fit to the batch ``x``.

        ``weights`` (one per sample, default equal) are normalised to sum to
        1.  Floors (``min_std``, ``min_prob``) of this family carry over.
        """
        x = np.asarray(x)
        if weights is None:
            weights = np.full(x.shape[0], 1.0 / x.shape[0])
        else:
            weights = np.asarray(weights, dtype=np.float64)
            weights = weights / weights.sum()
        return self._with(self._mle(x, weights))

    def spread(self) -> float:
        """How far the distribution is from a point mass (0 when it is one)."""
        raise NotImplementedError

    # -- used by the algorithms ------------------------------------------

    def _mle(self, x, weights) -> dict:
        raise NotImplementedError

    def _assign(self, params: dict) -> None:
        """Store ``params``, applying this family's floor."""
        raise NotImplementedError

    def _raw_params(self) -> dict:
        """The parameters before the floor (what smoothing averages)."""
        return self.params

    def _with(self, params: dict) -> "Family":
        new = copy.copy(self)
        new._assign(params)
        return new

    def _inject(self, amount: float) -> "Family":
        raise NotImplementedError

    def _smoothed_update(self, x, weights, smoothing):
        """``smoothing * mle + (1 - smoothing) * current``, floored, and the
        largest absolute change of a parameter.  Smoothing works on the
        unfloored parameters so that a floor does not compound."""
        old = self._raw_params()
        fitted = self._mle(x, weights)
        family = self._with({k: smoothing * fitted[k] + (1.0 - smoothing) * old[k] for k in old})
        return family, _param_change(self, family)

    def __repr__(self):
        def short(v):
            v = np.asarray(v)
            if v.size <= 6:
                return np.array2string(v, precision=4, separator=", ")
            return f"<array {v.shape}>"

        args = ", ".join(f"{k}={short(v)}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def _mix_uniform(p, floor, k):
    """``p`` mixed with the uniform law on ``k`` values so every entry is >= ``floor``."""
    return floor + (1.0 - k * floor) * p if floor else p


def _unmix_uniform(p, floor, k):
    return (p - floor) / (1.0 - k * floor) if floor else p


def _per_sample_sum(terms):
    """Sum of per-coordinate terms, one total per sample of the batch."""
    return terms.reshape(terms.shape[0], -1).sum(axis=1)


def _weighted_sum(w, x):
    """``sum_i w_i x_i`` over the batch axis of ``x``."""
    return np.tensordot(w, x, axes=(0, 0))


def _param_change(old: Family, new: Family) -> float:
    a, b = old.params, new.params
    return float(max(np.max(np.abs(b[k] - a[k]), initial=0.0) for k in a))


class Normal(Family):
    """Independent normal coordinates ``N(mean, std**2)``.

    ``mean`` and ``std`` broadcast to the sample shape.  ``min_std`` is a
    floor on every standard deviation after each update, which keeps the
    search from collapsing before the elite has settled (0 lets the
    distribution degenerate, the usual stopping rule of the CE method).
    ``fit_std=False`` keeps ``std`` fixed and updates only the mean: for
    rare-event estimation far in a tail that is the exponential tilt, whose
    importance weights stay well behaved where a fitted, shrinking std makes
    them heavy-tailed.
    """

    def __init__(self, mean, std, *, min_std: float = 0.0, fit_std: bool = True):
        mean = _float_array(mean, "mean")
        std = _float_array(std, "std")
        try:
            mean, std = np.broadcast_arrays(mean, std)
        except ValueError as exc:
            raise ValueError(f"mean of shape {mean.shape} and std of shape {std.shape} do not broadcast") from exc
        if np.any(std < 0):
            raise ValueError(f"std must be >= 0, got {std!r}")
        if not isinstance(min_std, numbers.Real) or not (0.0 <= min_std < math.inf):
            raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}")
        self.min_std = float(min_std)
        self.fit_std = bool(fit_std)
        self.shape = mean.shape
        self._assign({"mean": mean, "std": std})

    def _assign(self, params):
        self.mean = np.array(params["mean"], dtype=np.float64)
        self.std = np.maximum(params["std"], self.min_std)

    @property
    def params(self):
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    def sample(self, n, rng):
        return self.mean + self.std * rng.standard_normal((n, *self.shape))

    def log_pdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (x - self.mean) / self.std
            terms = -0.5 * z * z - np.log(self.std) - 0.5 * math.log(2.0 * math.pi)
        return _per_sample_sum(terms)

    def spread(self):
        return float(np.max(self.std, initial=0.0))

    def _mle(self, x, w):
        x = np.asarray(x, dtype=np.float64)
        mean = _weighted_sum(w, x)
        if not self.fit_std:
            return {"mean": mean, "std": self.std}
        var = _weighted_sum(w, (x - mean) ** 2)
        return {"mean": mean, "std": np.sqrt(var)}

    def _inject(self, amount):
        return self._with({"mean": self.mean, "std": np.sqrt(self.std**2 + amount)})


class Exponential(Family):
    """Independent exponential coordinates of the given ``mean`` (> 0)."""

    def __init__(self, mean):
        mean = _float_array(mean, "mean")
        if np.any(mean <= 0):
            raise ValueError(f"mean must be > 0, got {mean!r}")
        self.shape = mean.shape
        self._assign({"mean": mean})

    def _assign(self, params):
        self.mean = np.array(params["mean"], dtype=np.float64)

    @property
    def params(self):
        return {"mean": self.mean.copy()}

    def sample(self, n, rng):
        return self.mean * rng.standard_exponential((n, *self.shape))

    def log_pdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        terms = np.where(x >= 0, -x / self.mean - np.log(self.mean), -np.inf)
        return _per_sample_sum(terms)

    def spread(self):
        return float(np.max(self.mean, initial=0.0))

    def _mle(self, x, w):
        # A mean of exactly 0 (all elite samples 0) is not a distribution.
        return {"mean": np.maximum(_weighted_sum(w, np.asarray(x, dtype=np.float64)), np.finfo(np.float64).tiny)}



class Bernoulli(Family):
    """Independent 0/1 coordinates, 1 with probability ``p``.

    Samples are ``numpy.intp`` arrays of 0 and 1.  ``min_prob`` keeps every
    probability in ``[min_prob, 1 - min_prob]`` after each update (the
    update mixes ``p`` with 1/2: ``min_prob + (1 - 2 min_prob) p``).
    """

    def __init__(self, p, *, min_prob: float = 0.0):
        p = _float_array(p, "p")
        if np.any((p < 0) | (p > 1)):
            raise ValueError(f"p must lie in [0, 1], got {p!r}")
        self.min_prob = _check_floor(min_prob, "min_prob", 0.5)
        self.shape = p.shape
        self._assign({"p": p})

    def _assign(self, params):
        self.p = _mix_uniform(np.array(params["p"], dtype=np.float64), self.min_prob, 2)

    def _raw_params(self):
        return {"p": _unmix_uniform(self.p, self.min_prob, 2)}

    @property
    def params(self):
        return {"p": self.p.copy()}

    def sample(self, n, rng):
        return (rng.random((n, *self.shape)) < self.p).astype(np.intp)

    def log_pdf(self, x):
        x = np.asarray(x)
        with np.errstate(divide="ignore"):
            terms = np.log(np.where(x == 1, self.p, 1.0 - self.p))
        return _per_sample_sum(terms)

    def spread(self):
        return float(np.max(np.minimum(self.p, 1.0 - self.p), initial=0.0))

    def _mle(self, x, w):
        return {"p": np.clip(_weighted_sum(w, np.asarray(x) == 1), 0.0, 1.0)}


class Categorical(Family):
    """Independent categorical coordinates with class probabilities ``probs``.

    ``probs`` has shape ``(*shape, k)``: each coordinate takes a value in
    ``0 .. k-1``; rows are normalised to sum to 1.  ``min_prob`` (below
    ``1/k``) floors every class probability after each update by mixing in
    the uniform distribution.
    """

    def __init__(self, probs, *, min_prob: float = 0.0):
        probs = _float_array(probs, "probs")
        if probs.ndim < 1 or probs.shape[-1] < 1:
            raise ValueError(f"probs must have a class axis of length >= 1, got shape {probs.shape}")
        if np.any(probs < 0):
            raise ValueError(f"probs must be >= 0, got {probs!r}")
        total = probs.sum(axis=-1, keepdims=True)
        if np.any(total <= 0):
            raise ValueError("probs: every coordinate needs a positive total probability")
        k = probs.shape[-1]
        self.min_prob = _check_floor(min_prob, "min_prob", 1.0 / k)
        self.k = k
        self.shape = probs.shape[:-1]
        self._assign({"probs": probs / total})

    def _assign(self, params):
        self.probs = _mix_uniform(np.array(params["probs"], dtype=np.float64), self.min_prob, self.k)

    def _raw_params(self):
        return {"probs": _unmix_uniform(self.probs, self.min_prob, self.k)}

    @property
    def params(self):
        return {"probs": self.probs.copy()}

    def sample(self, n, rng):
        cdf = np.cumsum(self.probs, axis=-1)
        cdf /= cdf[..., -1:]  # exactly 1 at the end, so u < 1 always lands
        u = rng.random((n, *self.shape, 1))
        return np.sum(u >= cdf, axis=-1).astype(np.intp)

    def log_pdf(self, x):
        x = np.asarray(x)
        inside = (x >= 0) & (x < self.k)
        idx = np.where(inside, x, 0).astype(np.intp)
        p = np.take_along_axis(np.broadcast_to(self.probs, x.shape + (self.k,)), idx[..., None], axis=-1)[..., 0]
        with np.errstate(divide="ignore"):
            terms = np.where(inside, np.log(p), -np.inf)
        return _per_sample_sum(terms)

    def spread(self):
        return float(np.max(1.0 - self.probs.max(axis=-1), initial=0.0))

    def _mle(self, x, w):
        x = np.asarray(x)
        onehot = x[..., None] == np.arange(self.k)
        return {"probs": _weighted_sum(w, onehot)}


class Permutation(Family):
    """Tours of ``n`` cities drawn from a Markov chain (the CE method's TSP family).

    ``transition`` is an ``(n, n)`` matrix; row ``i`` gives the probabilities
    of going from city ``i`` to each other city (the diagonal is ignored), or
    pass ``n`` for the uniform chain.  A tour starts at ``start`` and moves to
    an unvisited city with probability proportional to its transition entry
    (the entries of visited cities are zeroed and the row renormalised; a row
    with no mass left on unvisited cities falls back to the uniform choice).
    Samples are ``(n_samples, n)`` arrays of city indices.  The CE update
    counts weighted transitions ``i -> j`` of the elite tours, including the
    closing one back to ``start`` (de Boer et al. 2005, section 4).
    ``min_prob`` (below ``1/(n-1)``) floors every off-diagonal entry.
    """

    n: int
    start: int

    def __init__(self, transition, *, start: int = 0, min_prob: float = 0.0):
        if isinstance(transition, numbers.Integral):
            n = int(transition)
            if n < 2:
                raise ValueError(f"transition: a tour needs n >= 2 cities, got {n}")
            transition = np.ones((n, n))
        P = _float_array(transition, "transition")
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
            raise ValueError(f"transition must be a square matrix of size >= 2, got shape {P.shape}")
        n = P.shape[0]
        if np.any(P < 0):
            raise ValueError("transition must be >= 0")
        P = P.copy()
        np.fill_diagonal(P, 0.0)
        rows = P.sum(axis=1, keepdims=True)
        if np.any(rows <= 0):
            raise ValueError("transition: every row needs a positive off-diagonal entry")
        if not isinstance(start, numbers.Integral) or not 0 <= start < n:
            raise ValueError(f"start must be a city index in [0, {n}), got {start!r}")
        self.n = n
        self.start = int(start)
        self.min_prob = _check_floor(min_prob, "min_prob", 1.0 / (n - 1))
        self.shape = (n,)
        self._assign({"transition": P / rows})

    def _assign(self, params):
        off = 1.0 - np.eye(self.n)  # the floor must not put mass on the diagonal
        P = np.array(params["transition"], dtype=np.float64)
        self.transition = off * _mix_uniform(P, self.min_prob, self.n - 1)

    def _raw_params(self):
        off = 1.0 - np.eye(self.n)
        return {"transition": off * _unmix_uniform(self.transition, self.min_prob, self.n - 1)}

    @property
    def params(self):
        return {"transition": self.transition.copy()}

    @property
    def n_params(self):
        return self.n * (self.n - 1)

    def _steps(self, m, choose):
        """Walk ``m`` tours; ``choose(step, weights, total)`` picks each next city."""
        rows = np.arange(m)
        visited = np.zeros((m, self.n), dtype=np.bool_)
        visited[:, self.start] = True
        cur = np.full(m, self.start, dtype=np.intp)
        for step in range(1, self.n):
            w = self.transition[cur] * ~visited
            total = w.sum(axis=1)
            empty = total <= 0
            if np.any(empty):
                w[empty] = ~visited[empty]
                total[empty] = w[empty].sum(axis=1)
            nxt = choose(step, w, total)
            visited[rows, nxt] = True
            cur = nxt

    def sample(self, n, rng):
        tours = np.empty((n, self.n), dtype=np.intp)
        tours[:, 0] = self.start

        def choose(step, w, total):
            cdf = np.cumsum(w, axis=1)
            u = rng.random(len(total)) * total
            nxt = np.sum(cdf <= u[:, None], axis=1)
            # u can round up to total; the last city with mass is then the pick.
            last = self.n - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
            nxt = np.minimum(nxt, last)
            tours[:, step] = nxt
            return nxt

        self._steps(n, choose)
        return tours

    def log_pdf(self, x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"x must be a batch of tours of shape (m, {self.n}), got shape {x.shape}")
        m = x.shape[0]
        out = np.zeros(m)
        rows = np.arange(m)
        # A batch entry that is not a tour from `start` has probability 0; it
        # walks a placeholder tour so the batch stays vectorised.
        valid = (x[:, 0] == self.start) & np.all(np.sort(x, axis=1) == np.arange(self.n), axis=1)
        safe = np.array(x, dtype=np.intp)
        safe[~valid] = np.roll(np.arange(self.n), -self.start)

        def choose(step, w, total):
            nxt = safe[:, step]
            with np.errstate(divide="ignore"):
                out[:] += np.log(w[rows, nxt] / total)
            return nxt

        self._steps(m, choose)
        return np.where(valid, out, -np.inf)

    def spread(self):
        return float(np.max(1.0 - self.transition.max(axis=1)))

    def _mle(self, x, w):
        x = np.asarray(x, dtype=np.intp)
        src = x.reshape(-1)
        dst = np.roll(x, -1, axis=1).reshape(-1)
        counts = np.bincount(src * self.n + dst, weights=np.repeat(w, self.n), minlength=self.n * self.n)
        return {"transition": counts.reshape(self.n, self.n)}

    def most_likely_tour(self) -> np.ndarray:
        """The tour that always moves to the most probable unvisited city."""
        tour = [self.start]
        visited = np.zeros(self.n, dtype=np.bool_)
        visited[self.start] = True
        for _ in range(1, self.n):
            row = np.where(visited, -1.0, self.transition[tour[-1]])
            tour.append(int(np.argmax(row)))
            visited[tour[-1]] = True
        return np.array(tour, dtype=np.intp)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class CEMState:
    """What a callback sees after each iteration; a truthy return stops the run."""

    iteration: int
    gamma: float  # this iteration's level (worst elite score)
    best: float  # best score so far (rare_event: best of this iteration)
    x: Any  # best point so far (rare_event: None)
    family: Family  # the updated sampling distribution
    param_change: float  # largest absolute change of a parameter in this update
    nfev: int  # objective evaluations so far


class _FamilyParams:
    family: Family

    @property
    def params(self) -> dict:
        """The parameters of the final sampling distribution (for
        :func:`rare_event`, the tilted importance-sampling parameters)."""
        return self.family.params


@dataclass
class CEMResult(_FamilyParams):
    """The outcome of :func:`minimize` or :func:`maximize`.

    ``history`` holds one entry per iteration: ``gamma`` (the level
    gamma_hat, i.e. the worst elite score), ``best`` (best score so far),
    ``iteration_best`` (best score of that iteration's sample) and
    ``param_change`` (largest absolute change of a parameter).
    ``stop_reason`` is ``"degenerate"`` (the distribution's spread fell to
    ``tol``), ``"stalled"`` (gamma_hat stayed within ``tol`` for
    ``patience`` iterations), ``"max_iter"`` or ``"callback"``.
    """

    x: Any
    fun: float
    family: Family
    nit: int
    nfev: int
    stop_reason: str
    message: str
    history: dict = field(repr=False)

    @property
    def success(self) -> bool:
        """True when the run converged (degenerate or stalled)."""
        return self.stop_reason in ("degenerate", "stalled")


@dataclass
class RareEventResult(_FamilyParams):
    """The outcome of :func:`rare_event`.

    ``estimate`` is the importance-sampling estimate of ``P(S(X) >= gamma)``
    from ``n_final`` samples of the tilted ``family``; ``rel_error`` its
    estimated relative error (standard error / estimate) and ``ci`` the
    normal-approximation interval at ``confidence``.  ``levels`` are the
    levels gamma_hat_t of the multilevel procedure; ``reached`` is False
    when they never reached gamma (then the estimate comes from the last
    tilted family and is typically far less accurate: see ``message``).
    """

    estimate: float
    log_estimate: float
    rel_error: float
    ci: tuple
    confidence: float
    family: Family
    levels: np.ndarray
    reached: bool
    message: str
    n_hits: int
    nit: int
    nfev: int
    history: dict = field(repr=False)


# ---------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------


class _Progress:
    """A progress bar (tqdm when installed, one rewritten line otherwise)."""

    def __init__(self, enabled, total, desc):
        self.enabled = enabled
        self.total = total
        self.desc = desc
        self.bar = None
        self.wrote = False
        if enabled:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=True)

    def update(self, iteration, gamma, best):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(gamma=f"{gamma:.6g}", best=f"{best:.6g}", refresh=False)
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r{self.desc}: iteration {iteration}/{self.total}  "
                             f"gamma={gamma:.6g}  best={best:.6g}   ")
            sys.stderr.flush()
            self.wrote = True

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.wrote:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check_callable(f, name):
    if not callable(f):
        raise ValueError(f"{name} must be callable, got {f!r}")


def _check_family(family):
    if not isinstance(family, Family):
        raise ValueError(f"family must be a fastxent.cem.Family (Normal, Exponential, Bernoulli, "
                         f"Categorical, Permutation), got {family!r}")


def _check_fraction(value, name, *, closed_right=False):
    ok = isinstance(value, numbers.Real) and 0.0 < value and (value <= 1.0 if closed_right else value < 1.0)
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _n_elite(n_samples, frac, n_name, frac_name):
    # floor(frac * n), forgiving the rounding of e.g. 0.1 * 30 = 3.0000000000000004.
    k = int(math.floor(frac * n_samples + 1e-9))
    if k < 1:
        need = math.ceil(1.0 / frac - 1e-9)
        raise ValueError(f"{n_name}={n_samples} with {frac_name}={frac} leaves no elite sample; "
                         f"{n_name} must be at least {need}")
    return k


def _evaluate(f, x, vectorized, name):
    n = x.shape[0]
    if vectorized:
        raw = f(x)
    else:
        raw = [f(xi) for xi in x]
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must return real numbers, got {type(raw).__name__}") from exc
    if scores.shape != (n,):
        how = "a batch of" if vectorized else "one score per sample:"
        raise ValueError(f"{name} must return {how} {n} scores of shape ({n},), got shape {scores.shape}"
                         + ("; pass vectorized=False for a per-sample function" if vectorized else ""))
    nan = np.isnan(scores)
    if nan.all():
        raise ValueError(f"{name} returned NaN for every one of the {n} samples")
    return scores, nan


def _n_samples_default(family, n_samples):
    if n_samples is None:
        return max(100, 5 * family.n_params)
    return _check_int(n_samples, "n_samples", 1)


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------


def maximize(f: Callable, family: Family, *, n_samples: Optional[int] = None, elite_frac: float = 0.1,
             smoothing: float = 0.7, max_iter: int = 200, tol: float = 1e-6, patience: int = 5,
             injection: float = 0.0, vectorized: bool = True, rng=None,
             callback: Optional[Callable[[CEMState], Any]] = None, progress: bool = False) -> CEMResult:
    """Maximise ``f`` over the sample space of ``family`` by the CE method.

    Each iteration draws ``n_samples`` points from the current family,
    scores them, takes the level gamma_hat as the ``floor(elite_frac *
    n_samples)``-th best score, fits the family by maximum likelihood to the
    samples scoring at least gamma_hat (ties included), and moves the
    parameters to ``smoothing * fit + (1 - smoothing) * current``.

    Parameters
    ----------
    f : callable
        ``f(X) -> scores``: ``X`` of shape ``(n_samples, *family.shape)``,
        scores of shape ``(n_samples,)``; with ``vectorized=False``,
        ``f(x) -> float`` for one sample.  A NaN score counts as the worst.
    family : Family
        The initial sampling distribution (:class:`Normal`,
        :class:`Exponential`, :class:`Bernoulli`, :class:`Categorical`,
        :class:`Permutation`).
    n_samples : int, optional
        Sample size per iteration; default ``max(100, 5 * family.n_params)``.
    elite_frac : float in (0, 1)
        Fraction rho of the sample kept as the elite.
    smoothing : float in (0, 1]
        Weight of the new fit (1: no smoothing).
    max_iter : int
        Most iterations.
    tol : float
        Stop when the family's spread (largest std; largest probability
        left off the most likely value) is at most ``tol``, or when
        gamma_hat changes by at most ``tol * max(1, |gamma_hat|)`` for
        ``patience`` iterations in a row.
    injection : float >= 0
        :class:`Normal` only: after each update add ``injection *
        |gamma_hat_t - gamma_hat_(t-1)|`` to every variance, an injection
        of extra variance after Botev and Kroese (2004) scaled by how far
        the level moved: it keeps the search wide while the level still
        moves and fades as it settles.
    rng : None, int or numpy.random.Generator
        Seed or generator; equal seeds give equal runs.
    callback : callable, optional
        ``callback(state: CEMState)`` after each iteration; a truthy
        return value stops the run.
    progress : bool
        Show a progress bar (tqdm when installed, a plain line otherwise).
    """
    return _optimize(f, family, 1.0, n_samples=n_samples, elite_frac=elite_frac, smoothing=smoothing,
                     max_iter=max_iter, tol=tol, patience=patience, injection=injection,
                     vectorized=vectorized, rng=rng, callback=callback, progress=progress)


def minimize(f: Callable, family: Family, *, n_samples: Optional[int] = None, elite_frac: float = 0.1,
             smoothing: float = 0.7, max_iter: int = 200, tol: float = 1e-6, patience: int = 5,
             injection: float = 0.0, vectorized: bool = True, rng=None,
             callback: Optional[Callable[[CEMState], Any]] = None, progress: bool = False) -> CEMResult:
    """Minimise ``f`` over the sample space of ``family`` by the CE method.

    The same as :func:`maximize` with the order reversed: the elite are the
    lowest scores, gamma_hat is the highest score among them, and ``best``
    and ``fun`` are minima.  See :func:`maximize` for the parameters.
    """
    return _optimize(f, family, -1.0, n_samples=n_samples, elite_frac=elite_frac, smoothing=smoothing,
                     max_iter=max_iter, tol=tol, patience=patience, injection=injection,
                     vectorized=vectorized, rng=rng, callback=callback, progress=progress)


def _optimize(f, family, sign, *, n_samples, elite_frac, smoothing, max_iter, tol, patience, injection,
              vectorized, rng, callback, progress):
    _check_callable(f, "f")
    _check_family(family)
    elite_frac = _check_fraction(elite_frac, "elite_frac")
    smoothing = _check_fraction(smoothing, "smoothing", closed_right=True)
    n_samples = _n_samples_default(family, n_samples)
    n_elite = _n_elite(n_samples, elite_frac, "n_samples", "elite_frac")
    max_iter = _check_int(max_iter, "max_iter", 1)
    patience = _check_int(patience, "patience", 1)
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not isinstance(injection, numbers.Real) or not 0 <= injection < math.inf:
        raise ValueError(f"injection must be a finite number >= 0, got {injection!r}")
    if injection and not isinstance(family, Normal):
        raise ValueError(f"injection applies to the Normal family only, got injection={injection!r} "
                         f"with {type(family).__name__}")
    if callback is not None:
        _check_callable(callback, "callback")
    gen = np.random.default_rng(rng)

    best_x, best_s = None, -math.inf
    hist = {"gamma": [], "best": [], "iteration_best": [], "param_change": []}
    prev_gamma = None
    still = 0
    stop_reason = "max_iter"
    nfev = 0
    bar = _Progress(progress, max_iter, "cem." + ("maximize" if sign > 0 else "minimize"))
    try:
        for it in range(1, max_iter + 1):
            x = family.sample(n_samples, gen)
            raw, nan = _evaluate(f, x, vectorized, "f")
            nfev += n_samples
            s = np.where(nan, -math.inf, sign * raw)
            gamma = float(np.partition(s, n_samples - n_elite)[n_samples - n_elite])
            elite = s >= gamma
            i = int(np.argmax(s))
            if s[i] > best_s or best_x is None:
                best_s, best_x = float(s[i]), x[i].copy()
            weights = np.full(int(elite.sum()), 1.0 / elite.sum())
            new, change = family._smoothed_update(x[elite], weights, smoothing)
            if injection and prev_gamma is not None:
                new = new._inject(injection * abs(gamma - prev_gamma))
                change = _param_change(family, new)
            family = new

            hist["gamma"].append(sign * gamma)
            hist["best"].append(sign * best_s)
            hist["iteration_best"].append(sign * float(s[i]))
            hist["param_change"].append(change)
            bar.update(it, sign * gamma, sign * best_s)

            if prev_gamma is not None and abs(gamma - prev_gamma) <= tol * max(1.0, abs(gamma)):
                still += 1
            else:
                still = 0
            prev_gamma = gamma
            if callback is not None and callback(CEMState(it, sign * gamma, sign * best_s, best_x,
                                                          family, change, nfev)):
                stop_reason = "callback"
                break
            if family.spread() <= tol:
                stop_reason = "degenerate"
                break
            if still >= patience:
                stop_reason = "stalled"
                break
    finally:
        bar.close()

    messages = {
        "degenerate": f"the sampling distribution degenerated (spread <= tol={tol:g})",
        "stalled": f"gamma_hat changed by at most tol={tol:g} (relative) for {patience} iterations",
        "max_iter": f"max_iter={max_iter} iterations reached without convergence",
        "callback": "stopped by the callback",
    }
    return CEMResult(
        x=best_x,
        fun=sign * best_s,
        family=family,
        nit=it,
        nfev=nfev,
        stop_reason=stop_reason,
        message=messages[stop_reason],
        history={k: np.asarray(v) for k, v in hist.items()},
    )


# ---------------------------------------------------------------------------
# Rare-event estimation
# ---------------------------------------------------------------------------


def rare_event(S: Callable, family: Family, gamma: float, *, n_samples: int = 1000, rho: float = 0.1,
               n_final: Optional[int] = None, max_iter: int = 100, smoothing: float = 1.0,
               confidence: float = 0.95, patience: int = 5, vectorized: bool = True, rng=None,
               callback: Optional[Callable[[CEMState], Any]] = None,
               progress: bool = False) -> RareEventResult:
    """Estimate ``P(S(X) >= gamma)`` for ``X`` drawn from ``family`` by the CE method.

    The multilevel procedure (de Boer et al. 2005, algorithm 2.1): with
    ``v_0`` the nominal parameters ``u``, iteration ``t`` draws
    ``n_samples`` points from ``f(.; v_(t-1))``, sets the level
    ``gamma_hat_t = min(gamma, (1 - rho) sample quantile of S)``, and fits
    ``v_t`` to the samples with ``S >= gamma_hat_t`` weighted by the
    likelihood ratios ``W = f(X; u) / f(X; v_(t-1))``; it stops once
    ``gamma_hat_t = gamma``.  Then ``n_final`` points from the tilted
    ``f(.; v_T)`` give the unbiased importance-sampling estimate
    ``mean(I{S(X) >= gamma} W(X))``.  Likelihood ratios stay in log space
    and are normalised with :func:`fastxent.logsumexp`, so probabilities far
    below the float64 range of a product of densities come out intact.

    If the levels stop rising for ``patience`` iterations or ``max_iter``
    runs out before gamma, the result says so (``reached=False``) and the
    estimate comes from the last tilted family.

    Parameters
    ----------
    S : callable
        ``S(X) -> scores`` on a batch (or per sample with
        ``vectorized=False``); NaN counts as below every level.
    family : Family
        The nominal distribution ``f(.; u)``.
    gamma : float
        The rare level.
    n_samples : int
        Sample size of each level.
    rho : float in (0, 1)
        Elite fraction of each level.
    n_final : int, optional
        Sample size of the final importance-sampling run (default
        ``10 * n_samples``).
    max_iter : int
        Most levels.
    smoothing : float in (0, 1]
        Weight of each new fit (the tutorial uses none: 1).
    confidence : float in (0, 1)
        Level of the normal-approximation interval ``ci``.
    rng, callback, progress
        As in :func:`maximize`.
    """
    _check_callable(S, "S")
    _check_family(family)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite real number, got {gamma!r}")
    gamma = float(gamma)
    rho = _check_fraction(rho, "rho")
    smoothing = _check_fraction(smoothing, "smoothing", closed_right=True)
    confidence = _check_fraction(confidence, "confidence")
    n_samples = _check_int(n_samples, "n_samples", 1)
    n_elite = _n_elite(n_samples, rho, "n_samples", "rho")
    n_final = 10 * n_samples if n_final is None else _check_int(n_final, "n_final", 2)
    max_iter = _check_int(max_iter, "max_iter", 1)
    patience = _check_int(patience, "patience", 1)
    if callback is not None:
        _check_callable(callback, "callback")
    gen = np.random.default_rng(rng)

    nominal = family
    levels, changes = [], []
    reached = False
    best_level = -math.inf
    still = 0
    nfev = 0
    stop = "max_iter"
    bar = _Progress(progress, max_iter, "cem.rare_event")
    try:
        for it in range(1, max_iter + 1):
            x = family.sample(n_samples, gen)
            raw, nan = _evaluate(S, x, vectorized, "S")
            nfev += n_samples
            s = np.where(nan, -math.inf, raw)
            q = float(np.partition(s, n_samples - n_elite)[n_samples - n_elite])
            level = min(gamma, q)
            elite = s >= level
            log_w = nominal.log_pdf(x[elite]) - family.log_pdf(x[elite])
            norm = float(logsumexp(log_w))
            if not math.isfinite(norm):
                raise ValueError("family: the elite samples have likelihood ratio 0 or NaN against the "
                                 "nominal parameters; the tilted family left the nominal support")
            weights = np.exp(log_w - norm)
            family, change = family._smoothed_update(x[elite], weights, smoothing)
            levels.append(level)
            changes.append(change)
            bar.update(it, level, float(np.max(s)))
            if callback is not None and callback(CEMState(it, level, float(np.max(s)), None, family, change, nfev)):
                stop = "callback"
                break
            if level >= gamma:
                reached = True
                stop = "reached"
                break
            if level > best_level:
                best_level, still = level, 0
            else:
                still += 1
                if still >= patience:
                    stop = "stalled"
                    break
    finally:
        bar.close()

    x = family.sample(n_final, gen)
    raw, nan = _evaluate(S, x, vectorized, "S")
    nfev += n_final
    hit = ~nan & (raw >= gamma)
    n_hits = int(hit.sum())
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    if n_hits:
        log_w = nominal.log_pdf(x[hit]) - family.log_pdf(x[hit])
        lse1 = float(logsumexp(log_w))
        lse2 = float(logsumexp(2.0 * log_w))
        log_est = lse1 - math.log(n_final)
        # mean(W^2 I) / mean(W I)^2 = n_final * exp(lse2 - 2 lse1); the
        # unbiased sample variance over n_final gives RE^2 = (ratio - 1) / (n_final - 1).
        ratio = n_final * math.exp(lse2 - 2.0 * lse1)
        rel_error = math.sqrt(max(ratio - 1.0, 0.0) / (n_final - 1))
        estimate = math.exp(log_est)
        ci = (max(0.0, estimate * (1.0 - z * rel_error)), estimate * (1.0 + z * rel_error))
    else:
        log_est, estimate, rel_error, ci = -math.inf, 0.0, math.inf, (0.0, math.inf)

    if reached:
        message = f"gamma={gamma:g} reached at level {len(levels)}"
    elif stop == "callback":
        message = f"stopped by the callback at level {len(levels)} (gamma_hat={levels[-1]:g} < gamma={gamma:g})"
    else:
        why = (f"the levels stopped rising for {patience} iterations" if stop == "stalled"
               else f"max_iter={max_iter} levels ran out")
        message = (f"gamma={gamma:g} not reached: {why} at gamma_hat={max(levels):g}; the estimate "
                   f"uses the last tilted family and may be far off (raise n_samples or rho)")
    if n_hits == 0:
        message += f"; no final sample reached gamma (estimate 0 from n_final={n_final})"
    return RareEventResult(
        estimate=estimate,
        log_estimate=log_est,
        rel_error=rel_error,
        ci=ci,
        confidence=confidence,
        family=family,
        levels=np.asarray(levels),
        reached=reached,
        n_hits=n_hits,
        nit=len(levels),
        nfev=nfev,
        message=message,
        history={"levels": np.asarray(levels), "param_change": np.asarray(changes)},
    )
