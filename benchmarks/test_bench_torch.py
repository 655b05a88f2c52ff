"""fastxent.torch against torch.nn.functional: training-step time and memory.

Groups:

- ``torch cross_entropy fwd+bwd <N>x<C> <dtype> <T>thread``: one forward and
  backward of the mean cross entropy of int64 labels. Contenders:
  ``fastxent.torch`` (``fastxent.torch.cross_entropy``), ``fastxent.torch-inplace``
  (the same with ``inplace_backward=True``; large shapes only) and ``torch``
  (``F.cross_entropy``). On the large shapes the logits are a fresh non-leaf
  tensor made before each timed round (untimed, so that the in-place
  contender has one to overwrite); the gradient w.r.t. them is computed and
  dropped. On (8, 10) the logits are a leaf whose ``.grad`` is reset each
  call: that group measures per-call overhead.
- ``torch train step peak memory 4096x32000 float32``: one training step of
  an embedding (32000 x 256), a linear layer to 32000 classes and the loss,
  then ``backward()``, over 4096 tokens. ``extra_info["peak_bytes"]`` is the
  growth of the process's resident-memory high-water mark during the step
  (Linux: ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``),
  ``extra_info["logits_bytes"]`` the size of one N x C float32 tensor.
  fastxent.torch's cache of gradient buffers is emptied before each step,
  so the peak includes the loss's gradient as a fresh allocation.

Run (few rounds; the 2-core machines are shared)::

    flock /tmp/fx-bench.lock python -m pytest benchmarks/test_bench_torch.py \\
        --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr
"""
import gc
import os

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
ft = pytest.importorskip("fastxent.torch")

import fastxent  # noqa: E402

SHAPES = ((8, 10), (8192, 1000), (4096, 32000), (512, 128256))
DTYPES = ("float32", "bfloat16")
THREADS = (1, 2)
LARGE = 1 << 20  # from this many elements: pedantic rounds with an untimed setup
ROUNDS = int(os.environ.get("FASTXENT_BENCH_TORCH_ROUNDS", 3))

CONTENDERS = {
    "fastxent.torch": ft.cross_entropy,
    "fastxent.torch-inplace": lambda x, y: ft.cross_entropy(x, y, inplace_backward=True),
    "torch": F.cross_entropy,
}


class _Fresh(torch.autograd.Function):
    """A copy of ``src`` as a non-leaf tensor requiring grad, whose backward
    costs nothing: the logits a model's last layer would produce."""

    @staticmethod
    def forward(ctx, handle, src):
        return src.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


@pytest.fixture(scope="module")
def handle():
    return torch.zeros((), requires_grad=True)


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(20240601 + sum(shape))
    x = (3 * torch.randn(shape, generator=g)).to(getattr(torch, dtype))
    y = torch.randint(0, shape[1], shape[:1], generator=g)
    return x, y


def _info(benchmark, shape, dtype, threads, contender):
    benchmark.group = (f"torch cross_entropy fwd+bwd {shape[0]}x{shape[1]} {dtype} "
                       f"{threads}thread")
    benchmark.extra_info.update(function="torch cross_entropy fwd+bwd", contender=contender,
                                shape=list(shape), dtype=dtype, threads=threads,
                                isa=fastxent._core.get_isa())


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}thread")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy_fwd_bwd(benchmark, handle, shape, dtype, threads, contender):
    large = shape[0] * shape[1] >= LARGE
    if contender.endswith("inplace") and not large:
        pytest.skip("in place needs a fresh non-leaf input: large shapes only")
    fn = CONTENDERS[contender]
    x, y = _inputs(shape, dtype)
    _info(benchmark, shape, dtype, threads, contender)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if large:
            def setup():
                return (_Fresh.apply(handle, x), y), {}

            def step(logits, y):
                loss = fn(logits, y)
                loss.backward()
                return loss

            loss = benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=1)
        else:
            leaf = x.clone().requires_grad_(True)

            def step():
                leaf.grad = None
                loss = fn(leaf, y)
                loss.backward()
                return loss

            loss = benchmark(step)
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(loss)


# --------------------------------------------------------------- peak memory

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_train_step_peak_memory(benchmark, contender):
    n, c, hidden = 4096, 32000, 256
    torch.manual_seed(0)
    emb = torch.nn.Embedding(c, hidden)
    head = torch.nn.Linear(hidden, c)
    ids = torch.randint(0, c, (n,))
    y = torch.randint(0, c, (n,))
    loss_fn = CONTENDERS[contender]
    peaks = []

    def step():
        emb.zero_grad(set_to_none=False)  # gradients allocated once, before the peak
        head.zero_grad(set_to_none=False)
        ft.empty_cache()  # the step's own gradient counts in its peak
        gc.collect()
        base = _status("VmRSS")
        _reset_peak()
        loss = loss_fn(head(emb(ids)), y)
        loss.backward()
        peaks.append(_status("VmHWM") - base)
        return loss

    step()  # gradients of the parameters exist from here on
    benchmark.group = "torch train step peak memory 4096x32000 float32"
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update(function="torch train step", contender=contender,
                                shape=[n, c], dtype="float32", hidden=hidden,
                                threads=torch.get_num_threads(),
                                peak_bytes=min(peaks[1:]), logits_bytes=n * c * 4)
    assert torch.isfinite(loss)
