"""fastxent.dask: losses over Dask arrays chunked along rows and classes.

The oracle is ``fastxent.reference`` (and ``fastxent`` itself) on the whole
array in memory. A ``dask.distributed.LocalCluster`` of 2 worker processes
checks the same answers off the client's process, and that logits larger
than a memory budget are processed within it (peak RSS of the workers).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import fastxent  # noqa: E402
from fastxent import reference  # noqa: E402

fxd = pytest.importorskip("fastxent.dask")

N, C = 120, 257
CHUNKINGS = {
    "rows": (32, C),
    "rows+classes": (50, 64),
    "uneven": ((7, 100, 13), (100, 1, 156)),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, C)) * 2).astype(np.float32)
    y = rng.integers(0, C, N)
    x[np.arange(0, N, 2), y[::2]] += 4  # some rows right, for accuracy
    y[::9] = -100
    w = rng.uniform(0.1, 2, C).astype(np.float32)
    t = rng.dirichlet(np.ones(C), N)
    return x, y, w, t


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("opts", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                  {"weight": True, "label_smoothing": 0.2},
                                  {"ignore_index": 5, "base": 2}],
                         ids=["mean", "sum", "none", "weight+smoothing", "ignore+base"])
def test_cross_entropy(data, chunks, opts):
    x, y, w, _ = data
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = w
    if "ignore_index" in opts:
        y = np.where(y == -100, opts["ignore_index"], y)
    res = fxd.cross_entropy(da.from_array(x, chunks=chunks), y, **opts)
    assert isinstance(res, da.Array)
    got = res.compute()
    ref = reference.cross_entropy(x, y, **opts)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got, fastxent.cross_entropy(x, y, **opts), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_metrics(data, chunks):
    x, y, _, t = data
    X = da.from_array(x, chunks=chunks)
    counted = y != -100
    assert fxd.accuracy(X, y).compute() == np.mean(x.argmax(1)[counted] == y[counted])
    np.testing.assert_allclose(fxd.perplexity(X, y).compute(),
                               np.exp(reference.cross_entropy(x, y)), rtol=2e-6)
    np.testing.assert_allclose(fxd.log_loss(X, y).compute(), reference.cross_entropy(x, y),
                               rtol=2e-6)
    np.testing.assert_allclose(fxd.entropy(X, base=2).compute(), reference.entropy(x, base=2),
                               rtol=2e-6, atol=1e-6)
    for kind, target in (("probs", t), ("logits", x[::-1].copy())):
        np.testing.assert_allclose(
            fxd.kl_div(X, da.from_array(target, chunks=chunks), target_kind=kind,
                       temperature=2.0).compute(),
            reference.kl_div(x, target, target_kind=kind, temperature=2.0), rtol=1e-5)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_metrics_in_one_pass(data, chunks):
    x, y, _, _ = data
    X = da.from_array(x, chunks=chunks)
    m = fxd.metrics(X, y)
    got = dict(zip(m, dask.compute(*m.values())))
    counted = y != -100
    np.testing.assert_allclose(got["cross_entropy"], reference.cross_entropy(x, y), rtol=2e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(reference.cross_entropy(x, y)), rtol=2e-6)
    assert got["accuracy"] == np.mean(x.argmax(1)[counted] == y[counted])
    assert got["accuracy"] == fxd.accuracy(X, y).compute()


def test_accuracy_ties_take_the_first_class_across_chunks():
    x = np.zeros((3, 6), np.float32)
    x[0, [1, 4]] = 1.0  # a tie across two class chunks
    x[1, 5] = 2.0
    y = np.array([1, 5, 0])
    X = da.from_array(x, chunks=(2, 3))
    assert fxd.accuracy(X, y).compute() == 1.0


def test_lazy_until_computed(data):
    x, y, _, _ = data
    calls = []

    def seen(block):
        calls.append(block.shape)
        return block

    X = da.from_array(x, chunks=(40, 100)).map_blocks(seen, meta=np.empty((0, 0), x.dtype))
    res = [fxd.cross_entropy(X, y), fxd.accuracy(X, y), fxd.entropy(X), fxd.perplexity(X, y)]
    assert calls == []
    dask.compute(*res, scheduler="sync")
    assert calls


def test_result_does_not_depend_on_the_scheduler(data):
    x, y, w, _ = data
    X = da.from_array(x, chunks=(8, 64))
    res = [fxd.cross_entropy(X, y, weight=w, label_smoothing=0.1),
           fxd.cross_entropy(X, y, reduction="sum", split_every=3), fxd.accuracy(X, y)]
    runs = [dask.compute(*res, scheduler="sync"),
            dask.compute(*res, scheduler="threads", num_workers=1),
            dask.compute(*res, scheduler="threads", num_workers=4)]
    for other in runs[1:]:
        assert [np.asarray(v).tobytes() for v in other] == [np.asarray(v).tobytes() for v in runs[0]]


def test_open_logits_npy_and_zarr(data, tmp_path):
    x, y, _, _ = data
    path = tmp_path / "logits.npy"
    np.save(path, x)
    budget = 4 * 20 * C * 4  # 20 rows per block
    X = fxd.open_logits(path, memory_budget=budget)
    assert X.chunks[0][0] == 20 and X.chunks[1] == (C,)
    assert X.shape == x.shape and X.dtype == x.dtype
    np.testing.assert_array_equal(X.compute(), x)
    np.testing.assert_allclose(fxd.cross_entropy(X, y).compute(), fastxent.cross_entropy(x, y),
                               rtol=2e-6)
    Xc = fxd.open_logits(str(path), memory_budget=budget, class_chunk=100)
    assert Xc.chunks[1] == (100, 100, 57) and Xc.chunks[0][0] == 4 * 20 * C * 4 // 4 // 400
    np.testing.assert_allclose(fxd.cross_entropy(Xc, y).compute(), reference.cross_entropy(x, y),
                               rtol=2e-6)

    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(str(tmp_path / "logits.zarr"), shape=x.shape, chunks=(16, 128),
                          dtype=x.dtype)
    z[:] = x
    Z = fxd.open_logits(str(tmp_path / "logits.zarr"), memory_budget=budget)
    assert Z.chunks[0][0] == 20
    np.testing.assert_allclose(fxd.accuracy(Z, y).compute(), fxd.accuracy(x, y).compute())


def test_bad_input(data, tmp_path):
    x, y, _, _ = data
    X = da.from_array(x, chunks=(40, C))
    with pytest.raises(ValueError, match="2-D"):
        fxd.cross_entropy(X[0], y[:1])
    with pytest.raises(ValueError, match="labels must have shape"):
        fxd.cross_entropy(X, y[:3])
    with pytest.raises(TypeError, match="integer"):
        fxd.accuracy(X, y.astype(float))
    with pytest.raises(ValueError, match="reduction"):
        fxd.cross_entropy(X, y, reduction="avg")
    with pytest.raises(ValueError, match="weight must have shape"):
        fxd.cross_entropy(X, y, weight=np.ones(3))
    with pytest.raises(ValueError, match="too small"):
        fxd.rows_per_chunk(1000, 4, 100)
    with pytest.raises(ValueError, match="must be positive"):
        fxd.rows_per_chunk(1000, 4, 0)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fxd.open_logits(bad)
    # a bad label is reported when the block holding it is computed
    yb = y.copy()
    yb[3] = C + 1
    with pytest.raises(ValueError, match=f"label {C + 1}"):
        fxd.cross_entropy(X, yb).compute(scheduler="sync")


# --------------------------------------------------------------------------
# A LocalCluster of 2 worker processes
# --------------------------------------------------------------------------

def _write_logits(path, n, c):
    """The example's writer (examples/perplexity_from_disk.py): a float32
    logits file written in row blocks, never whole in memory; its labels."""
    spec = importlib.util.spec_from_file_location(
        "perplexity_from_disk", Path(__file__).parent.parent / "examples" / "perplexity_from_disk.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.write_logits(path, n, c)


def _in_memory(path, labels, block=1024):
    """The in-memory answers, a block of rows at a time (the reference for
    files larger than this process should hold)."""
    x = np.load(path, mmap_mode="r")
    loss = np.concatenate([fastxent.cross_entropy(x[r:r + block], labels[r:r + block],
                                                  reduction="none") for r in range(0, len(x), block)])
    pred = np.concatenate([np.argmax(x[r:r + block], axis=1) for r in range(0, len(x), block)])
    return float(np.mean(loss, dtype=np.float64)), float(np.mean(pred == labels))


def _reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()


def _rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                fields[k] = int(v.split()[0]) * 1024
    return fields


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    if not os.path.exists("/proc/self/clear_refs"):  # pragma: no cover
        pytest.skip("needs Linux /proc to measure the workers' peak RSS")
    # No memory_limit: the test measures the workers' RSS itself, and a
    # limit near a worker's own footprint would pause it.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit=0, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            c.run(lambda: __import__("fastxent.dask"))
            yield c


def test_local_cluster_gives_the_in_memory_answers(client, data):
    x, y, w, _ = data
    X = da.from_array(x, chunks=(30, 100))
    opts = {"weight": w, "label_smoothing": 0.1}
    res = client.compute([fxd.cross_entropy(X, y, **opts), fxd.accuracy(X, y)], sync=True)
    np.testing.assert_allclose(res[0], reference.cross_entropy(x, y, **opts), rtol=2e-6)
    counted = y != -100
    assert res[1] == np.mean(x.argmax(1)[counted] == y[counted])
    local = dask.compute(fxd.cross_entropy(X, y, **opts), scheduler="sync")[0]
    assert np.asarray(res[0]).tobytes() == np.asarray(local).tobytes()


def _within_budget(client, tmp_path, n, c, budget):
    path = tmp_path / "big.npy"
    labels = _write_logits(path, n, c)
    size = os.path.getsize(path)
    assert size > 2 * budget
    X = fxd.open_logits(path, memory_budget=budget)
    assert X.numblocks[0] >= 4
    before = client.run(_reset_peak_rss)
    m = fxd.metrics(X, labels)  # both from one read of each block
    loss, acc = client.compute([m["cross_entropy"], m["accuracy"]], sync=True)
    after = client.run(_rss)
    peaks = {wk: after[wk]["VmHWM"] - before[wk]["VmRSS"] for wk in after}
    print(f"{size / 2**20:.0f} MiB of logits, budget {budget / 2**20:.0f} MiB, blocks of "
          f"{X.chunks[0][0]} rows: workers' peak RSS growth "
          f"{sorted(round(v / 2**20, 1) for v in peaks.values())} MiB")
    assert max(peaks.values()) < budget, (peaks, budget)
    want_loss, want_acc = _in_memory(path, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert acc == want_acc
    return peaks


def test_file_larger_than_the_budget(client, tmp_path):
    """256 MiB of logits under a 64 MiB budget: each worker's peak RSS grows by
    less than the budget, and the answers are the in-memory ones."""
    _within_budget(client, tmp_path, 4096, 16384, 64 << 20)


@pytest.mark.slow
def test_2gb_file_under_512mb(client, tmp_path):
    _within_budget(client, tmp_path, 16384, 32768, 512 << 20)
