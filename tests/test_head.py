"""linear_cross_entropy: against the float64 oracle, torch's
F.linear_cross_entropy (values and gradients w.r.t. input, weight and bias),
finite differences, determinism over thread counts, memory, errors."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import EPS32, assert_bitwise_equal, assert_close, grad_scale

import fastxent
from fastxent import reference
from fastxent._head import chunk_rows

pytest.importorskip("threadpoolctl")

OPTIONS = [
    {},
    {"class_weight": "random"},
    {"label_smoothing": 0.1, "class_weight": "random"},
    {"reduction": "sum", "ignore": True},
    {"reduction": "none", "ignore": True},
    {"z_loss": 1e-2},
    {"softcap": 4.0, "z_loss": 1e-3, "sample_weight": "random", "ignore": True},
    {"sample_weight": "random", "class_weight": "random", "reduction": "mean"},
    {"n_valid": 50.0, "z_loss": 1e-2, "ignore": True},
    {"base": 2.0, "label_smoothing": 0.2},
]


def _problem(rng, n, d, v, dtype, ignore=False, bias=True):
    h = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((v, d)) / np.sqrt(d) * 3).astype(dtype)
    b = rng.standard_normal(v).astype(dtype) if bias else None
    y = rng.integers(0, v, n)
    if ignore:
        y[::5] = -100
    return h, w, b, y


def _options(opts, rng, n, v):
    kw = {k: val for k, val in opts.items() if k != "ignore"}
    if kw.get("class_weight") == "random":
        kw["class_weight"] = rng.random(v) + 0.5
    if kw.get("sample_weight") == "random":
        kw["sample_weight"] = rng.random(n) * 2
    return kw


def _check(got, ref, compute, what):
    loss, *grads = got
    rloss, *rgrads = ref
    assert_close(loss, rloss, compute, ulps=64, what=f"{what} loss")
    for name, g, r in zip(("d_hidden", "d_weight", "d_bias"), grads, rgrads):
        assert g.shape == np.shape(r)
        assert_close(g, r, compute, ulps=64, scale=grad_scale(r, 1e-30), rtol64=1e-11,
                     what=f"{what} {name}")


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_against_reference(rng, opts, dtype, chunk_size):
    n, d, v = 41, 24, 130
    h, w, b, y = _problem(rng, n, d, v, dtype, opts.get("ignore", False))
    kw = _options(opts, rng, n, v)
    ref = reference.linear_cross_entropy_with_grad(h, w, y, bias=b, **kw)
    got = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_size=chunk_size, **kw)
    _check(got, ref, dtype, str(opts))
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    loss_only = fastxent.linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk_size, **kw)
    assert_close(loss_only, ref[0], dtype, ulps=64, what="loss without gradient")


def test_no_bias_and_batch_shape(rng):
    h, w, _, y = _problem(rng, 24, 16, 50, np.float64, bias=False)
    h3, y3 = h.reshape(2, 3, 4, 16), y.reshape(2, 3, 4)
    loss, dh, dw = fastxent.linear_cross_entropy_with_grad(h3, w, y3, chunk_size=5)
    rl, rdh, rdw = reference.linear_cross_entropy_with_grad(h, w, y)
    assert dh.shape == h3.shape
    assert_close(loss, rl, np.float64)
    assert_close(dh.reshape(h.shape), rdh, np.float64, scale=grad_scale(rdh, 0))
    assert_close(dw, rdw, np.float64, scale=grad_scale(rdw, 0))


def test_stats(rng):
    h, w, b, y = _problem(rng, 33, 8, 40, np.float64, ignore=True)
    sw = rng.random(33)
    for reduction in ("mean", "none"):
        kw = dict(bias=b, z_loss=1e-2, sample_weight=sw, reduction=reduction, return_stats=True)
        *_, stats = fastxent.linear_cross_entropy_with_grad(h, w, y, chunk_size=8, **kw)
        _, ref_stats = reference.linear_cross_entropy(h, w, y, **kw)
        for name in ("lse", "z_loss", "accuracy"):
            assert_close(getattr(stats, name), getattr(ref_stats, name), np.float64, what=name)
        np.testing.assert_array_equal(stats.argmax, ref_stats.argmax)


def test_finite_differences(rng):
    n, d, v = 6, 5, 9
    h, w, b, y = _problem(rng, n, d, v, np.float64, ignore=True)
    kw = dict(z_loss=0.05, softcap=3.0, label_smoothing=0.1, sample_weight=rng.random(n))
    _, dh, dw, db = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_size=4, **kw)

    def f(h_, w_, b_):
        return float(fastxent.linear_cross_entropy(h_, w_, y, bias=b_, chunk_size=4, **kw))

    step = 1e-5
    for arr, grad, which in ((h, dh, 0), (w, dw, 1), (b, db, 2)):
        fd = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            args_p, args_m = [h.copy(), w.copy(), b.copy()], [h.copy(), w.copy(), b.copy()]
            args_p[which][i] += step
            args_m[which][i] -= step
            fd[i] = (f(*args_p) - f(*args_m)) / (2 * step)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------- torch

torch = None


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("opts", [
    {},
    {"ignore_index": -100},
    {"label_smoothing": 0.15},
    {"weight": True, "label_smoothing": 0.05},
    {"reduction": "sum"},
    {"reduction": "none"},
], ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")
def test_against_torch(rng, opts, chunked):
    torch = _torch()
    F = torch.nn.functional
    n, d, v = 37, 16, 90
    h, w, b, y = _problem(rng, n, d, v, np.float64, ignore=True)
    cw = rng.random(v) + 0.5 if opts.get("weight") else None
    reduction = opts.get("reduction", "mean")
    eps = opts.get("label_smoothing", 0.0)
    th, tw, tb = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    loss = F.linear_cross_entropy(th, tw, torch.tensor(y), linear_bias=tb,
                                  weight=None if cw is None else torch.tensor(cw),
                                  reduction=reduction, ignore_index=-100, label_smoothing=eps,
                                  options=options)
    g_out = rng.standard_normal(n) if reduction == "none" else 1.0
    # Liger #968: reduction="none" with a per-row grad_output must weigh
    # each row's contribution to the weight gradient by its grad_output.
    loss.backward(torch.tensor(g_out) if reduction == "none" else None)
    got = fastxent.linear_cross_entropy_with_grad(
        h, w, y, bias=b, class_weight=cw, reduction=reduction, label_smoothing=eps,
        grad_output=g_out, chunk_size=8)
    assert_close(got[0], loss.detach().numpy(), np.float64, rtol64=1e-10, what="loss")
    for g, t, name in zip(got[1:], (th.grad, tw.grad, tb.grad), ("hidden", "weight", "bias")):
        ref = t.numpy()
        assert_close(g, ref, np.float64, scale=grad_scale(ref, 0), rtol64=1e-10, what=name)


def test_against_torch_float32(rng):
    torch = _torch()
    n, d, v = 64, 32, 500
    h, w, b, y = _problem(rng, n, d, v, np.float32, ignore=True)
    th, tw = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    loss = torch.nn.functional.linear_cross_entropy(th, tw, torch.tensor(y))
    loss.backward()
    got = fastxent.linear_cross_entropy_with_grad(h, w, y)
    assert_close(got[0], loss.item(), np.float32, ulps=64)
    for g, t in ((got[1], th.grad), (got[2], tw.grad)):
        assert_close(g, t.numpy(), np.float32, ulps=256, scale=grad_scale(t.numpy(), 0))


# -------------------------------------------------------------------- 16-bit

@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_16bit(rng, name):
    if name == "bfloat16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype(np.float16)
    h, w, b, y = _problem(rng, 40, 16, 70, dt, ignore=True)
    loss, dh, dw, db = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, z_loss=1e-3,
                                                               chunk_size=6)
    assert (dh.dtype, dw.dtype, db.dtype) == (dt, dt, dt)
    assert loss.dtype == np.float32
    # The exact float32 result on the 16-bit values, rounded once to 16 bits.
    ref = reference.linear_cross_entropy_with_grad(h.astype(np.float64), w.astype(np.float64), y,
                                                   bias=b.astype(np.float64), z_loss=1e-3)
    assert_close(loss, ref[0], np.float32, ulps=64)
    rel = 2.0**-8 if name == "bfloat16" else 2.0**-11
    for g, r in zip((dh, dw, db), ref[1:]):
        s = grad_scale(r, 0)
        assert np.max(np.abs(g.astype(np.float64) - r)) <= 2 * rel * s


# ------------------------------------------------------------- determinism

def test_same_bits_for_any_thread_count(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    h, w, b, y = _problem(rng, 700, 96, 1500, np.float32, ignore=True)
    results = []
    for nt in (1, 2, 3):
        results.append(fastxent.linear_cross_entropy_with_grad(
            h, w, y, bias=b, num_threads=nt, chunk_size=256, z_loss=1e-3))
    with threadpoolctl.threadpool_limits(1):
        results.append(fastxent.linear_cross_entropy_with_grad(
            h, w, y, bias=b, num_threads=None, chunk_size=256, z_loss=1e-3))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert_bitwise_equal(a, c, "thread counts")


def test_blas_runs_one_thread_per_block_and_is_restored(rng, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import fastxent._head as head

    def blas_threads():
        return [m["num_threads"] for m in threadpoolctl.threadpool_info() if m["user_api"] == "blas"]

    seen, workers = [], set()
    original = head._forward_block

    def spy(*args):
        seen.extend(blas_threads())
        workers.add(threading.current_thread().name)
        return original(*args)

    before = blas_threads()
    monkeypatch.setattr(head, "_forward_block", spy)
    h, w, _, y = _problem(rng, 20, 8, 3000, np.float32)
    fastxent.linear_cross_entropy_with_grad(h, w, y, num_threads=2)
    assert seen and set(seen) == {1}
    assert len(workers) >= 1 and all(name.startswith("fastxent-head") for name in workers)
    assert blas_threads() == before


# ------------------------------------------------------------------ memory

def test_chunk_rows_depend_on_vocabulary_only():
    assert chunk_rows(8192, 128256, np.float32) == 256
    assert chunk_rows(8192, 32000, np.float32) == 1024
    assert chunk_rows(8192, 256000, np.float32) == 128
    assert chunk_rows(100, 32000, np.float32) == 100
    assert chunk_rows(8192, 10, np.float32, 64) == 64


def test_peak_memory_is_independent_of_rows(rng):
    # N x V logits would be 64 MB; the chunk buffer is 64 x V x 4 = 1 MB.
    n, d, v, chunk = 4096, 16, 4000, 64
    h, w, _, y = _problem(rng, n, d, v, np.float32, bias=False)
    fastxent.linear_cross_entropy_with_grad(h[:128], w, y[:128], chunk_size=chunk)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        res = fastxent.linear_cross_entropy_with_grad(h, w, y, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = res[1].nbytes + res[2].nbytes
    extra = peak - base - outputs
    assert extra < 3 * chunk * v * 4 + 64 * n, extra
    assert extra < n * v * 4 / 10


def test_peak_rss_is_independent_of_rows():
    # ru_maxrss in a fresh process: the growth of the peak over the inputs
    # and outputs stays near the chunk buffer, far below the logits (256 MB).
    code = textwrap.dedent("""
        import resource, numpy as np, fastxent
        n, d, v = 8192, 8, 8192
        rng = np.random.default_rng(0)
        h = rng.standard_normal((n, d), dtype=np.float32)
        w = rng.standard_normal((v, d), dtype=np.float32)
        y = rng.integers(0, v, n)
        dh = np.ones((n, d), np.float32); dw = np.ones((v, d), np.float32)
        fastxent.linear_cross_entropy_with_grad(h[:64], w, y[:64], chunk_size=64)
        del dh, dw
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fastxent.linear_cross_entropy_with_grad(h, w, y, chunk_size=64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = int(out.stdout.split()[-1])
    assert extra < 40 * 2**20, extra  # logits: 256 MiB; buffer 2 MiB; BLAS buffers a few MiB


# ------------------------------------------------------------------ errors

def test_errors(rng):
    h, w, b, y = _problem(rng, 8, 4, 10, np.float32)
    f = fastxent.linear_cross_entropy_with_grad
    cases = [
        (dict(weight=w[:, :3]), "D = 4"),
        (dict(bias=b[:9]), r"bias must have shape \(10,\)"),
        (dict(labels=np.where(np.arange(8) == 3, 10, y)), "label 10 at position"),
        (dict(softcap=0.0), "softcap must be a positive finite number, got 0.0"),
        (dict(softcap=-1.0), "softcap"),
        (dict(z_loss=-0.5), "z_loss must be a finite number >= 0, got -0.5"),
        (dict(sample_weight=np.full(8, -1.0)), "sample_weight must be finite and non-negative"),
        (dict(sample_weight=np.full(8, np.inf)), "sample_weight"),
        (dict(sample_weight=np.ones(7)), "sample_weight must have the batch shape"),
        (dict(n_valid=0), "n_valid must be a positive finite number"),
        (dict(n_valid=3, reduction="sum"), "n_valid is the denominator"),
        (dict(class_weight=np.ones(9)), "weight must have shape"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(weight=w[0]), "weight must be 2-D"),
    ]
    for kw, match in cases:
        args = dict(hidden=h, weight=w, labels=y, bias=b)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            f(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
    with pytest.raises(TypeError, match="labels must be integer"):
        f(h, w, y.astype(np.float32))


def test_empty_batch(rng):
    _, w, b, _ = _problem(rng, 1, 4, 10, np.float64)
    loss, dh, dw, db = fastxent.linear_cross_entropy_with_grad(
        np.zeros((0, 4)), w, np.zeros(0, np.int64), bias=b)
    assert np.isnan(loss) and dh.shape == (0, 4)
    assert not dw.any() and not db.any()


def test_eps32_tolerance_is_meaningful():
    # The float32 tolerance above (64 ulp) is far below a wrong answer.
    assert 64 * EPS32 < 1e-5


def test_concurrent_calls_give_the_same_bits(rng):
    h, w, b, y = _problem(rng, 300, 64, 2000, np.float32)
    serial = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, num_threads=2)
    results = [None] * 3

    def work(i):
        results[i] = fastxent.linear_cross_entropy_with_grad(h, w, y, bias=b, num_threads=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        for a, c in zip(serial, res):
            assert_bitwise_equal(a, c, "concurrent calls")


def test_option_rows_run_on_the_heads_threads(monkeypatch, rng):
    """With an option the row kernel runs on the call's num_threads, not the
    default: at most num_threads cores are busy."""
    from fastxent import _core
    seen = []
    real = _core.run
    monkeypatch.setattr(_core, "run", lambda *a, **kw: seen.append(kw["num_threads"])
                        or real(*a, **kw))
    h = rng.standard_normal((6, 4)).astype(np.float32)
    w = rng.standard_normal((9, 4)).astype(np.float32)
    y = rng.integers(0, 9, 6)
    fastxent.linear_cross_entropy_with_grad(h, w, y, z_loss=1e-3, num_threads=1)
    assert seen and set(seen) == {1}
