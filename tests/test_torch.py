"""fastxent.torch against torch.nn.functional and torch.autograd.gradcheck.

Values and gradients are compared with torch's own functions computed in
float64 on the same (upcast) input; the tolerance is that of the input's
compute dtype (float32 for 16-bit inputs, whose results are rounded once to
16 bits). Every operator and option also passes ``gradcheck`` in float64.
"""
import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
ft = pytest.importorskip("fastxent.torch")
from fastxent.torch import _ops  # noqa: E402

try:
    import ml_dtypes  # noqa: F401
    DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
except ImportError:
    DTYPES = (torch.float32, torch.float64, torch.float16)

# Relative tolerance (of max(|ref|, scale)) per input dtype: a few ulp of
# the compute dtype, or one rounding to the 16-bit storage dtype.
RTOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def close(actual, expected, dtype, scale=1.0, what=""):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, what
    tol = RTOL[dtype] * torch.clamp(expected.abs(), min=scale)
    bad = ~((actual - expected).abs() <= tol)
    assert not bad.any(), f"{what}: max error {(actual - expected).abs().max().item():.3g}"


def gradcheck(fn, inputs):
    # fast mode: a random projection of the Jacobian (one column of
    # evaluations instead of one per element), enough to catch a wrong formula
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def gradgradcheck(fn, inputs):
    return torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.fixture(params=["eager", "operator"])
def path(request, monkeypatch):
    """Both ways a loss runs: EagerLoss in eager mode, or the torch.ops.fastxent
    operator (as under tracing) with its registered autograd formula."""
    monkeypatch.setattr(_ops, "EAGER_LOSSES", request.param == "eager")
    return request.param


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- layouts

def layout(logical, kind):
    """``logical`` (N, C, *extra) laid out in memory as ``kind`` (same values)."""
    if kind == "contiguous":
        return logical.clone()
    if kind == "channels_last":  # (N, C, H, W) with C the fastest dimension
        return logical.clone().contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # (N, C, T) viewed from a (N, T, C) buffer
        return logical.transpose(1, -1).contiguous().transpose(1, -1)
    if kind == "strided":  # every other element of a wider buffer
        wide = torch.full(logical.shape[:-1] + (2 * logical.shape[-1],), float("nan"),
                          dtype=logical.dtype)
        wide[..., ::2] = logical
        return wide[..., ::2]
    raise AssertionError(kind)


CE_SHAPES = {
    "contiguous": (7, 11),
    "strided": (7, 11),
    "permuted": (3, 11, 5),
    "channels_last": (2, 11, 3, 4),
}


def leaf(t):
    return t.detach().requires_grad_(True)


def run(fn, x, *args, grad_out=None, **kw):
    """(loss, d loss / d x) of fn(x, ...), x a fresh leaf."""
    x = leaf(x)
    loss = fn(x, *args, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss, grad


# ------------------------------------------------------------ cross entropy

CE_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"ignore_index": 1},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 2, "reduction": "mean"},
    {"weight": True, "reduction": "none", "label_smoothing": 0.3},
]


def ce_case(shape, dtype, opts, soft, seed=0):
    g = gen(seed)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    c = shape[1] if len(shape) > 1 else shape[0]
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    if soft:
        kw.pop("ignore_index", None)
        y = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1 if len(shape) > 1 else 0)
    else:
        bshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        y = torch.randint(0, c, bshape, generator=g)
        if "ignore_index" in kw:
            if y.dim():
                y.view(-1)[::3] = kw["ignore_index"]
            else:  # one row: keep it counted
                y = torch.tensor((kw["ignore_index"] + 1) % c)
    return x, y, kw


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probs"])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 2, 2), (5,)], ids=str)
def test_cross_entropy_gradcheck(shape, opts, soft, path):
    x, y, kw = ce_case(shape, torch.float64, opts, soft)
    assert gradcheck(lambda x: ft.cross_entropy(x, y, **kw), (leaf(x),))


@pytest.mark.parametrize("kind", list(CE_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probs"])
@pytest.mark.parametrize("opts", CE_OPTIONS[:4] + CE_OPTIONS[6:], ids=str)
def test_cross_entropy_matches_torch(opts, soft, dtype, kind):
    shape = CE_SHAPES[kind]
    logical, y, kw = ce_case(shape, dtype, opts, soft, seed=1)
    x = layout(logical, kind)
    assert torch.equal(x, logical) or torch.isnan(x).any() is False
    go = None
    if kw.get("reduction") == "none":
        go = torch.randn(y.shape[:1] + y.shape[2:] if soft else y.shape, generator=gen(2)).to(dtype)
    loss, grad = run(ft.cross_entropy, x, y, grad_out=go, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype
    kw64 = dict(kw)
    ref_loss, ref_grad = run(F.cross_entropy, x.double(), y, **kw64,
                             grad_out=None if go is None else go.double())
    close(loss, ref_loss, dtype, what="loss")
    close(grad, ref_grad, dtype, scale=ref_grad.abs().max().item(), what="grad")


def test_cross_entropy_upstream_gradient_and_retain_graph(path):
    x, y, _ = ce_case((6, 9), torch.float64, {}, False)
    x = leaf(x)
    loss = ft.cross_entropy(x, y)
    (3.0 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    ref = leaf(x)
    F.cross_entropy(ref, y).backward()
    close(first, 3 * ref.grad, torch.float64, what="3 * loss")
    close(x.grad, 4 * ref.grad, torch.float64, what="after a second backward")


def test_cross_entropy_no_grad_leaves_input_alone():
    x, y, _ = ce_case((6, 9), torch.float32, {}, False)
    before = x.clone()
    with torch.no_grad():
        loss = ft.cross_entropy(leaf(x), y, inplace_backward=True)
    assert torch.equal(x, before)
    close(loss, F.cross_entropy(x.double(), y), torch.float32)


def test_cross_entropy_edge_cases():
    x = leaf(torch.randn(4, 3, dtype=torch.float64))
    y = torch.full((4,), -100)
    loss = ft.cross_entropy(x, y)  # a mean over no counted label
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = ft.cross_entropy(torch.empty(0, 3), torch.empty(0, dtype=torch.long), reduction="sum")
    assert empty.item() == 0.0
    for dt in (torch.int32, torch.uint8):  # any integer dtype of class indices
        close(ft.cross_entropy(x, torch.tensor([0, 1, 2, 1], dtype=dt)),
              F.cross_entropy(x, torch.tensor([0, 1, 2, 1])), torch.float64)


# ------------------------------------------------------------------- in place

def model_logits(seed=0, n=8, c=10, dtype=torch.float64):
    g = gen(seed)
    h = torch.randn(n, 4, generator=g, dtype=dtype)
    w = leaf(torch.randn(c, 4, generator=g, dtype=dtype))
    return h, w


@pytest.mark.parametrize("fn,target", [
    (ft.cross_entropy, lambda x: torch.arange(x.shape[0]) % x.shape[1]),
    (ft.binary_cross_entropy_with_logits, lambda x: torch.rand(x.shape, dtype=x.dtype)),
    (ft.kl_div_with_logits, lambda x: torch.randn(x.shape, dtype=x.dtype)),
], ids=["cross_entropy", "bce", "kl_div_with_logits"])
def test_inplace_backward_matches(fn, target, path):
    h, w = model_logits()
    y = target(h @ w.T)
    grads = []
    for inplace in (False, True):
        w.grad = None
        logits = h @ w.T
        before = logits.detach().clone()
        loss = fn(logits, y, inplace_backward=inplace)
        assert torch.equal(logits, before) != inplace  # overwritten by the gradient
        (2 * loss).backward()
        grads.append((loss.detach(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_inplace_backward_through_a_temporary_view():
    h, w = model_logits(n=12)
    y = torch.arange(12) % 10
    loss = ft.cross_entropy((h @ w.T).view(3, 4, 10).view(12, 10), y, inplace_backward=True)
    loss.backward()
    ref = leaf(w)
    F.cross_entropy(h @ ref.T, y).backward()
    close(w.grad, ref.grad, torch.float64)


def test_inplace_backward_refusals():
    h, w = model_logits()
    y = torch.arange(8) % 10
    with pytest.raises(RuntimeError, match="leaf"):
        ft.cross_entropy(leaf(h @ w.T), y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="leaf"):
        ft.cross_entropy(leaf(h @ w.T).view(8, 10), y, inplace_backward=True)
    logits = h @ w.T
    extra = logits.pow(2).sum()  # PowBackward saved logits
    with pytest.raises(RuntimeError, match="saved for backward"):
        ft.cross_entropy(logits, y, inplace_backward=True)
    del extra
    probs = torch.sigmoid(h @ w.T)  # SigmoidBackward saved its output
    with pytest.raises(RuntimeError, match="saved for backward"):
        ft.binary_cross_entropy_with_logits(probs, torch.rand(8, 10, dtype=torch.float64),
                                            inplace_backward=True)
    logits3 = (h @ w.T).view(2, 4, 10)  # another view of the memory stays alive
    with pytest.raises(RuntimeError, match="another view"):
        ft.cross_entropy(logits3.view(8, 10), y, inplace_backward=True)
    loss = ft.cross_entropy(h @ w.T, y, inplace_backward=True)  # nothing else holds it
    loss.backward()


# ---------------------------------------------------------------------- KL

@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_torch_semantics(reduction, log_target):
    g = gen(3)
    x = torch.log_softmax(torch.randn(4, 6, 2, generator=g, dtype=torch.float64), 1)
    t = torch.softmax(torch.randn(4, 6, 2, generator=g, dtype=torch.float64), 1)
    if log_target:
        t = t.log()
    else:
        t[0, 0, 0] = 0.0  # 0 log 0 = 0
    assert gradcheck(lambda x: ft.kl_div(x, t, reduction=reduction,
                                                        log_target=log_target), (leaf(x),))
    kw = dict(reduction=reduction, log_target=log_target)
    go = torch.randn(x.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    loss, grad = run(ft.kl_div, x, t, grad_out=go, **kw)
    ref_loss, ref_grad = run(F.kl_div, x, t, grad_out=go, **kw)
    close(loss, ref_loss, torch.float64)
    close(grad, ref_grad, torch.float64)
    close(ft.KLDivLoss(**kw)(x, t), ref_loss, torch.float64)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_div_with_logits(reduction, target_kind, temperature, path):
    g = gen(4)
    x = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    t = {"logits": teacher, "probs": torch.softmax(teacher / temperature, -1),
         "log_probs": torch.log_softmax(teacher / temperature, -1)}[target_kind]
    kw = dict(target_kind=target_kind, reduction=reduction, temperature=temperature)
    assert gradcheck(lambda x: ft.kl_div_with_logits(x, t, **kw), (leaf(x),))
    loss, grad = run(ft.kl_div_with_logits, x, t, **kw)
    # torch's distillation loss: per row, summed over the classes.
    logq = torch.log_softmax(leaf(x) / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    rows = (p * (p.log() - logq)).sum(-1) * temperature**2
    ref = {"batchmean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    close(loss, ref, torch.float64)


def test_kl_div_with_logits_other_dim():
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    t = torch.randn(5, 4, 3, dtype=torch.float64)
    assert gradcheck(
        lambda x: ft.kl_div_with_logits(x, t, dim=1, reduction="none"), (leaf(x),))
    close(ft.kl_div_with_logits(x, t, dim=1),
          ft.kl_div_with_logits(x.transpose(1, 2), t.transpose(1, 2), dim=-1), torch.float64)


# --------------------------------------------------------------------- BCE

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["none", "weight", "pos_weight", "both"])
def test_bce_gradcheck_and_torch(reduction, weighting, path):
    g = gen(5)
    x = 4 * torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    kw = dict(reduction=reduction)
    if weighting in ("weight", "both"):
        kw["weight"] = torch.rand(4, 1, generator=g, dtype=torch.float64)
    if weighting in ("pos_weight", "both"):
        kw["pos_weight"] = torch.rand(5, generator=g, dtype=torch.float64) * 3
    assert gradcheck(
        lambda x: ft.binary_cross_entropy_with_logits(x, t, **kw), (leaf(x),))
    go = torch.randn(x.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    loss, grad = run(ft.binary_cross_entropy_with_logits, x, t, grad_out=go, **kw)
    ref_loss, ref_grad = run(F.binary_cross_entropy_with_logits, x, t, grad_out=go, **kw)
    close(loss, ref_loss, torch.float64)
    close(grad, ref_grad, torch.float64)
    mod = ft.BCEWithLogitsLoss(weight=kw.get("weight"), pos_weight=kw.get("pos_weight"),
                               reduction=reduction)
    close(mod(x, t), ref_loss, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bce_dtypes(dtype):
    g = gen(6)
    x = (3 * torch.randn(6, 9, generator=g, dtype=torch.float64)).to(dtype)
    x = layout(x, "strided")
    t = torch.rand(6, 9, generator=g).to(dtype)
    loss, grad = run(ft.binary_cross_entropy_with_logits, x, t)
    ref_loss, ref_grad = run(F.binary_cross_entropy_with_logits, x.double(), t.double())
    assert loss.dtype == dtype and grad.dtype == dtype
    close(loss, ref_loss, dtype)
    close(grad, ref_grad, dtype, scale=ref_grad.abs().max().item())


# -------------------------------------------------- log_softmax, softmax, lse

@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_normalise_gradcheck(name, dim):
    x = leaf(torch.randn(3, 4, 5, dtype=torch.float64))
    fn = getattr(ft, name)
    assert gradcheck(lambda x: fn(x, dim), (x,))
    assert gradgradcheck(lambda x: fn(x, dim), (x,))


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@pytest.mark.parametrize("kind", ["contiguous", "permuted", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalise_matches_torch(name, kind, dtype):
    logical = (4 * torch.randn(CE_SHAPES[kind], generator=gen(7), dtype=torch.float64)).to(dtype)
    x = layout(logical, kind)
    go = torch.randn(x.shape, generator=gen(8)).to(dtype)
    out, grad = run(getattr(ft, name), x, 1, grad_out=go)
    ref, ref_grad = run(getattr(F, name), x.double(), 1, grad_out=go.double())
    assert out.dtype == dtype and out.stride() == x.stride()
    close(out, ref, dtype, what="values")
    # torch's own backward formula, evaluated on the (rounded) 16-bit output
    close(grad, ref_grad, dtype if dtype in (torch.float32, torch.float64) else torch.bfloat16,
          scale=ref_grad.abs().max().item(), what="grad")


def test_normalise_torch_conventions():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        implicit = ft.softmax(x)
    close(implicit, F.softmax(x, 0), torch.float64)
    close(ft.log_softmax(x, -1, dtype=torch.float32), F.log_softmax(x, -1, dtype=torch.float32),
          torch.float32)
    assert ft.log_softmax(torch.tensor(3.0), 0).item() == 0.0
    assert ft.softmax(torch.tensor(3.0), 0).item() == 1.0


@pytest.mark.parametrize("dim", [1, -1, (0, 2), (1, 2)], ids=str)
@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp(dim, keepdim):
    x = leaf(3 * torch.randn(3, 4, 5, dtype=torch.float64))
    assert gradcheck(lambda x: ft.logsumexp(x, dim, keepdim), (x,))
    if isinstance(dim, int):
        assert gradgradcheck(lambda x: ft.logsumexp(x, dim, keepdim), (x,))
    for dtype in DTYPES:
        xd = x.detach().to(dtype)
        out, grad = run(ft.logsumexp, xd, dim, keepdim)
        ref, ref_grad = run(torch.logsumexp, xd.double(), dim, keepdim)
        assert out.dtype == dtype
        close(out, ref, dtype)
        close(grad, ref_grad, dtype if dtype != torch.float16 else torch.bfloat16)


# ------------------------------------------------------------ modules, misc

def test_cross_entropy_module_is_torchs():
    w = torch.rand(5) + 0.5
    mod = ft.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1, num_threads=1)
    assert isinstance(mod, torch.nn.CrossEntropyLoss)
    assert set(mod.state_dict()) == {"weight"}
    x, y, _ = ce_case((7, 5), torch.float32, {}, False)
    close(mod(x, y), torch.nn.CrossEntropyLoss(weight=w.double(), ignore_index=3,
                                               label_smoothing=0.1)(x.double(), y),
          torch.float32)
    with pytest.warns(UserWarning, match="size_average"):
        legacy = ft.cross_entropy(x, y, size_average=False)
    close(legacy, F.cross_entropy(x.double(), y, reduction="sum"), torch.float32)


def test_16bit_read_in_place():
    for dtype in DTYPES:
        t = torch.randn(4, 6).to(dtype)
        view = _ops._np(t)
        assert view.__array_interface__["data"][0] == t.data_ptr()


def test_threads(monkeypatch):
    x, y, _ = ce_case((64, 300), torch.float32, {}, False)
    one = run(ft.cross_entropy, x, y, num_threads=1)
    two = run(ft.cross_entropy, x, y, num_threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    seen = []
    real = _ops.fastxent.cross_entropy_with_grad
    monkeypatch.setattr(_ops.fastxent, "cross_entropy_with_grad",
                        lambda *a, **kw: seen.append(kw["num_threads"]) or real(*a, **kw))
    real_at = _ops._core.cross_entropy_mean_at  # the default call's route
    monkeypatch.setattr(_ops._core, "cross_entropy_mean_at",
                        lambda *a: seen.append(a[-1]) or real_at(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(ft.cross_entropy, x, y)
        run(ft.cross_entropy, x, y, num_threads=2)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_meta_tensors_trace():
    x = torch.empty(4, 10, 3, device="meta")
    y = torch.empty(4, 3, dtype=torch.long, device="meta")
    assert ft.cross_entropy(x, y, reduction="none").shape == (4, 3)
    assert ft.cross_entropy(x, y).device.type == "meta"
    assert ft.log_softmax(x, 1).shape == x.shape
    assert ft.logsumexp(x, (1, 2), keepdim=True).shape == (4, 1, 1)


def test_opcheck():
    x, y, kw = ce_case((4, 5, 2), torch.float64, CE_OPTIONS[6], False)
    x = leaf(x)
    t = torch.rand(4, 5, 2, dtype=torch.float64)
    samples = [
        (torch.ops.fastxent.cross_entropy, (x, y, kw["weight"], 2, "mean", 0.1, 0, True)),
        (torch.ops.fastxent.cross_entropy, (x, y, None, -100, "none", 0.0, 1, False)),
        (torch.ops.fastxent.kl_div_with_logits, (x, t, 1, "probs", "none", 2.0, 0, True)),
        (torch.ops.fastxent.kl_div, (x, t, "batchmean", False)),
        (torch.ops.fastxent.binary_cross_entropy_with_logits, (x, t, None, t[0], "sum", 0, True)),
        (torch.ops.fastxent.log_softmax, (x, 1, 0)),
        (torch.ops.fastxent.softmax, (x, 2, 0)),
        (torch.ops.fastxent.logsumexp, (x, [1, 2], True, 0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                     "test_faketensor"))


@pytest.mark.parametrize("backend", [
    # dynamo, FakeTensor and AOTAutograd: every part of torch.compile that
    # sees the operators, in seconds
    "aot_eager",
    # the default backend also generates and builds C++ (a minute on 2 cores)
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g = gen(9)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))
    ids = torch.randint(0, 20, (6, 4), generator=g)
    y = torch.randint(0, 20, (6, 4), generator=g)

    def step(ids, y):
        return ft.cross_entropy(model(ids).transpose(1, 2), y, label_smoothing=0.1)

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        model.zero_grad()
        loss = fn(ids, y)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ errors

def test_gradients_of_targets_and_weights_are_refused():
    x = leaf(torch.randn(4, 5))
    probs = leaf(torch.softmax(torch.randn(4, 5), 1))
    with pytest.raises(NotImplementedError, match="target requires grad"):
        ft.cross_entropy(x, probs)
    with pytest.raises(NotImplementedError, match="weight requires grad"):
        ft.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=leaf(torch.rand(5)))
    with pytest.raises(NotImplementedError, match="pos_weight requires grad"):
        ft.binary_cross_entropy_with_logits(x, torch.rand(4, 5), pos_weight=leaf(torch.rand(5)))
    with pytest.raises(NotImplementedError, match="target requires grad"):
        ft.kl_div_with_logits(x, leaf(torch.randn(4, 5)))
    with torch.no_grad():  # no gradient asked for: fine
        ft.cross_entropy(x, probs)
    ft.cross_entropy(x, probs.detach())


@pytest.mark.parametrize("fn", [
    lambda x: ft.cross_entropy(x, torch.tensor([1, 0, 2])),
    lambda x: ft.binary_cross_entropy_with_logits(x, torch.rand(3, 4, dtype=x.dtype)),
    lambda x: ft.kl_div_with_logits(x, torch.randn(3, 4, dtype=x.dtype)),
    lambda x: ft.kl_div(x, torch.rand(3, 4, dtype=x.dtype)),
], ids=["cross_entropy", "bce", "kl_div_with_logits", "kl_div"])
def test_double_backward_is_refused(fn, path):
    x = leaf(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(fn(x), x, create_graph=True)


def test_device_errors():
    with pytest.raises(TypeError, match="target is on device meta"):
        _ops.ce_forward(torch.randn(3, 4), torch.empty(3, dtype=torch.long, device="meta"),
                        None, -100, "mean", 0.0, 0, False)
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.suppress(RuntimeError, AssertionError), mode:  # needs no CUDA
        x = torch.empty(3, 4, device="cuda")
        y = torch.empty(3, dtype=torch.long, device="cuda")
        with pytest.raises(TypeError, match="input is on device cuda"):
            ft.cross_entropy(x, y)


def test_bad_arguments():
    x = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction"):
        ft.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"label 7 at position \(1,\)"):
        ft.cross_entropy(x, torch.tensor([0, 7, 2]))
    with pytest.raises(ValueError, match="shape"):
        ft.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_threads"):
        ft.cross_entropy(x, y, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        ft.cross_entropy(x, y, num_threads=1.5)
    with pytest.raises(TypeError, match="floating"):
        ft.cross_entropy(torch.ones(3, 4, dtype=torch.long), y)
    with pytest.raises(ValueError, match="label_smoothing"):
        ft.cross_entropy(x, y, label_smoothing=2.0)
    with pytest.raises(ValueError, match="target_kind"):
        ft.kl_div_with_logits(x, x, target_kind="soft")
    with pytest.raises(ValueError, match="shape"):
        ft.binary_cross_entropy_with_logits(x, torch.rand(4, 3))
    with pytest.raises(IndexError, match="dim 3"):
        ft.log_softmax(x, 3)


# ------------------------------------------------ the common call, eager mode

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mean_fast_path_matches_torch(monkeypatch, dtype):
    """The default-options call on a contiguous 2-D tensor takes the
    address-based path; values, gradients and ignore_index as torch's, and
    the same bits at 1 and 2 threads."""
    from fastxent import _core
    calls = []
    real = _core.cross_entropy_mean_at
    monkeypatch.setattr(_core, "cross_entropy_mean_at",
                        lambda *a: calls.append(a) or real(*a))
    x = (4 * torch.randn(37, 19, generator=gen(5), dtype=dtype)).requires_grad_(True)
    y = torch.randint(0, 19, (37,), generator=gen(6))
    y[::5] = -100
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x.grad = None
            loss = ft.cross_entropy(x, y)
            loss.backward()
            results.append((loss.detach().clone(), x.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 2 and loss.dtype == dtype
    xr = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(xr, y)
    ref.backward()
    close(results[0][0], ref, dtype, what="loss")
    close(results[0][1], xr.grad, dtype, scale=1e-3, what="grad")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][1][::5] == 0).all()
    with torch.no_grad():
        close(ft.cross_entropy(x, y), ref, dtype, what="no-grad loss")
    with pytest.raises(ValueError, match="label 19 at position"):
        ft.cross_entropy(x, torch.full((37,), 19))


def test_mean_fast_path_checks_labels_block_by_block():
    """Without a gradient, a batch past the tiny size checks its labels as
    its rows run: the loss and the first bad label are as everywhere else."""
    x = torch.randn(3000, 19, generator=gen(7))
    y = torch.randint(0, 19, (3000,), generator=gen(8))
    y[::3] = -100
    with torch.no_grad():
        close(ft.cross_entropy(x, y), F.cross_entropy(x.double(), y), torch.float32, what="loss")
        y[2500] = 19
        y[2900] = -3
        with pytest.raises(ValueError, match=r"label 19 at position \(2500,\)"):
            ft.cross_entropy(x, y)


def test_gradient_buffers_reused_only_when_free():
    """Large gradients come from a cached buffer, but never from one that a
    tensor still uses (a held .grad), and a reused buffer holds new values."""
    _ops.empty_cache()
    n, c = 64, 8192  # 2 MiB float32: above the cache's floor
    g = gen(9)
    y = torch.randint(0, c, (n,), generator=g)
    leaves, refs = [], []
    for step in range(3):
        x = (3 * torch.randn(n, c, generator=g)).requires_grad_(True)
        ft.cross_entropy(x, y).backward()  # a leaf's .grad is the buffer itself
        xr = x.detach().double().requires_grad_(True)
        F.cross_entropy(xr, y).backward()
        leaves.append(x)
        refs.append(xr.grad)
        if step == 1:
            # step 0's gradient, still held, was not written over
            close(leaves[0].grad, refs[0], torch.float32, scale=1e-6, what="held")
            first, second = (t.grad.data_ptr() for t in leaves)
            leaves.clear()
    close(x.grad, refs[2], torch.float32, scale=1e-6, what="reused")
    assert first != second and x.grad.data_ptr() in (first, second)
    assert len(_ops._cache) == 2
    _ops.empty_cache()
    assert not _ops._cache


def test_gradient_buffers_from_two_threads():
    """Threads taking buffers from the cache never share one: each step's
    gradient equals the one computed alone."""
    import threading
    _ops.empty_cache()
    n, c = 32, 8192  # 1 MiB float32: cached
    g = gen(11)
    inputs = [(3 * torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g))
              for _ in range(2)]
    expected = []
    for x, y in inputs:
        x = x.clone().requires_grad_(True)
        ft.cross_entropy(x, y, label_smoothing=0.0, num_threads=1).backward()
        expected.append(x.grad.clone())
    bad = []

    def work(k):
        x0, y = inputs[k]
        held = []
        for step in range(30):
            x = x0.clone().requires_grad_(True)
            ft.cross_entropy(x, y).backward()
            held = held[-1:] + [x]  # keep one earlier gradient alive too
            if not torch.equal(held[0].grad, expected[k]):
                bad.append((k, step))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not bad
    _ops.empty_cache()


def test_forward_mode_ad_refused():
    """A dual input has no tangent to give: refused, not dropped."""
    import torch.autograd.forward_ad as fw
    y = torch.tensor([0, 1, 2, 3])
    with fw.dual_level():
        x = fw.make_dual(torch.randn(4, 5, generator=gen(3)), torch.randn(4, 5, generator=gen(4)))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ft.cross_entropy(x, y)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ft.binary_cross_entropy_with_logits(x, torch.rand(4, 5, generator=gen(5)))
        plain = torch.randn(4, 5, generator=gen(3))  # no tangent: computed as usual
        close(ft.cross_entropy(plain, y), F.cross_entropy(plain, y), torch.float32)


def test_negated_view_read_as_its_values():
    """A lazily negated view (neg bit) is read as the values it shows."""
    x = torch.randn(4, 5, generator=gen(6))
    y = torch.tensor([0, 1, 2, 3])
    nv = torch._neg_view(x)
    assert nv.is_neg()
    close(ft.cross_entropy(nv, y), F.cross_entropy(-x, y), torch.float32)
    close(ft.cross_entropy(nv, y, label_smoothing=0.1),
          F.cross_entropy(-x, y, label_smoothing=0.1), torch.float32)
