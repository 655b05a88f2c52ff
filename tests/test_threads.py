"""Threads, determinism, instruction sets and the OpenMP build.

* set_num_threads / get_num_threads, OMP_NUM_THREADS and threadpoolctl;
* results bitwise identical across thread counts and ISAs;
* OpenMP really linked and used (scikit-learn lost its OpenMP silently once,
  PR #29694): FASTXENT_REQUIRE_OPENMP=1, as set in CI, turns a build without
  it into a failure.

Concurrent calls from Python threads: test_concurrency.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastxent
from fastxent import _core

from fastxent import reference as ref

from conftest import (
    AVAILABLE_ISAS,
    assert_bitwise_equal,
    assert_close,
    random_logits,
    random_soft_labels,
)

REQUIRE_OPENMP = os.environ.get("FASTXENT_REQUIRE_OPENMP", "") not in ("", "0")
OPENMP = _core.openmp_enabled()

needs_openmp = pytest.mark.skipif(not OPENMP, reason="fastxent built without OpenMP")


def run_python(code, env_update=None, drop=()):
    env = dict(os.environ)
    for key in drop:
        env.pop(key, None)
    # Keep BLAS from starting its own threads, which would blur thread counts.
    env.update({"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(env_update or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------- OpenMP


def test_openmp_required_by_ci():
    if not REQUIRE_OPENMP:
        pytest.skip("FASTXENT_REQUIRE_OPENMP is not set")
    assert OPENMP, "FASTXENT_REQUIRE_OPENMP=1 but fastxent was built without OpenMP"


def test_openmp_really_linked_and_used():
    """In a fresh process (no torch, no other OpenMP user): importing fastxent
    maps an OpenMP runtime, threadpoolctl sees it, and a kernel called with
    num_threads=2 on a big input starts a second OS thread."""
    if not OPENMP:
        if REQUIRE_OPENMP:
            pytest.fail("FASTXENT_REQUIRE_OPENMP=1 but fastxent was built without OpenMP")
        pytest.skip("fastxent built without OpenMP")
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc")
    out = run_python(
        """
        import json, os
        import numpy as np

        def omp_libs():
            names = set()
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.split()[-1] if len(line.split()) >= 6 else ""
                    base = os.path.basename(path)
                    if "gomp" in base or "libomp" in base or "iomp" in base:
                        names.add(path)
            return sorted(names)

        def n_threads():
            return len(os.listdir("/proc/self/task"))

        before_import = omp_libs()
        import fastxent
        from fastxent import _core
        after_import = omp_libs()
        x = np.random.default_rng(0).standard_normal((8192, 512)).astype(np.float32)
        y = np.zeros(8192, dtype=np.int64)
        threads_before = n_threads()
        fastxent.cross_entropy_with_grad(x, y, num_threads=2)
        fastxent.logsumexp(x, num_threads=2)
        threads_after = n_threads()
        from threadpoolctl import threadpool_info
        info = [d for d in threadpool_info() if d.get("user_api") == "openmp"]
        print(json.dumps(dict(before_import=before_import, after_import=after_import,
                              threads_before=threads_before, threads_after=threads_after,
                              info=info, so=_core.__file__)))
        """,
        drop=("OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "OMP_DYNAMIC"),
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["after_import"], f"no OpenMP runtime mapped after import: {report}"
    new_libs = set(report["after_import"]) - set(report["before_import"])
    if not new_libs and shutil.which("ldd"):
        ldd = subprocess.run(["ldd", report["so"]], capture_output=True, text=True).stdout
        assert any(k in ldd for k in ("gomp", "libomp", "iomp")), ldd
    assert report["info"], f"threadpoolctl sees no OpenMP pool: {report}"
    if (os.cpu_count() or 1) >= 2:
        assert report["threads_after"] >= report["threads_before"] + 1, (
            f"num_threads=2 started no worker thread: {report}"
        )


def test_extension_links_openmp_runtime():
    if not OPENMP:
        pytest.skip("fastxent built without OpenMP")
    if not shutil.which("ldd"):
        pytest.skip("no ldd")
    ldd = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True).stdout
    assert any(k in ldd for k in ("gomp", "libomp", "iomp")), ldd


# ------------------------------------------------------- thread count API


def test_set_get_num_threads_round_trip(restore_num_threads):
    fastxent.set_num_threads(1)
    assert fastxent.get_num_threads() == 1
    if OPENMP:
        for n in (2, 3, 7):
            fastxent.set_num_threads(n)
            assert fastxent.get_num_threads() == n
        assert fastxent.show_config()["num_threads"] == 7
    # None goes back to following OpenMP.
    fastxent.set_num_threads(None)
    assert fastxent.get_num_threads() == restore_num_threads


def test_default_num_threads_is_positive():
    n = fastxent.get_num_threads()
    assert isinstance(n, int) and n >= 1


@needs_openmp
def test_threadpool_limits_is_honoured(restore_num_threads, rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = random_logits(rng, (300, 257), np.float32)
    y = rng.integers(0, 257, 300)
    expected = fastxent.cross_entropy_with_grad(x, y, num_threads=1)
    before = fastxent.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastxent.get_num_threads() == 1
        assert fastxent.show_config()["num_threads"] == 1
        got = fastxent.cross_entropy_with_grad(x, y)
    assert fastxent.get_num_threads() == before
    assert_bitwise_equal(got[0], expected[0])
    assert_bitwise_equal(got[1], expected[1])
    # threadpoolctl lists the library's pool.
    assert any(d.get("user_api") == "openmp" for d in threadpoolctl.threadpool_info())


@needs_openmp
def test_omp_num_threads_sets_the_default():
    out = run_python(
        "import fastxent; print(fastxent.get_num_threads())",
        env_update={"OMP_NUM_THREADS": "3"},
    )
    assert out.strip().splitlines()[-1] == "3"


def test_show_config(capsys):
    config = fastxent.show_config()
    printed = capsys.readouterr().out
    assert set(config) >= {"version", "isa", "isas_available", "openmp", "num_threads"}
    assert config["version"] == fastxent.__version__
    assert config["isa"] == _core.get_isa()
    assert list(config["isas_available"]) == AVAILABLE_ISAS
    assert config["openmp"] is OPENMP
    assert config["num_threads"] == fastxent.get_num_threads()
    assert config["version"] in printed and config["isa"] in printed


# --------------------------------------------------------------------- ISAs


def test_isa_fixture_switches(isa):
    assert _core.get_isa() == isa
    assert fastxent.show_config()["isa"] == isa


def test_baseline_always_available():
    assert "baseline" in AVAILABLE_ISAS


@pytest.mark.parametrize("name", AVAILABLE_ISAS)
def test_fastxent_isa_environment_override(name):
    out = run_python("from fastxent import _core; print(_core.get_isa())", {"FASTXENT_ISA": name})
    assert out.strip().splitlines()[-1] == name


# -------------------------------------------------------------- determinism

THREAD_COUNTS = (1, 2, 3, 4, None)


def _all_results(x, y, soft, threads):
    kw = {"num_threads": threads}
    loss, grad = fastxent.cross_entropy_with_grad(x, y, label_smoothing=0.1, **kw)
    # Every row labelled, no smoothing: the small-row kernel's lanewise
    # ("plain") groups, which a thread split moves rows into and out of.
    labelled = np.where(y == -100, 0, y)
    return {
        "ce_none": fastxent.cross_entropy(x, y, reduction="none", **kw),
        "ce_none_labelled": fastxent.cross_entropy(x, labelled, reduction="none", **kw),
        "fused_grad_labelled": fastxent.cross_entropy_with_grad(x, labelled, **kw)[1],
        "ce_mean": fastxent.cross_entropy(x, y, **kw),
        "ce_sum_soft": fastxent.cross_entropy(x, soft, reduction="sum", **kw),
        "fused_loss": loss,
        "fused_grad": grad,
        "soft_grad": fastxent.cross_entropy_with_grad(x, soft, **kw)[1],
        "logsumexp": fastxent.logsumexp(x, **kw),
        "log_softmax": fastxent.log_softmax(x, **kw),
        "softmax": fastxent.softmax(x, **kw),
        "entropy": fastxent.entropy(x, **kw),
    }


@pytest.mark.parametrize(
    "shape",
    [(513, 1000), (64, 17), (67, 32), (45, 5), (37, 100), (29, 256), (3, 50257), (1, 100003)],
    ids=["many_rows", "narrow", "narrow32", "narrow5", "mid", "mid256", "vocab", "one_row"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_threads_and_isas(dtype, shape, rng):
    x = random_logits(rng, shape, dtype)
    x[0, 0] = -np.inf
    y = rng.integers(0, shape[1], shape[0])
    y[::7] = -100
    soft = random_soft_labels(rng, shape, dtype)
    previous = _core.get_isa()
    baseline = None
    try:
        for name in AVAILABLE_ISAS:
            _core.set_isa(name)
            for threads in THREAD_COUNTS:
                results = _all_results(x, y, soft, threads)
                if baseline is None:
                    baseline = results
                    continue
                for key, value in results.items():
                    assert_bitwise_equal(value, baseline[key], what=f"{key} isa={name} threads={threads}")
    finally:
        _core.set_isa(previous)


@pytest.mark.parametrize("C", [49, 64, 100, 129, 256, 512])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_rows_alone_match_rows_in_a_batch(dtype, C, isa, rng):
    """Rows of up to 1 KiB are taken in groups (four on AVX-512, then
    pairs) by the forward kernels; a row alone is never grouped, so it must
    give the bits it gives in a batch, next to any neighbour: an ignored
    label, rows whose max is -inf, +inf or NaN (which send their group down
    the one-row path), a row count that leaves a pair and a single row.
    Each one-row result is also checked against the reference, so a group
    that swapped or mixed its rows cannot pass."""
    x = random_logits(rng, (11, C), dtype)
    x[1, :] = -np.inf
    x[4, 3] = np.inf
    x[6, 5] = np.nan
    x[8, :] = -1e4
    y = rng.integers(0, C, 11)
    y[2] = -100
    y[9] = -100
    batch = {
        "ce": fastxent.cross_entropy(x, y, reduction="none"),
        "lse": fastxent.logsumexp(x),
        "log_softmax": fastxent.log_softmax(x),
        "entropy": fastxent.entropy(x),
    }
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        alone = {
            "ce": fastxent.cross_entropy(xi, yi, reduction="none"),
            "lse": fastxent.logsumexp(xi),
            "log_softmax": fastxent.log_softmax(xi),
            "entropy": fastxent.entropy(xi),
        }
        for key, value in alone.items():
            assert_bitwise_equal(batch[key][i : i + 1], value, what=f"{key} row {i} C={C}")
    ct = np.float64 if dtype == np.float64 else np.float32
    finite = [0, 3, 5, 7, 8, 10]
    assert_close(batch["ce"][finite], ref.cross_entropy(x[finite], y[finite], reduction="none"), ct)
    assert_close(batch["lse"][finite], ref.logsumexp(x[finite]), ct)
    if dtype == np.float16:  # log_softmax keeps the input's dtype: half an ulp of rounding
        got = batch["log_softmax"][finite].astype(np.float64)
        np.testing.assert_allclose(got, ref.log_softmax(x[finite]), rtol=2.0**-10)
    else:
        assert_close(batch["log_softmax"][finite], ref.log_softmax(x[finite]), ct)
    assert batch["ce"][2] == 0 and batch["ce"][9] == 0
    assert batch["lse"][1] == -np.inf and batch["lse"][4] == np.inf and np.isnan(batch["lse"][6])
    assert np.isnan(batch["ce"][[1, 4, 6]]).all()
