"""Concurrency, resource and fork safety of every public function.

* 8 Python threads call every function at once with mixed ``num_threads``
  (one of them also flips the global ``set_num_threads``); every result is
  bitwise identical to the single-threaded one.  ``FASTXENT_STRESS_CALLS``
  sets the calls per thread (default 1000; 10000 for a stress run).
* RSS (``/proc/self/statm``) stays flat over many calls of each function,
  error paths included.  ``FASTXENT_STRESS_RSS_CALLS`` sets the calls per
  function (default: 2*10**4 in all, spread over the functions; 10**5 for a
  stress run).
* A child forked (multiprocessing, "fork") after the parent used the OpenMP
  pool with 2 threads computes correct results, within a timeout: a hang
  fails the test instead of hanging CI.
* ``@pytest.mark.slow``: inputs of more than 2**31 elements (see the
  docstrings for the memory they need; skipped when /proc/meminfo's
  MemAvailable is short).

kl_div and binary_cross_entropy are covered when the package has them.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import threading

import numpy as np
import pytest

import fastxent


STRESS_CALLS = int(os.environ.get("FASTXENT_STRESS_CALLS", "1000"))
RSS_CALLS = os.environ.get("FASTXENT_STRESS_RSS_CALLS")
N_THREADS = 8

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ------------------------------------------------------------------ the cases


def _rng(seed):
    return np.random.default_rng(seed)


def make_cases(n=13, c=37):
    """name -> (function, args, kwargs) on small inputs; ``out`` is filled in
    per thread (a shared out= buffer would be a data race of the caller)."""
    r = _rng(1234)
    x32 = (3 * r.standard_normal((n, c))).astype(np.float32)
    x64 = 3 * r.standard_normal((n, c))
    x16 = r.standard_normal((n, c)).astype(np.float16)
    x3d = 3 * r.standard_normal((2, c, 5))  # classes on axis 1
    lab = r.integers(0, c, n)
    lab[::4] = -100
    lab3d = r.integers(0, c, (2, 5))
    soft = r.random((n, c))
    soft /= soft.sum(-1, keepdims=True)
    w = r.random(c) + 0.1
    probs = soft.astype(np.float32)
    cases = {
        "ce_f32": (fastxent.cross_entropy, (x32, lab), {}),
        "ce_f64_opts": (fastxent.cross_entropy, (x64, lab), dict(weight=w, label_smoothing=0.1, base=2)),
        "ce_soft": (fastxent.cross_entropy, (x32, soft), dict(reduction="none")),
        "ce_probs": (fastxent.cross_entropy, (probs, lab), dict(from_logits=False, reduction="sum")),
        "ce_axis1": (fastxent.cross_entropy, (x3d, lab3d), dict(axis=1, reduction="none")),
        "ceg_f32": (fastxent.cross_entropy_with_grad, (x32, lab), {}),
        "ceg_f16": (fastxent.cross_entropy_with_grad, (x16, lab), dict(label_smoothing=0.2)),
        "ceg_none": (fastxent.cross_entropy_with_grad, (x64, lab), dict(reduction="none",
                                                                       grad_output=r.standard_normal(n))),
        "ceg_out": (fastxent.cross_entropy_with_grad, (x32, lab), dict(out="fresh")),
        "ceg_inplace": (fastxent.cross_entropy_with_grad, (x32, soft), dict(out="inplace")),
        "lse": (fastxent.logsumexp, (x32,), {}),
        "lse_axis0": (fastxent.logsumexp, (x64,), dict(axis=0)),
        "logsm": (fastxent.log_softmax, (x32,), {}),
        "logsm_out": (fastxent.log_softmax, (x64,), dict(out="fresh")),
        "sm": (fastxent.softmax, (x16,), {}),
        "sm_inplace": (fastxent.softmax, (x32,), dict(out="inplace")),
        "ent": (fastxent.entropy, (x32,), dict(base=2)),
        "ent_probs": (fastxent.entropy, (probs,), dict(from_logits=False)),
    }
    t_logits = 2 * r.standard_normal((n, c))
    cases.update({
        "kl": (fastxent.kl_div, (x32, soft), {}),
        "kl_logits_T": (fastxent.kl_div, (x64, t_logits), dict(target_kind="logits", temperature=2.0)),
        "klg": (fastxent.kl_div_with_grad, (x32, np.log(soft)), dict(target_kind="log_probs")),
        "klg_out": (fastxent.kl_div_with_grad, (x64, soft), dict(reduction="none", out="fresh")),
    })
    t01 = r.random((n, c))
    cases.update({
        "bce": (fastxent.binary_cross_entropy, (x32, t01), {}),
        "bce_w": (fastxent.binary_cross_entropy, (x64, t01), dict(pos_weight=w, reduction="sum")),
        "bceg": (fastxent.binary_cross_entropy_with_grad, (x32, t01), dict(reduction="none")),
        "bceg_probs": (fastxent.binary_cross_entropy_with_grad, (probs, t01), dict(from_logits=False,
                                                                                 out="fresh")),
    })
    return cases


def run_case(case, num_threads):
    """Call one case; out="fresh" / "inplace" become a new buffer / a copy of
    the logits used in place.  Returns a tuple of result arrays."""
    fn, args, kw = case
    kw = dict(kw)
    if kw.get("out") == "fresh":
        kw["out"] = np.full(np.shape(args[0]), 7, dtype=np.asarray(args[0]).dtype)
    elif kw.get("out") == "inplace":
        x = np.array(args[0], copy=True)
        args = (x,) + tuple(args[1:])
        kw["out"] = x
    res = fn(*args, num_threads=num_threads, **kw)
    return tuple(np.asarray(a) for a in (res if isinstance(res, tuple) else (res,)))


def same_bits(a, b):
    return all(x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


@pytest.fixture
def restore_threads():
    before = fastxent.get_num_threads()
    yield
    fastxent.set_num_threads(None)
    if fastxent.get_num_threads() != before:
        fastxent.set_num_threads(before)


# ------------------------------------------------------------------ threads


def test_eight_python_threads_bitwise_identical(restore_threads):
    cases = make_cases()
    names = sorted(cases)
    expected = {name: run_case(cases[name], 1) for name in names}
    errors = []
    barrier = threading.Barrier(N_THREADS)
    thread_choices = [None, 1, 2, 3, 4]

    def worker(k):
        rng = np.random.default_rng(k)
        try:
            barrier.wait()
            for i in range(STRESS_CALLS):
                name = names[(i + 7 * k) % len(names)]
                nt = thread_choices[int(rng.integers(len(thread_choices)))]
                if k == 0 and i % 50 == 0:
                    # the global default changes under the other threads' feet
                    fastxent.set_num_threads(int(rng.integers(1, 5)) if i % 100 else None)
                got = run_case(cases[name], nt)
                if not same_bits(got, expected[name]):
                    errors.append(f"thread {k}, call {i}: {name} with num_threads={nt} differs")
                    return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, "\n".join(errors[:10])


def test_threads_sharing_one_read_only_input(restore_threads):
    """All threads read the very same (read-only, strided) logits concurrently."""
    x = (3 * _rng(5).standard_normal((64, 2 * 101)))[:, ::2]
    x.flags.writeable = False
    lab = _rng(6).integers(0, 101, 64)
    expected = fastxent.cross_entropy_with_grad(x, lab, reduction="none", num_threads=1)
    errors = []

    def worker(k):
        for i in range(max(STRESS_CALLS // 10, 20)):
            loss, grad = fastxent.cross_entropy_with_grad(x, lab, reduction="none", num_threads=1 + (i + k) % 3)
            if loss.tobytes() != expected[0].tobytes() or grad.tobytes() != expected[1].tobytes():
                errors.append(f"thread {k} call {i} differs")
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:5]


# ------------------------------------------------------------------ memory


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_cases():
    """Bigger inputs than above (a leaked result would show at once), and
    calls that fail validation (a leak on the error path)."""
    r = _rng(99)
    n, c = 32, 517
    x = (3 * r.standard_normal((n, c))).astype(np.float32)
    x64 = x.astype(np.float64)
    lab = r.integers(0, c, n)
    bad_lab = lab.copy()
    bad_lab[3] = c
    soft = r.random((n, c)).astype(np.float32)
    cases = dict(make_cases(n, c))
    cases.update({
        "ce_strided": (fastxent.cross_entropy, (x64[:, ::2], lab % (c // 2 + 1)), dict(reduction="none")),
        "ce_bad_label": (fastxent.cross_entropy, (x, bad_lab), {}),
        "ceg_bad_out": (fastxent.cross_entropy_with_grad, (x, lab), dict(out=np.empty((n, c + 1), np.float32))),
        "sm_bad_axis": (fastxent.softmax, (x,), dict(axis=5)),
        "ceg_soft_f16": (fastxent.cross_entropy_with_grad, (x.astype(np.float16), soft), {}),
    })
    return cases


def _call_quietly(case, nt):
    try:
        run_case(case, nt)
    except (ValueError, TypeError):
        pass


UNDER_A_CHECKER = any(k in os.environ.get("LD_PRELOAD", "") for k in ("asan", "vgpreload"))


@linux_only
@pytest.mark.skipif(UNDER_A_CHECKER, reason="ASan's quarantine and valgrind hold freed memory: RSS is not flat there")
def test_rss_stays_flat():
    cases = _rss_cases()
    per_fn = int(RSS_CALLS) if RSS_CALLS else max(2 * 10**4 // len(cases), 200)
    slack = 4 * 2**20
    report = []
    for name in sorted(cases):
        case = cases[name]
        warm = max(per_fn // 10, 50)
        for i in range(warm):
            _call_quietly(case, 1 + i % 2)
        gc.collect()
        rss0 = rss_bytes()
        half = (per_fn - warm) // 2
        for i in range(half):
            _call_quietly(case, 1 + i % 2)
        gc.collect()
        rss1 = rss_bytes()
        for i in range(half):
            _call_quietly(case, 1 + i % 2)
        gc.collect()
        rss2 = rss_bytes()
        report.append((name, rss0, rss1, rss2))
        # Flat: the second half must not grow past a small slack, and the
        # whole run no more than twice that (allocator noise).
        assert rss2 - rss1 <= slack and rss2 - rss0 <= 2 * slack, (
            f"{name}: RSS grew over {per_fn} calls: {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} -> "
            f"{rss2 / 2**20:.1f} MiB")


# ------------------------------------------------------------------ fork


def _child(queue, names):
    try:
        cases = make_cases()
        out = {}
        for name in names:
            out[name] = [(a.dtype.str, a.shape, a.tobytes()) for nt in (None, 1, 2)
                         for a in run_case(cases[name], nt)]
        queue.put(("ok", out))
    except BaseException as e:  # noqa: BLE001
        queue.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_forked_child_after_the_pool_was_used(restore_threads):
    cases = make_cases()
    names = sorted(cases)
    # The parent uses its OpenMP pool with 2 threads first.
    fastxent.set_num_threads(2)
    big = _rng(3).standard_normal((4096, 64)).astype(np.float32)
    for _ in range(3):
        fastxent.logsumexp(big, num_threads=2)
        fastxent.cross_entropy_with_grad(big, np.zeros(4096, np.int64), num_threads=2)
    expected = {name: [(a.dtype.str, a.shape, a.tobytes()) for nt in (None, 1, 2) for a in run_case(cases[name], nt)]
                for name in names}

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, names))
    proc.start()
    try:
        status, payload = queue.get(timeout=120)
    except Exception:  # queue.Empty: the child hung (or died)
        status, payload = "hang", None
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert status != "hang", f"the forked child did not answer within 120 s (exit code {proc.exitcode})"
    assert status == "ok", payload
    assert proc.exitcode == 0, f"child exit code {proc.exitcode}"
    for name in names:
        assert payload[name] == expected[name], f"{name}: the forked child's results differ"


# ------------------------------------------------------------------ > 2**31 elements


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def need_memory(nbytes):
    avail = mem_available()
    if avail < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free memory, MemAvailable is {avail / 2**30:.1f} GiB")


BIG_C = 1000
BIG_N = 2**31 // BIG_C + 10  # N * C > 2**31: the last rows start past element 2**31


@pytest.mark.slow
def test_more_than_2_31_elements_over_rows():
    """float16 logits of shape (2**31 // 1000 + 10, 1000), 2.15e9 elements.

    Memory: the float16 logits (4.3 GB) plus the float32 copy the library
    computes from (8.6 GB) plus labels and per-row results (~0.05 GB):
    about 13 GB; skipped unless MemAvailable has 14 GiB.

    The rows repeat a pattern of 7 distinct rows, so the per-row results of
    every row -- in particular the last ones, past element 2**31, where a
    32-bit index would wrap -- must equal, bitwise, those of the same 7 rows
    computed alone.
    """
    need_memory(14 * 2**30)
    pattern = (3 * _rng(7).standard_normal((7, BIG_C))).astype(np.float16)
    x = np.empty((BIG_N, BIG_C), np.float16)
    for k in range(7):
        x[k::7] = pattern[k]
    lab_pattern = _rng(8).integers(0, BIG_C, 7)
    labels = np.resize(lab_pattern, BIG_N)
    small_x = np.resize(pattern, (14, BIG_C))
    small_lab = np.resize(lab_pattern, 14)
    want = fastxent.cross_entropy(small_x, small_lab, reduction="none", num_threads=1)
    got = fastxent.cross_entropy(x, labels, reduction="none")
    assert got.shape == (BIG_N,)
    idx = np.r_[0:14, BIG_N - 14:BIG_N]
    assert got[idx].tobytes() == want[idx % 7].tobytes()
    # every row, cheaply: each of the 7 classes of rows holds one value
    for k in range(7):
        vals = got[k::7]
        assert np.all(vals == want[k]), f"rows {k}::7 differ"
    del got
    want_lse = fastxent.logsumexp(small_x, num_threads=1)
    got_lse = fastxent.logsumexp(x)
    for k in range(7):
        assert np.all(got_lse[k::7] == want_lse[k]), f"logsumexp rows {k}::7 differ"


@pytest.mark.slow
def test_more_than_2_31_elements_in_one_row():
    """float32 logits of shape (1, 2**31 + 64): one row past 2**31 elements.

    Memory: the logits, 8.6 GB (float32 is used as is, no copy); skipped
    unless MemAvailable has 9 GiB.  The row is split over threads (one row,
    several threads); the last elements, past 2**31, must count.
    """
    need_memory(9 * 2**30)
    c = 2**31 + 64
    x = np.zeros((1, c), np.float32)
    x[0, -1] = 30.0  # e**30 dwarfs the 2**31 ones: lse ~ 30 + log1p(2**31 / e**30)
    want = 30.0 + np.log1p((c - 1) / np.exp(30.0))
    got = fastxent.logsumexp(x)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-6)
    loss = fastxent.cross_entropy(x, np.array([c - 1]))
    np.testing.assert_allclose(float(loss), want - 30.0, rtol=1e-4, atol=1e-6)
    loss2 = fastxent.cross_entropy(x, np.array([c - 2]))
    np.testing.assert_allclose(float(loss2), want, rtol=1e-6)
