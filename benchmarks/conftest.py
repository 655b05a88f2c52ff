"""Shared machinery of the fastxent benchmarks (pytest-benchmark).

Not part of the default test run (pytest's ``testpaths`` is ``tests/``). Run::

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,ops

Layout of a benchmark
---------------------
Each test function is one operation (``cross_entropy`` forward, ...). It is
marked ``@pytest.mark.contenders("fastxent", "reference", "torch", ...)`` and
takes the ``bench_case`` fixture; ``pytest_generate_tests`` below expands it
into every (shape, dtype, threads, contender) and drops what cannot or should
not run:

- ``torch`` / ``scipy`` / ``jax`` contenders are absent when the package is
  not installed (nothing is ever installed for you);
- the single-threaded NumPy baselines (``reference``, ``scipy``) are absent on
  inputs above ``BASELINE_MAX_ELEMENTS`` elements, where one float64 call
  takes seconds and gigabytes (override with ``FASTXENT_BENCH_BASELINE_MAX``).

A benchmark may bring its own matrix with ``@pytest.mark.cases((shape,
dtype), ..., threads=(1, 2))`` instead of ``CASES`` / ``THREADS``, and drop
combinations with ``contenders(..., available=fn)``, ``fn(contender, shape,
dtype)`` returning False for those (test_bench_family.py does both).

All contenders of one (function, shape, dtype, threads) share one
pytest-benchmark group, so ``--benchmark-group-by=group`` puts them side by
side. Test ids read ``<N>x<C>-<dtype>-<T>thread-<contender>`` and are what
``-k`` filters on.

Timing mode: inputs of at least ``PEDANTIC_MIN_ELEMENTS`` elements are timed
with ``benchmark.pedantic`` (``PEDANTIC_ROUNDS`` rounds after one warm-up
round), so a slow contender cannot eat minutes; smaller inputs use the
calibrated mode with a per-test budget of ``DEFAULT_MAX_TIME`` seconds and
rounds of at least ``DEFAULT_MIN_TIME`` seconds, unless
``--benchmark-max-time`` / ``--benchmark-min-time`` is given on the command
line.

``extra_info`` of every benchmark: function, contender, shape, dtype,
threads, the fastxent ISA in use, ``bytes`` (bytes of logits read by one
call), ``bytes_moved`` (logits read plus the N x C result written, if any) and
``gbps`` (``bytes`` / median seconds / 1e9, filled in after the run); for the
``jax`` contenders also ``jax_threading``: JAX ignores the group's thread
count and runs with XLA's default, process-wide threading (``JAX_THREADING``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass

import numpy as np
import pytest

import fastxent

try:
    import torch
except ImportError:  # torch contenders are simply absent
    torch = None

try:
    import scipy
    import scipy.special
except ImportError:  # scipy contenders are simply absent
    scipy = None

try:
    import jax
    import jax.numpy as jnp

    # float64 inputs stay float64 (without this jnp.asarray silently makes
    # them float32) and labels stay int64, as for every other contender.
    # Process-wide, like JAX's threading (see JAX_THREADING).
    jax.config.update("jax_enable_x64", True)
except ImportError:  # jax contenders are simply absent
    jax = jnp = None

# JAX (XLA:CPU) runs with its default threading in every group: its thread
# pool is sized once per process (XLA_FLAGS, e.g. "--xla_cpu_multi_thread_eigen=false
# intra_op_parallelism_threads=1", must be set before jax is imported), so
# it cannot follow the 1 / 2 threads of each group. Recorded in extra_info.
JAX_THREADING = "xla default (process-wide; XLA_FLAGS=%r)" % os.environ.get("XLA_FLAGS", "")


# --------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------

THREADS = (1, 2)

# (shape, dtype). float64 only on a couple of shapes: it is the same kernel
# shape at twice the bytes, and doubles the run time of the suite.
CASES = (
    ((8, 10), "float32"),  # call overhead
    ((65536, 10), "float32"),  # many tiny rows: per-row overhead
    ((65536, 10), "float64"),
    ((32768, 128), "float32"),
    ((8192, 1000), "float32"),  # ImageNet-like
    ((8192, 1000), "float64"),
    ((1, 256000), "float32"),  # one huge row: split within the row
    ((4096, 32000), "float32"),  # LLaMA-2 vocabulary
    ((512, 128256), "float32"),  # LLaMA-3 vocabulary
)

# Above this many elements the float64 NumPy baselines (reference, scipy)
# are left out: on (4096, 32000) one reference call takes several seconds and
# a few GiB of temporaries.
BASELINE_MAX_ELEMENTS = int(float(os.environ.get("FASTXENT_BENCH_BASELINE_MAX", 2e7)))

# From this many elements on, use benchmark.pedantic with a fixed round count.
PEDANTIC_MIN_ELEMENTS = 1 << 24
PEDANTIC_ROUNDS = 7
PEDANTIC_WARMUP_ROUNDS = 1

# Calibrated mode: seconds per benchmark (pytest-benchmark's default is 1.0;
# 0.5 keeps the whole suite within ~10 minutes on 2 cores).
DEFAULT_MAX_TIME = 0.5
# Calibrated mode: seconds per round at least. pytest-benchmark's default
# (5 us) gave a sub-microsecond call one iteration per round, so each median
# carried a timer read and the runner's loop (about 130 ns at (8, 10): 822
# against 690 ns); 100 us rounds amortise them over a hundred calls.
DEFAULT_MIN_TIME = 1e-4

CONTENDERS_NEEDING = {
    "torch": lambda: torch is not None,
    "scipy": lambda: scipy is not None,
    "jax": lambda: jax is not None,
}
BASELINES = ("reference", "scipy")


@dataclass(frozen=True)
class BenchCase:
    """One parametrisation: what to run, on what, with how many threads."""

    shape: tuple
    dtype: str
    threads: int
    contender: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def shape_id(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def id(self) -> str:
        return f"{self.shape_id}-{self.dtype}-{self.threads}thread-{self.contender}"

    @property
    def pedantic(self) -> bool:
        return self.size >= PEDANTIC_MIN_ELEMENTS


def _contender_available(contender: str, shape, dtype) -> bool:
    base = contender.split("-")[0]
    needs = CONTENDERS_NEEDING.get(base)
    if needs is not None and not needs():
        return False
    if base in BASELINES and int(np.prod(shape)) > BASELINE_MAX_ELEMENTS:
        return False
    return True


# --------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "contenders(*names): contenders of a fastxent benchmark; "
        "expanded with the shape/dtype/threads matrix by benchmarks/conftest.py; "
        "available=fn(contender, shape, dtype) -> bool drops the combinations fn refuses",
    )
    config.addinivalue_line(
        "markers",
        "cases(*(shape, dtype), threads=THREADS): this benchmark's own matrix instead of CASES",
    )


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("contenders")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{metafunc.function.__name__} needs @pytest.mark.contenders(...)")
    available = marker.kwargs.get("available")
    cases_marker = metafunc.definition.get_closest_marker("cases")
    cases, threads_list = CASES, THREADS
    if cases_marker is not None:
        cases = cases_marker.args
        threads_list = cases_marker.kwargs.get("threads", THREADS)
    params = []
    for shape, dtype in cases:
        for threads in threads_list:
            for contender in marker.args:
                if not _contender_available(contender, shape, dtype):
                    continue
                if available is not None and not available(contender, shape, dtype):
                    continue
                case = BenchCase(shape, dtype, threads, contender)
                params.append(pytest.param(case, id=case.id))
    metafunc.parametrize("bench_case", params)


def _user_set(config, option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in config.invocation_params.args)


def pytest_collection_modifyitems(config, items):
    # A shorter calibrated budget than pytest-benchmark's 1 s and longer
    # rounds, unless the user chose them. (A benchmark marker overrides the
    # command line, hence the checks.)
    opts = {}
    if not _user_set(config, "--benchmark-max-time"):
        opts["max_time"] = DEFAULT_MAX_TIME
    if not _user_set(config, "--benchmark-min-time"):
        opts["min_time"] = DEFAULT_MIN_TIME
    if not opts:
        return
    for item in items:
        if "bench_case" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(**opts))


def pytest_report_header(config):
    cfg = fastxent_config()
    torch_line = f"torch {torch.__version__}" if torch is not None else "torch not installed (contenders absent)"
    scipy_line = f"scipy {scipy.__version__}" if scipy is not None else "scipy not installed (contenders absent)"
    jax_line = (f"jax {jax.__version__} ({JAX_THREADING})" if jax is not None
                else "jax not installed (contenders absent)")
    return [
        f"fastxent {cfg.get('version')}: isa={cfg.get('isa')} openmp={cfg.get('openmp')} "
        f"default threads={cfg.get('num_threads')}",
        f"contenders: {torch_line}; {scipy_line}; {jax_line}; numpy {np.__version__}; "
        f"NumPy baselines only up to {BASELINE_MAX_ELEMENTS:.3g} elements",
        f"timing: pedantic ({PEDANTIC_ROUNDS} rounds + {PEDANTIC_WARMUP_ROUNDS} warm-up) from "
        f"{PEDANTIC_MIN_ELEMENTS} elements; calibrated below, max_time="
        + (f"{config.getoption('benchmark_max_time')} s" if _user_set(config, "--benchmark-max-time")
           else f"{DEFAULT_MAX_TIME} s (this suite's default)")
        + ", min_time="
        + (f"{config.getoption('benchmark_min_time')} s" if _user_set(config, "--benchmark-min-time")
           else f"{DEFAULT_MIN_TIME} s (this suite's default)"),
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastxent"] = fastxent_config()
    machine_info["numpy"] = np.__version__
    machine_info["scipy"] = getattr(scipy, "__version__", None)
    machine_info["torch"] = getattr(torch, "__version__", None)
    machine_info["jax"] = getattr(jax, "__version__", None)
    if jax is not None:
        machine_info["jaxlib"] = _jaxlib_version()
        machine_info["jax_threading"] = JAX_THREADING
    if torch is not None:
        machine_info["torch_parallel_info"] = torch.__config__.parallel_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # gbps is already set by the fixture; this only fills it in for runs whose
    # stats were produced some other way (and is a no-op otherwise).
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = bench.get("stats", {}).get("median")
        if "bytes" in info and median and "gbps" not in info:
            info["gbps"] = info["bytes"] / median / 1e9


# --------------------------------------------------------------------------
# Data and helpers
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def fastxent_config() -> dict:
    """``fastxent.show_config()`` as a dict, with whatever it prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cfg = fastxent.show_config()
        except Exception:  # noqa: BLE001 - benchmarks still run without it
            cfg = None
    if not isinstance(cfg, dict):
        cfg = {"version": getattr(fastxent, "__version__", None)}
        try:
            cfg["isa"] = fastxent._core.get_isa()
        except Exception:  # noqa: BLE001
            cfg["isa"] = None
    return cfg


def make_inputs(shape: tuple, dtype: str):
    """Logits (standard normal, times 3) and int64 labels in [0, C), seeded.

    Made once per (shape, dtype) and shared by every contender; the small
    inputs (~130 MB together) stay cached for the session, only the last large
    one (up to 0.5 GB) is kept.
    """
    if int(np.prod(shape)) >= PEDANTIC_MIN_ELEMENTS:
        return _make_large_inputs(shape, dtype)
    return _make_small_inputs(shape, dtype)


def _make_inputs(shape: tuple, dtype: str):
    rng = np.random.default_rng(20240601 + sum(shape))
    logits = rng.standard_normal(shape, dtype=np.float32)
    logits *= 3.0
    logits = logits.astype(dtype, copy=False)
    labels = rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)
    return logits, labels


_make_small_inputs = functools.lru_cache(maxsize=None)(_make_inputs)
_make_large_inputs = functools.lru_cache(maxsize=1)(_make_inputs)


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def torch_threads(n: int):
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Bench:
    """What a benchmark test gets: the case, its inputs, and ``run(fn)``."""

    def __init__(self, benchmark, case: BenchCase, function: str):
        self.benchmark = benchmark
        self.case = case
        self.function = function
        self.logits, self.labels = make_inputs(case.shape, case.dtype)
        self.threads = case.threads

    @property
    def contender(self) -> str:
        return self.case.contender

    def torch_tensors(self, requires_grad: bool = False):
        """The same data as torch tensors (``torch.from_numpy``: no copy)."""
        x = torch.from_numpy(self.logits)
        if requires_grad:
            x.requires_grad_(True)
        return x, torch.from_numpy(self.labels)

    def jax_arrays(self):
        """The same data as JAX arrays, converted once (``jnp.asarray``)."""
        x, y = jnp.asarray(self.logits), jnp.asarray(self.labels)
        jax.block_until_ready((x, y))
        return x, y

    def jax_fn(self, jitted, *args):
        """``fn()`` for ``run``: calls ``jitted(*args)`` and blocks until the
        result is computed. Compiles it (one untimed call) first."""

        def fn():
            return jax.block_until_ready(jitted(*args))

        fn()  # trace + compile, outside the timing
        return fn

    def run(self, fn, *, writes_result: bool = False, nbytes: int | None = None,
            result_nbytes: int | None = None, rounds: int | None = None,
            warmup_rounds: int | None = None):
        """Time ``fn()`` and record everything a reader needs to compare.

        ``writes_result``: the call writes an N x C array (gradient,
        probabilities), counted in ``bytes_moved``. ``nbytes``: the bytes one
        call reads (default: the logits'; e.g. logits plus a dense target);
        ``result_nbytes``: the bytes of that written result (default
        ``nbytes``). ``rounds``, ``warmup_rounds``: pedantic rounds for the
        large inputs (default ``PEDANTIC_ROUNDS``, ``PEDANTIC_WARMUP_ROUNDS``).
        """
        case, benchmark = self.case, self.benchmark
        if nbytes is None:
            nbytes = self.logits.nbytes
        if result_nbytes is None:
            result_nbytes = nbytes
        benchmark.group = f"{self.function} {case.shape_id} {case.dtype} {case.threads}thread"
        benchmark.extra_info.update(
            function=self.function,
            contender=case.contender,
            shape=list(case.shape),
            dtype=case.dtype,
            threads=case.threads,
            isa=fastxent_config().get("isa"),
            bytes=nbytes,
            bytes_moved=nbytes + (result_nbytes if writes_result else 0),
        )
        if case.contender.split("-")[0] == "jax":
            # JAX does not follow `threads` (see JAX_THREADING).
            benchmark.extra_info["jax_threading"] = JAX_THREADING
        with torch_threads(case.threads):
            if case.pedantic:
                result = benchmark.pedantic(
                    fn,
                    rounds=PEDANTIC_ROUNDS if rounds is None else rounds,
                    warmup_rounds=PEDANTIC_WARMUP_ROUNDS if warmup_rounds is None else warmup_rounds,
                    iterations=1,
                )
            else:
                result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        if stats is not None and stats.stats.median > 0:
            benchmark.extra_info["gbps"] = nbytes / stats.stats.median / 1e9
        return result


@pytest.fixture
def bench(request, benchmark, bench_case):
    """A ``Bench`` for this case; the function benchmarked is the test's name
    without ``test_`` (``test_softmax`` -> ``softmax``)."""
    return Bench(benchmark, bench_case, request.function.__name__.removeprefix("test_"))
