"""fastxent.torch.distributed: vocabulary-parallel cross entropy with real
processes (gloo on CPU, a file:// rendezvous in a temporary directory).

Every rank builds the same full logits from a seed, takes its slice, and
checks the loss and its slice of the gradient against single-process
``torch.nn.functional.cross_entropy`` on the full logits. Each test starts
its ranks with ``spawn``, waits for them with a deadline, and kills any rank
still running after it: no test can hang.
"""
from __future__ import annotations

import os
import time
import traceback
import zlib
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

DEADLINE_S = 120.0
GROUP_TIMEOUT_S = 5.0

# (name, dtype, N, C, options); the ranks' slices are set per run.
CASES = [
    ("float32", torch.float32, 13, 50, {}),
    ("float64-sum", torch.float64, 9, 50, {"reduction": "sum"}),
    ("ignore", torch.float32, 16, 50, {"ignore_index": 7}),
    ("weight", torch.float64, 11, 50, {"weight": True}),
    ("weight-smoothing-none", torch.float64, 10, 50,
     {"weight": True, "label_smoothing": 0.2, "reduction": "none"}),
    ("smoothing", torch.float32, 12, 50, {"label_smoothing": 0.1}),
    ("bfloat16", torch.bfloat16, 8, 50, {}),
    ("3d", torch.float32, (3, 4), 50, {}),
]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2}


def _check_case(rank, world, bounds, name, dtype, n, c, opts):
    from fastxent.torch.distributed import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = n if isinstance(n, tuple) else (n,)
    full = (torch.randn(*shape, c, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, c, shape, generator=gen)
    opts = dict(opts)
    ii = opts.get("ignore_index", -100)
    target.view(-1)[::4] = ii
    if opts.get("weight"):
        opts["weight"] = torch.rand(c, generator=gen, dtype=torch.float64).to(
            torch.float32 if dtype == torch.bfloat16 else dtype) + 0.1
    else:
        opts.pop("weight", None)
    reduction = opts.get("reduction", "mean")
    upstream = (torch.rand(shape, generator=gen, dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.7, dtype=torch.float64)).to(dtype)

    ref_in = full.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_in.reshape(-1, c).float()
                                            if dtype == torch.bfloat16 else ref_in.reshape(-1, c),
                                            target.reshape(-1), **opts)
    ref = ref.reshape(shape) if reduction == "none" else ref
    ref.backward(upstream.to(ref.dtype))

    if bounds is None:  # even slices, layout inferred from the rank
        step = c // world
        v0, v1, kw = rank * step, (rank + 1) * step, {}
    else:
        v0, v1 = bounds[rank], bounds[rank + 1]
        kw = {"vocab_start": v0}
    local = full[..., v0:v1].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, **kw, **opts)
    assert loss.dtype == dtype, (loss.dtype, dtype)
    loss.backward(upstream)
    tol = TOL[dtype]
    np.testing.assert_allclose(loss.detach().double().numpy(), ref.detach().double().numpy(),
                               rtol=tol, atol=tol, err_msg=f"{name}: loss on rank {rank}")
    want = ref_in.grad[..., v0:v1].double()
    np.testing.assert_allclose(local.grad.double().numpy(), want.numpy(), rtol=0,
                               atol=tol * float(ref_in.grad.abs().max()),
                               err_msg=f"{name}: gradient on rank {rank}")


def _check_uneven_needs_vocab_start(rank):
    from fastxent.torch.distributed import vocab_parallel_cross_entropy

    c_local = 10 + rank  # slices of different sizes, and no vocab_start
    try:
        vocab_parallel_cross_entropy(torch.zeros(4, c_local), torch.zeros(4, dtype=torch.long))
    except ValueError as exc:
        assert "vocab_start" in str(exc), exc
    else:
        raise AssertionError("uneven slices without vocab_start gave no error")


def _worker(rank, world, init, mode, bounds, queue):
    """One rank: join the group, run the checks of ``mode``, report to queue."""
    try:
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        if mode == "cases":
            # bounds: explicit slices; None: even slices inferred from the rank
            for layout in (bounds, None):
                for case in CASES:
                    if layout is None and case[3] % world:
                        continue
                    _check_case(rank, world, layout, *case)
            _check_uneven_needs_vocab_start(rank)
            queue.put((rank, "ok"))
        elif mode in ("die", "stall"):
            from fastxent.torch.distributed import vocab_parallel_cross_entropy

            dist.barrier()
            if rank == 1 and mode == "stall":
                # Alive but never making the call: rank 0 waits out the timeout.
                time.sleep(GROUP_TIMEOUT_S + 5)
                os._exit(0)
            if rank == 1:
                # Die in the middle of the call: after the MAX all-reduce,
                # before the SUM one.
                real = dist.all_reduce

                def dying(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
                    if op == dist.ReduceOp.SUM:
                        os._exit(3)
                    return real(tensor, op=op, group=group, async_op=async_op)

                dist.all_reduce = dying
            t0 = time.monotonic()
            try:
                vocab_parallel_cross_entropy(torch.randn(8, 25), torch.randint(0, 50, (8,)))
                queue.put((rank, "no error"))
            except RuntimeError as exc:
                queue.put((rank, f"RuntimeError after {time.monotonic() - t0:.1f}s: {exc}"))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def _run(world, mode, tmp_path, bounds=None, expect=None):
    """Start ``world`` ranks, gather one report per rank (those in ``expect``,
    a rank count, may be fewer), and kill anything left at the deadline."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, mode, bounds, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(reports) < (expect or world) and time.monotonic() < deadline:
            try:
                rank, msg = queue.get(timeout=1.0)
                reports[rank] = msg
            except Exception:  # queue.Empty
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(3.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return reports


@pytest.mark.parametrize("world, bounds", [(2, [0, 17, 50]), (4, [0, 1, 20, 21, 50])],
                         ids=["2-ranks", "4-ranks"])
def test_equals_single_process_torch(world, bounds, tmp_path):
    """Uneven explicit slices and even inferred ones, every case of CASES."""
    reports = _run(world, "cases", tmp_path, bounds)
    assert reports == {r: "ok" for r in range(world)}, reports


@pytest.mark.parametrize("mode", ["die", pytest.param("stall", marks=pytest.mark.slow)])
def test_a_rank_dying_or_stalling_fails_the_others(mode, tmp_path):
    """die: rank 1 exits between the two all-reduces (its peer sees the
    connection drop); stall: rank 1 never calls (the group's timeout)."""
    t0 = time.monotonic()
    reports = _run(2, mode, tmp_path, expect=1)
    assert 1 not in reports, reports  # rank 1 left without a word
    msg = reports.get(0, "")
    assert msg.startswith("RuntimeError"), reports
    assert "all-reduce" in msg and "failed on rank 0" in msg, msg
    elapsed = float(msg.split("after ")[1].split("s:")[0])
    assert elapsed < GROUP_TIMEOUT_S + 10, msg
    if mode == "stall":
        assert elapsed >= GROUP_TIMEOUT_S * 0.8, msg
    assert time.monotonic() - t0 < DEADLINE_S


def test_needs_a_process_group():
    from fastxent.torch.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_bad_arguments():
    from fastxent.torch.distributed import vocab_parallel_cross_entropy

    with pytest.raises(ValueError, match="target must have the shape"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                                     reduction="avg")
    with pytest.raises(TypeError, match="torch tensors"):
        vocab_parallel_cross_entropy(np.zeros((2, 3)), torch.zeros(2, dtype=torch.long))
