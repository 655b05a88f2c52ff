"""Vocabulary-parallel cross entropy: 2 ranks x 1 thread vs 1 process x 2 threads.

Group ``vocab_parallel 4096x128256 float32``, loss and gradient of float32
logits of shape (4096, 128256) (2.1 GB), two contenders:

- ``2ranks-1thread``: two gloo ranks on this machine, each holding half of
  the vocabulary (4096 x 64128) with one thread, running
  ``fastxent.torch.distributed.vocab_parallel_cross_entropy`` and
  ``loss.backward()`` (two all-reduces of 4096-row buffers in forward, none
  in backward). The ranks are started once; a round is one step on both,
  timed from the client's "go" to the last rank's "done".
- ``1process-2threads``: ``fastxent.cross_entropy_with_grad`` over the whole
  logits with two threads, the gradient in a fresh array (as autograd makes
  one).

``extra_info`` records each rank's (or the process's) peak resident memory
(VmHWM) and its growth during the rounds (VmHWM reset, with the logits
already in memory, before them), in bytes. Few rounds:
one call takes about a second and moves gigabytes.

    flock /tmp/fx-bench.lock python -m pytest benchmarks/test_bench_dist.py \
        --benchmark-only --benchmark-columns=median,iqr
"""
from __future__ import annotations

import numpy as np
import pytest

import fastxent

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

N, C = 4096, 128256
ROUNDS = 3
GROUP = f"vocab_parallel {N}x{C} float32"


def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()["VmRSS"]


def _labels():
    return np.random.default_rng(1).integers(0, C, N)


def _rank(rank, world, init, go, done):
    """One rank: its half of the vocabulary, one step per message on go."""
    from datetime import timedelta

    torch.set_num_threads(1)
    fastxent.set_num_threads(1)
    from fastxent.torch.distributed import vocab_parallel_cross_entropy

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    c_local = C // world
    x = np.random.default_rng(10 + rank).standard_normal((N, c_local), dtype=np.float32)
    y = torch.from_numpy(_labels())
    base = _reset_peak()
    while True:
        msg = go.get()
        if msg == "stop":
            break
        local = torch.from_numpy(x).requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, y)
        loss.backward()
        del local, loss
        rss = _rss()
        done.put((rank, (rss["VmHWM"] - base, rss["VmHWM"])))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ctx = torch.multiprocessing.get_context("spawn")
    init = f"file://{tmp_path_factory.mktemp('rdv') / 'rendezvous'}"
    gos = [ctx.Queue() for _ in range(2)]
    done = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, init, gos[r], done), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        yield gos, done
    finally:
        for g in gos:
            g.put("stop")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.mark.benchmark(group=GROUP)
def test_2ranks_1thread(benchmark, ranks):
    gos, done = ranks
    peaks = {}

    def step():
        for g in gos:
            g.put("go")
        for _ in gos:
            rank, peak = done.get(timeout=300)
            peaks[rank] = peak

    step()  # warm-up: first touch of the ranks' gradients, gloo connections
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(contender="2ranks-1thread", shape=[N, C], dtype="float32",
                                threads_per_rank=1, isa=fastxent._core.get_isa(),
                                peak_rss_growth_per_rank=[peaks[r][0] for r in sorted(peaks)],
                                peak_rss_per_rank=[peaks[r][1] for r in sorted(peaks)])


@pytest.mark.benchmark(group=GROUP)
def test_1process_2threads(benchmark):
    x = np.random.default_rng(10).standard_normal((N, C), dtype=np.float32)
    y = _labels()
    fastxent.cross_entropy_with_grad(x, y, num_threads=2)  # warm-up
    base = _reset_peak()
    benchmark.pedantic(lambda: fastxent.cross_entropy_with_grad(x, y, num_threads=2),
                       rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(contender="1process-2threads", shape=[N, C], dtype="float32",
                                threads=2, isa=fastxent._core.get_isa(),
                                peak_rss_growth=_rss()["VmHWM"] - base, peak_rss=_rss()["VmHWM"],
                                logits_bytes=x.nbytes)
