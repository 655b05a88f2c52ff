"""Checks of fastxent.reference, the oracle of the other tests.

The reference is checked against hand-computed values, against PyTorch and
SciPy, and its gradients against 4th-order central finite differences.
"""

import importlib.util
import itertools
import math
import pathlib

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

try:
    from fastxent import reference as ref
except Exception:  # the package or its extension is not built: load the file alone
    _path = pathlib.Path(__file__).resolve().parents[1] / "src" / "fastxent" / "reference.py"
    _spec = importlib.util.spec_from_file_location("fastxent_reference", _path)
    ref = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ref)

RTOL = 1e-12


def rng(seed=0):
    return np.random.default_rng(seed)


def log_of(p):
    """np.log without the warning for log(0) = -inf, which the tests use on purpose."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def finite_difference_gradient(f, x, h=1e-4):
    """4th-order central difference of the scalar function f at every element of x."""
    x = np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    for index in np.ndindex(x.shape):
        def at(step):
            shifted = x.copy()
            shifted[index] += step
            return f(shifted)
        grad[index] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    return grad


def check_gradient(loss_and_grad, loss_only, x, grad_output=1.0, rtol=1e-7, atol=1e-9):
    """The analytic gradient equals the finite difference of sum(grad_output * loss)."""
    _, grad = loss_and_grad(x)
    fd = finite_difference_gradient(lambda z: np.sum(grad_output * loss_only(z)), x)
    assert grad.shape == np.shape(x)
    assert_allclose(grad, fd, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# Seeds: values computed by hand
# --------------------------------------------------------------------------

def test_seed_summed_cross_entropy():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])
    labels = np.array([0, 1, 2])
    from_probs = ref.cross_entropy(p, labels, reduction="sum", from_logits=False)
    from_logits = ref.cross_entropy(np.log(p), labels, reduction="sum")
    assert round(float(from_probs), 3) == 0.685
    assert round(float(from_logits), 3) == 0.685
    assert_allclose(from_probs, -(math.log(0.7) + math.log(0.8) + math.log(0.9)), rtol=RTOL)
    assert_allclose(from_logits, from_probs, rtol=RTOL)
    assert isinstance(from_probs, np.float64)


def test_seed_iris_rows():
    # Three Iris predictions whose true classes got probabilities 0.57, 0.58, 0.52.
    p = np.array([[0.57, 0.33, 0.10], [0.20, 0.58, 0.22], [0.08, 0.40, 0.52]])
    labels = np.array([0, 1, 2])
    per_row = ref.cross_entropy(p, labels, reduction="none", from_logits=False)
    assert_array_equal(np.round(per_row, 2), [0.56, 0.54, 0.65])
    assert_allclose(ref.cross_entropy(np.log(p), labels, reduction="none"), per_row, rtol=RTOL)
    assert per_row.dtype == np.float64 and per_row.shape == (3,)


def test_seed_bits():
    p = np.array([[0.5, 0.25, 0.25]])
    assert_allclose(ref.cross_entropy(p, [1], from_logits=False, base=2), 2.0, rtol=RTOL)
    assert_allclose(ref.entropy(p, from_logits=False, base=2), [1.5], rtol=RTOL)
    assert_allclose(ref.entropy(np.log(p), base=2), [1.5], rtol=RTOL)


# --------------------------------------------------------------------------
# Against PyTorch
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float64)
    return torch


def torch_cross_entropy(torch, x, labels, grad_output, **kw):
    F = torch.nn.functional
    xt = torch.tensor(x, requires_grad=True)
    target = torch.tensor(labels)
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(kw["weight"])
    loss = F.cross_entropy(xt, target, **kw)
    (loss * torch.tensor(grad_output)).sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


CE_CASES = list(itertools.product(
    ["hard", "hard_ignored", "soft"],      # labels
    [False, True],                         # weight
    [0.0, 0.1, 1.0],                       # label_smoothing
    ["mean", "sum", "none"],               # reduction
    [(6, 5), (3, 4, 2, 3)],                # shape, classes on axis 1 (torch layout)
))


@pytest.mark.parametrize("labels_kind, weighted, smoothing, reduction, shape", CE_CASES)
def test_cross_entropy_matches_torch(torch, labels_kind, weighted, smoothing, reduction, shape):
    g = rng(CE_CASES.index((labels_kind, weighted, smoothing, reduction, shape)))
    x = 2 * g.standard_normal(shape)
    C = shape[1]
    batch = (shape[0],) + shape[2:]
    if labels_kind == "soft":
        labels = np.moveaxis(g.dirichlet(np.ones(C), size=batch), -1, 1)
    else:
        labels = g.integers(0, C, size=batch)
        if labels_kind == "hard_ignored":
            labels.flat[::3] = -100
    weight = g.uniform(0.2, 2.0, C) if weighted else None
    grad_output = g.standard_normal(batch) if reduction == "none" else np.float64(0.7)
    kw = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)

    expected_loss, expected_grad = torch_cross_entropy(torch, x, labels, grad_output, **kw)
    loss, grad = ref.cross_entropy_with_grad(x, labels, axis=1, grad_output=grad_output, **kw)
    assert_allclose(loss, expected_loss, rtol=RTOL, atol=1e-14)
    assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert_allclose(ref.cross_entropy(x, labels, axis=1, **kw), loss, rtol=0)
    # The default class axis is the last one: moving the classes there changes nothing.
    moved_labels = labels if labels_kind != "soft" else np.moveaxis(labels, 1, -1)
    loss_last, grad_last = ref.cross_entropy_with_grad(
        np.moveaxis(x, 1, -1), moved_labels, grad_output=grad_output, **kw)
    assert_allclose(loss_last, loss, rtol=RTOL)
    assert_allclose(np.moveaxis(grad_last, -1, 1), grad, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_from_probabilities_matches_torch(torch, smoothing, soft):
    # On normalised probabilities p, log_softmax(log p) = log p, so torch's
    # cross_entropy on log p is our from_logits=False loss on p.
    g = rng(30)
    p = g.dirichlet(np.ones(5), size=6)
    labels = g.dirichlet(np.ones(5), size=6) if soft else np.array([0, 4, -100, 3, 1, 1])
    kw = dict(weight=g.uniform(0.5, 2, 5), label_smoothing=smoothing)
    expected, _ = torch_cross_entropy(torch, np.log(p), labels, 1.0, **kw)
    loss, grad = ref.cross_entropy_with_grad(p, labels, from_logits=False, **kw)
    assert_allclose(loss, expected, rtol=1e-12)
    # The logits form at z = log p differs only by the softmax's own
    # normalisation: grad_z = p * grad_p - p * sum(p * grad_p).
    _, grad_z = ref.cross_entropy_with_grad(np.log(p), labels, **kw)
    p_grad = p * grad
    assert_allclose(grad_z, p_grad - p * np.sum(p_grad, axis=-1, keepdims=True),
                    rtol=1e-10, atol=1e-15)


def test_cross_entropy_smoothing_with_ignored_labels_normalisation(torch):
    # torch 2.13 divides the smoothing term, like the rest, by the number of
    # non-ignored positions (older versions divided it by all positions).
    x = rng(1).standard_normal((6, 5))
    labels = np.array([0, 1, -100, 3, -100, 2])
    eps, C = 0.3, 5
    logp = x - ref.logsumexp(x)[:, None]
    kept = labels != -100
    nll = -logp[kept, labels[kept]].sum()
    smooth = -logp[kept].sum()
    expected = ((1 - eps) * nll + eps / C * smooth) / kept.sum()
    assert_allclose(ref.cross_entropy(x, labels, label_smoothing=eps), expected, rtol=RTOL)
    assert_allclose(torch.nn.functional.cross_entropy(
        torch.tensor(x), torch.tensor(labels), label_smoothing=eps).item(), expected, rtol=RTOL)


def test_cross_entropy_ignore_index_in_range(torch):
    x = rng(2).standard_normal((5, 4))
    labels = np.array([0, 2, 1, 2, 3])
    for smoothing in (0.0, 0.2):
        expected, expected_grad = torch_cross_entropy(
            torch, x, labels, 1.0, ignore_index=2, label_smoothing=smoothing)
        loss, grad = ref.cross_entropy_with_grad(x, labels, ignore_index=2, label_smoothing=smoothing)
        assert_allclose(loss, expected, rtol=RTOL)
        assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("target_kind", ["probs", "log_probs", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kl_div_matches_torch(torch, target_kind, temperature, reduction):
    F = torch.nn.functional
    g = rng(3)
    shape = (3, 4, 6)                      # (B, T, C): batchmean divides by B*T
    z = 2 * g.standard_normal(shape)
    if target_kind == "logits":
        target = 2 * g.standard_normal(shape)
        log_p = F.log_softmax(torch.tensor(target) / temperature, dim=-1)
    else:
        probs = g.dirichlet(np.ones(6), size=shape[:-1])
        probs[0, 0, 2] = 0.0               # a zero target probability
        probs[0, 0] /= probs[0, 0].sum()
        target = probs if target_kind == "probs" else log_of(probs)
        log_p = torch.tensor(log_of(probs))
    grad_output = g.standard_normal(shape[:-1]) if reduction == "none" else 1.3

    zt = torch.tensor(z, requires_grad=True)
    elementwise = F.kl_div(F.log_softmax(zt / temperature, dim=-1), log_p,
                           log_target=True, reduction="none")
    elementwise = torch.nan_to_num(elementwise) * temperature**2   # 0 * log 0 = 0
    per_row = elementwise.sum(-1)
    if reduction == "none":
        expected = per_row
    elif reduction == "sum":
        expected = per_row.sum()
    else:
        expected = per_row.sum() / per_row.numel()
    (expected * torch.tensor(grad_output)).sum().backward()

    loss, grad = ref.kl_div_with_grad(z, target, target_kind=target_kind, reduction=reduction,
                                      temperature=temperature, grad_output=grad_output)
    assert_allclose(loss, expected.detach().numpy(), rtol=1e-11, atol=1e-14)
    assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-14)
    if target_kind != "logits":
        # Also torch's own zero handling on a probability target (xlogy).
        torch_sum = F.kl_div(F.log_softmax(torch.tensor(z) / temperature, dim=-1),
                             torch.tensor(probs), reduction="sum") * temperature**2
        assert_allclose(ref.kl_div(z, target, target_kind=target_kind, reduction="sum",
                                   temperature=temperature), torch_sum.item(), rtol=1e-11)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_matches_torch(torch, from_logits, weighted, pos_weighted, reduction):
    F = torch.nn.functional
    g = rng(4)
    shape = (5, 7)
    x = 3 * g.standard_normal(shape)
    if not from_logits:
        x = 1 / (1 + np.exp(-x))
    x.flat[:3] = [0.0, 1.0, 0.5] if not from_logits else [30.0, -30.0, 0.0]
    t = g.uniform(0, 1, shape)
    t.flat[:2] = [1.0, 0.0]
    weight = g.uniform(0.5, 2, (7,)) if weighted else None
    pos_weight = g.uniform(0.5, 3, (7,)) if pos_weighted else None
    grad_output = g.standard_normal(shape) if reduction == "none" else 0.6
    kw = dict(weight=weight, pos_weight=pos_weight, reduction=reduction, from_logits=from_logits)
    loss, grad = ref.binary_cross_entropy_with_grad(x, t, grad_output=grad_output, **kw)
    assert_allclose(ref.binary_cross_entropy(x, t, **kw), loss, rtol=0)

    xt = torch.tensor(x, requires_grad=True)
    wt = None if weight is None else torch.tensor(weight)
    if from_logits:
        pwt = None if pos_weight is None else torch.tensor(pos_weight)
        expected = F.binary_cross_entropy_with_logits(xt, torch.tensor(t), weight=wt,
                                                      pos_weight=pwt, reduction=reduction)
        (expected * torch.tensor(grad_output)).sum().backward()
        expected_grad = xt.grad.numpy()
    elif pos_weight is None:
        expected = F.binary_cross_entropy(xt, torch.tensor(t), weight=wt, reduction=reduction)
        (expected * torch.tensor(grad_output)).sum().backward()
        expected_grad = xt.grad.numpy()
    else:
        # torch has no pos_weight on probabilities: ours is
        # -(pos_weight * t * log p + (1 - t) * log(1 - p)), the loss of
        # the logits form at x = logit(p).  Compare away from the clamps.
        inner = slice(3, None)
        logit = log_of(x) - log_of(1 - x)
        lw, gw = ref.binary_cross_entropy_with_grad(
            logit.ravel()[inner], t.ravel()[inner], reduction="none", from_logits=True,
            weight=None if weight is None else np.broadcast_to(weight, shape).ravel()[inner],
            pos_weight=np.broadcast_to(pos_weight, shape).ravel()[inner])
        lp, gp = ref.binary_cross_entropy_with_grad(
            x.ravel()[inner], t.ravel()[inner], reduction="none", from_logits=False,
            weight=None if weight is None else np.broadcast_to(weight, shape).ravel()[inner],
            pos_weight=np.broadcast_to(pos_weight, shape).ravel()[inner])
        assert_allclose(lp, lw, rtol=1e-9)
        p = x.ravel()[inner]
        assert_allclose(gp * p * (1 - p), gw, rtol=1e-8, atol=1e-12)   # chain rule dp/dx
        return
    assert_allclose(loss, expected.detach().numpy(), rtol=RTOL, atol=1e-14)
    assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_building_blocks_match_torch(torch):
    x = 5 * rng(5).standard_normal((4, 3, 9))
    for axis in (-1, 0, 1):
        xt = torch.tensor(x)
        assert_allclose(ref.log_softmax(x, axis=axis), torch.log_softmax(xt, axis).numpy(), rtol=RTOL)
        assert_allclose(ref.softmax(x, axis=axis), torch.softmax(xt, axis).numpy(), rtol=RTOL)
        assert_allclose(ref.logsumexp(x, axis=axis), torch.logsumexp(xt, axis).numpy(), rtol=RTOL)
    special = torch.tensor([[np.inf, 0.0], [-np.inf, -np.inf], [np.inf, -np.inf], [np.nan, 1.0]])
    assert_array_equal(ref.log_softmax(special.numpy()), torch.log_softmax(special, 1).numpy())
    assert_array_equal(ref.softmax(special.numpy()), torch.softmax(special, 1).numpy())
    assert_array_equal(ref.logsumexp(special.numpy()), torch.logsumexp(special, 1).numpy())


# --------------------------------------------------------------------------
# Against SciPy
# --------------------------------------------------------------------------

def test_building_blocks_match_scipy():
    special = pytest.importorskip("scipy.special")
    stats = pytest.importorskip("scipy.stats")
    x = 10 * rng(6).standard_normal((5, 2, 17))
    for axis in (-1, 0, 1):
        assert_allclose(ref.logsumexp(x, axis=axis), special.logsumexp(x, axis=axis), rtol=1e-13)
        assert_allclose(ref.softmax(x, axis=axis), special.softmax(x, axis=axis), rtol=1e-13)
        assert_allclose(ref.log_softmax(x, axis=axis), special.log_softmax(x, axis=axis),
                        rtol=1e-13, atol=1e-13)
        p = special.softmax(x, axis=axis)
        # Some rows are nearly one-hot, with entropies near 1e-5: an absolute
        # tolerance covers the rounding of their p * log p terms.
        expected = stats.entropy(p, axis=axis)
        assert_allclose(ref.entropy(x, axis=axis), expected, rtol=1e-12, atol=1e-15)
        assert_allclose(ref.entropy(p, axis=axis, from_logits=False), expected,
                        rtol=1e-12, atol=1e-15)
        assert_allclose(ref.entropy(x, axis=axis, base=2), expected / math.log(2),
                        rtol=1e-12, atol=1e-15)


def test_kl_div_matches_scipy_rel_entr():
    special = pytest.importorskip("scipy.special")
    g = rng(7)
    z = g.standard_normal((6, 8))
    p = g.dirichlet(np.ones(8), size=6)
    p[1, :3] = 0
    p[1] /= p[1].sum()
    q = special.softmax(z, axis=-1)
    per_row = special.rel_entr(p, q).sum(-1)
    assert_allclose(ref.kl_div(z, p, reduction="none"), per_row, rtol=1e-12)
    assert_allclose(ref.kl_div(z, p), per_row.mean(), rtol=1e-12)
    assert_allclose(ref.kl_div(z, log_of(p), target_kind="log_probs", reduction="none"),
                    per_row, rtol=1e-12)
    assert_allclose(ref.kl_div(z, p, reduction="none", base=2), per_row / math.log(2), rtol=1e-12)
    target_logits = g.standard_normal((6, 8))
    assert_allclose(
        ref.kl_div(z, target_logits, target_kind="logits", reduction="none"),
        special.rel_entr(special.softmax(target_logits, -1), q).sum(-1), rtol=1e-11)


# --------------------------------------------------------------------------
# Gradients against finite differences
# --------------------------------------------------------------------------

CE_GRAD_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2, weight=[0.5, 1.0, 2.0, 1.5]),
    dict(label_smoothing=0.2, weight=[0.5, 1.0, 2.0, 1.5], reduction="none"),
    dict(ignore_index=1),
    dict(base=2.0, label_smoothing=0.1),
]


@pytest.mark.parametrize("kw", CE_GRAD_CASES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
def test_cross_entropy_gradient_finite_difference(kw, soft, from_logits):
    g = rng(8)
    x = g.standard_normal((3, 4)) if from_logits else g.uniform(0.1, 0.9, (3, 4))
    labels = g.dirichlet(np.ones(4), size=3) if soft else np.array([2, 1, 0])
    grad_output = g.standard_normal(3) if kw.get("reduction") == "none" else 1.7
    check_gradient(
        lambda z: ref.cross_entropy_with_grad(z, labels, from_logits=from_logits,
                                              grad_output=grad_output, **kw),
        lambda z: ref.cross_entropy(z, labels, from_logits=from_logits, **kw),
        x, grad_output)


def test_cross_entropy_gradient_finite_difference_axis1():
    g = rng(9)
    x = g.standard_normal((2, 3, 2))
    labels = np.array([[0, 2], [1, 1]])
    check_gradient(lambda z: ref.cross_entropy_with_grad(z, labels, axis=1, label_smoothing=0.1),
                   lambda z: ref.cross_entropy(z, labels, axis=1, label_smoothing=0.1), x)


@pytest.mark.parametrize("target_kind", ["probs", "log_probs", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_gradient_finite_difference(target_kind, temperature, reduction):
    g = rng(10)
    z = g.standard_normal((3, 5))
    p = g.dirichlet(np.ones(5), size=3)
    p[0, 1] = 0.0                          # gradient is still defined: 0 log 0 = 0
    p[0] /= p[0].sum()
    target = {"probs": p, "log_probs": log_of(p), "logits": g.standard_normal((3, 5))}[target_kind]
    grad_output = g.standard_normal(3) if reduction == "none" else 0.8
    kw = dict(target_kind=target_kind, temperature=temperature, reduction=reduction)
    check_gradient(lambda y: ref.kl_div_with_grad(y, target, grad_output=grad_output, **kw),
                   lambda y: ref.kl_div(y, target, **kw), z, grad_output)


def test_kl_div_gradient_unnormalised_target():
    # A probability target that does not sum to 1: the gradient is
    # T * (Q * sum(P) - P), the exact derivative, not T * (Q - P).
    z = rng(11).standard_normal((2, 4))
    target = np.array([[0.1, 0.2, 0.3, 0.1], [0.5, 0.5, 0.5, 0.0]])
    check_gradient(lambda y: ref.kl_div_with_grad(y, target, temperature=2.0),
                   lambda y: ref.kl_div(y, target, temperature=2.0), z)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_binary_cross_entropy_gradient_finite_difference(from_logits, reduction):
    g = rng(12)
    x = 2 * g.standard_normal((3, 4)) if from_logits else g.uniform(0.1, 0.9, (3, 4))
    t = g.uniform(0, 1, (3, 4))
    grad_output = g.standard_normal((3, 4)) if reduction == "none" else 2.0
    kw = dict(weight=g.uniform(0.5, 2, (3, 1)), pos_weight=g.uniform(0.5, 3, 4),
              reduction=reduction, from_logits=from_logits, base=10)
    check_gradient(lambda y: ref.binary_cross_entropy_with_grad(y, t, grad_output=grad_output, **kw),
                   lambda y: ref.binary_cross_entropy(y, t, **kw), x, grad_output)


# --------------------------------------------------------------------------
# Edge rows
# --------------------------------------------------------------------------

def test_constant_row_of_1e30():
    C = 7
    x = np.full((2, C), 1e30)
    assert_allclose(ref.log_softmax(x), np.full((2, C), -math.log(C)), rtol=RTOL)
    assert_allclose(ref.softmax(x), np.full((2, C), 1 / C), rtol=RTOL)
    assert_array_equal(ref.logsumexp(x), [1e30 + math.log(C)] * 2)
    assert_allclose(ref.entropy(x), [math.log(C)] * 2, rtol=RTOL)
    assert_allclose(ref.cross_entropy(x, [0, 3], reduction="none"), [math.log(C)] * 2, rtol=RTOL)
    _, grad = ref.cross_entropy_with_grad(x, [0, 3], reduction="sum")
    expected = np.full((2, C), 1 / C)
    expected[0, 0] -= 1
    expected[1, 3] -= 1
    assert_allclose(grad, expected, rtol=1e-12)


def test_rows_of_very_negative_values():
    x = rng(13).standard_normal((3, 5))
    shifted = x - 1e4
    assert_allclose(ref.log_softmax(shifted), ref.log_softmax(x), rtol=1e-10)
    assert_allclose(ref.logsumexp(shifted), ref.logsumexp(x) - 1e4, rtol=1e-14)
    assert_allclose(ref.entropy(shifted), ref.entropy(x), rtol=1e-10)
    labels = np.array([4, 0, 2])
    assert_allclose(ref.cross_entropy(shifted, labels, reduction="none"),
                    ref.cross_entropy(x, labels, reduction="none"), rtol=1e-10)
    assert np.all(np.isfinite(ref.cross_entropy_with_grad(np.full((2, 4), -1e4), [0, 1])[1]))


def test_minus_inf_on_a_non_target_class():
    x = np.array([[1.0, -np.inf, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    labels = np.array([0, 1])
    loss, grad = ref.cross_entropy_with_grad(x, labels, reduction="none")
    finite_x = np.array([[1.0, 2.0, 0.5]])
    assert_allclose(loss[0], ref.cross_entropy(finite_x, [0], reduction="none")[0], rtol=RTOL)
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0.0
    assert np.isfinite(ref.entropy(x)).all()
    assert_allclose(ref.entropy(x)[0], ref.entropy(finite_x)[0], rtol=RTOL)
    assert ref.softmax(x)[0, 1] == 0.0
    # With soft labels, a class of target probability 0 adds 0 even with -inf.
    soft = np.array([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert np.isfinite(ref.cross_entropy(x, soft))
    # A smoothed target puts mass on the -inf class: the loss is +inf.
    assert ref.cross_entropy(x, labels, reduction="none", label_smoothing=0.1)[0] == np.inf
    # The true class at -inf (or probability 0): +inf, no clipping.
    assert ref.cross_entropy(x, [1, 0], reduction="none")[0] == np.inf
    assert ref.cross_entropy([[0.3, 0.0, 0.7]], [1], from_logits=False) == np.inf


def test_nan_poisons_only_its_row():
    x = rng(14).standard_normal((3, 4))
    x[1, 2] = np.nan
    labels = np.array([0, 0, 3])
    loss, grad = ref.cross_entropy_with_grad(x, labels, reduction="none")
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
    assert np.isnan(grad[1]).all() and np.isfinite(grad[[0, 2]]).all()
    for f in (ref.logsumexp, ref.entropy):
        values = f(x)
        assert np.isnan(values[1]) and np.isfinite(values[[0, 2]]).all()
    for f in (ref.log_softmax, ref.softmax):
        values = f(x)
        assert np.isnan(values[1]).all() and np.isfinite(values[[0, 2]]).all()
    kl = ref.kl_div(x, ref.softmax(rng(15).standard_normal((3, 4))), reduction="none")
    assert np.isnan(kl[1]) and np.isfinite(kl[[0, 2]]).all()
    assert np.isnan(ref.cross_entropy(x, labels))


def test_infinite_rows_of_logsumexp():
    x = np.array([[np.inf, 0.0], [-np.inf, -np.inf], [np.inf, -np.inf], [np.nan, np.inf], [1.0, -np.inf]])
    values = ref.logsumexp(x)
    assert values[0] == np.inf and values[1] == -np.inf and values[2] == np.inf
    assert np.isnan(values[3]) and values[4] == 1.0


def test_all_labels_ignored():
    x = rng(16).standard_normal((3, 4))
    x[0, 0] = np.nan                       # an ignored row's logits are not read
    labels = np.full(3, -100)
    for smoothing in (0.0, 0.3):
        loss, grad = ref.cross_entropy_with_grad(x, labels, label_smoothing=smoothing)
        assert np.isnan(loss)
        assert_array_equal(grad, np.zeros((3, 4)))
    loss, grad = ref.cross_entropy_with_grad(x, labels, reduction="sum")
    assert loss == 0.0
    assert_array_equal(grad, np.zeros((3, 4)))
    assert_array_equal(ref.cross_entropy(x, labels, reduction="none"), np.zeros(3))


def test_empty_batch():
    x = np.zeros((0, 5))
    labels = np.zeros(0, dtype=np.int64)
    for soft in (False, True):
        y = np.zeros((0, 5)) if soft else labels
        assert np.isnan(ref.cross_entropy(x, y))
        assert ref.cross_entropy(x, y, reduction="sum") == 0.0
        assert ref.cross_entropy(x, y, reduction="none").shape == (0,)
        loss, grad = ref.cross_entropy_with_grad(x, y)
        assert np.isnan(loss) and grad.shape == (0, 5)
    assert np.isnan(ref.kl_div(x, x))
    assert ref.kl_div(x, x, reduction="sum") == 0.0
    assert np.isnan(ref.binary_cross_entropy(np.zeros(0), np.zeros(0)))
    assert ref.binary_cross_entropy(np.zeros(0), np.zeros(0), reduction="sum") == 0.0
    assert ref.logsumexp(x).shape == (0,)
    assert ref.entropy(x).shape == (0,)
    assert ref.softmax(x).shape == (0, 5)


def test_weighted_mean_divides_by_counted_weights():
    x = rng(17).standard_normal((4, 3))
    labels = np.array([0, 2, -100, 2])
    weight = np.array([0.5, 1.0, 3.0])
    per_row = ref.cross_entropy(x, labels, weight=weight, reduction="none")
    assert per_row[2] == 0.0
    assert_allclose(ref.cross_entropy(x, labels, weight=weight), per_row.sum() / (0.5 + 3 + 3), rtol=RTOL)
    soft = ref.softmax(rng(18).standard_normal((4, 3)))
    per_row = ref.cross_entropy(x, soft, weight=weight, reduction="none")
    assert_allclose(ref.cross_entropy(x, soft, weight=weight), per_row.sum() / 4, rtol=RTOL)


def test_soft_labels_used_as_given():
    x = rng(19).standard_normal((2, 3))
    t = np.array([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    logp = ref.log_softmax(x)
    assert_allclose(ref.cross_entropy(x, t, reduction="none"), [-logp[0].sum() / 2, 0.0], rtol=RTOL)
    smoothed = ref.cross_entropy(x, t, reduction="none", label_smoothing=0.3)
    assert_allclose(smoothed, -np.sum((0.7 * t + 0.1) * logp, axis=-1), rtol=RTOL)


def test_from_probabilities_is_not_renormalised():
    p = np.array([[0.2, 0.2, 0.2]])
    assert_allclose(ref.cross_entropy(p, [0], from_logits=False), -math.log(0.2), rtol=RTOL)
    _, grad = ref.cross_entropy_with_grad(p, [0], from_logits=False)
    assert_allclose(grad, [[-5.0, 0.0, 0.0]], rtol=RTOL)
    assert_allclose(ref.entropy(p, from_logits=False), [-0.6 * math.log(0.2)], rtol=RTOL)
    assert_allclose(ref.entropy([[0.5, 0.0, 0.5]], from_logits=False), [math.log(2)], rtol=RTOL)


def test_kl_zero_conventions():
    z = np.array([[0.0, -np.inf, 1.0]])
    p = np.array([[0.5, 0.0, 0.5]])
    assert np.isfinite(ref.kl_div(z, p))
    assert np.isfinite(ref.kl_div(z, log_of(p), target_kind="log_probs"))
    assert np.isfinite(ref.kl_div(z, log_of(p), target_kind="logits"))
    assert ref.kl_div(z, [[0.4, 0.2, 0.4]]) == np.inf   # mass where Q is 0
    assert ref.kl_div([[0.3, -1.0]], [[0.3, -1.0]], target_kind="logits", temperature=3) == 0.0


def test_binary_cross_entropy_edges():
    p = np.array([0.0, 1.0, 0.0, 1.0])
    t = np.array([1.0, 0.0, 0.0, 1.0])
    assert_array_equal(ref.binary_cross_entropy(p, t, from_logits=False, reduction="none"),
                       [100.0, 100.0, 0.0, 0.0])
    x = np.array([800.0, -800.0, 0.0])
    loss = ref.binary_cross_entropy(x, [0.0, 1.0, 0.5], reduction="none")
    assert_allclose(loss, [800.0, 800.0, math.log(2)], rtol=RTOL)
    with pytest.raises(ValueError):
        ref.binary_cross_entropy([1.5], [1.0], from_logits=False)
    with pytest.raises(ValueError):
        ref.binary_cross_entropy([0.5], [-0.5], from_logits=False)
    assert np.isnan(ref.binary_cross_entropy([np.nan, 0.5], [1.0, 1.0],
                                             from_logits=False, reduction="none")[0])


# --------------------------------------------------------------------------
# Conventions: dtypes, out=, base, layouts
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_inputs_are_upcast_to_float64(dtype):
    x = rng(20).standard_normal((3, 5)).astype(dtype)
    labels = np.array([1, 0, 4], dtype=np.uint8)
    loss, grad = ref.cross_entropy_with_grad(x, labels)
    assert isinstance(loss, np.float64) and grad.dtype == np.float64
    assert_allclose(loss, ref.cross_entropy(x.astype(np.float64), labels), rtol=0)
    assert ref.log_softmax(x).dtype == np.float64
    assert ref.logsumexp(x).dtype == np.float64
    assert ref.entropy(x).dtype == np.float64
    assert ref.kl_div_with_grad(x, x, target_kind="logits")[1].dtype == np.float64


def test_bfloat16_inputs_are_upcast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng(21).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    assert_allclose(ref.logsumexp(x), ref.logsumexp(x.astype(np.float64)), rtol=0)


def test_out_receives_the_result():
    x = rng(22).standard_normal((3, 5))
    labels = np.array([1, 0, 4])
    _, expected = ref.cross_entropy_with_grad(x, labels)
    out = np.empty((3, 5), dtype=np.float32)
    _, grad = ref.cross_entropy_with_grad(x, labels, out=out)
    assert grad is out
    assert_allclose(out, expected.astype(np.float32), rtol=0)
    in_place = x.copy()
    _, grad = ref.cross_entropy_with_grad(in_place, labels, out=in_place)
    assert grad is in_place
    assert_array_equal(in_place, expected)
    out = np.empty((3, 5))
    assert ref.log_softmax(x, out=out) is out and ref.softmax(x, out=out) is out
    assert_array_equal(out, ref.softmax(x))
    with pytest.raises(ValueError):
        ref.softmax(x, out=np.empty((5, 3)))
    read_only = np.empty((3, 5))
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        ref.log_softmax(x, out=read_only)
    for f in (ref.kl_div_with_grad, ref.binary_cross_entropy_with_grad):
        out = np.empty((3, 5))
        target = ref.softmax(x)
        assert f(x, target, out=out)[1] is out
        assert_array_equal(out, f(x, target)[1])


def test_base_divides_losses_and_gradients():
    x = rng(23).standard_normal((4, 6))
    labels = np.array([5, 0, 2, 2])
    loss, grad = ref.cross_entropy_with_grad(x, labels)
    loss2, grad2 = ref.cross_entropy_with_grad(x, labels, base=2)
    assert_allclose(loss2, loss / math.log(2), rtol=RTOL)
    assert_allclose(grad2, grad / math.log(2), rtol=RTOL)
    assert_allclose(ref.entropy(x, base=math.e), ref.entropy(x), rtol=RTOL)


def test_strided_and_read_only_inputs():
    big = rng(24).standard_normal((6, 10))
    x = big[::-2, ::2]                     # negative and non-unit strides, a read-only view
    x.flags.writeable = False
    labels = np.array([0, 4, 2])
    assert_allclose(ref.cross_entropy(x, labels), ref.cross_entropy(np.ascontiguousarray(x), labels),
                    rtol=0)
    frozen = np.ascontiguousarray(x)
    frozen.flags.writeable = False
    assert_allclose(ref.log_softmax(frozen), ref.log_softmax(x), rtol=0)
    assert_allclose(ref.cross_entropy(x.tolist(), labels.tolist()), ref.cross_entropy(x, labels),
                    rtol=0)


def test_one_dimensional_logits():
    x = np.array([1.0, 2.0, 3.0])
    loss = ref.cross_entropy(x, 2, reduction="none")
    assert np.shape(loss) == ()
    assert_allclose(loss, ref.logsumexp(x) - 3.0, rtol=RTOL)
    assert np.shape(ref.logsumexp(x)) == () and np.shape(ref.entropy(x)) == ()


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def test_label_out_of_range_message():
    x = np.zeros((4, 5))
    with pytest.raises(ValueError, match=r"label 7 at position \(2,\) is out of range \[0, 5\)"):
        ref.cross_entropy(x, [0, 1, 7, 2])
    with pytest.raises(ValueError, match=r"label -1 at position \(1, 0\)"):
        ref.cross_entropy(np.zeros((2, 5, 3)), [[0, 1, 2], [-1, 0, 0]], axis=1)


@pytest.mark.parametrize("call", [
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], reduction="avg"),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], label_smoothing=1.5),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], label_smoothing=-0.1),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], base=1),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], base=0),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], base=-2),
    lambda: ref.entropy(np.zeros((2, 3)), base=1.0),
    lambda: ref.cross_entropy(np.zeros((2, 0)), np.zeros(2, dtype=int)),
    lambda: ref.logsumexp(np.zeros((2, 0))),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1, 2]),
    lambda: ref.cross_entropy(np.zeros((2, 3)), np.zeros((2, 4))),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], weight=[1.0, 2.0]),
    lambda: ref.cross_entropy(np.zeros((2, 3)), [0, 1], axis=2),
    lambda: ref.cross_entropy_with_grad(np.zeros((2, 3)), [0, 1], grad_output=np.ones(2)),
    lambda: ref.cross_entropy_with_grad(np.zeros((2, 3)), [0, 1], reduction="none",
                                        grad_output=np.ones(3)),
    lambda: ref.kl_div(np.zeros((2, 3)), np.zeros((2, 3)), target_kind="probabilities"),
    lambda: ref.kl_div(np.zeros((2, 3)), np.zeros((2, 3)), reduction="avg"),
    lambda: ref.kl_div(np.zeros((2, 3)), np.zeros((3, 2))),
    lambda: ref.kl_div(np.zeros((2, 3)), np.zeros((2, 3)), temperature=0),
    lambda: ref.binary_cross_entropy(np.zeros((2, 3)), np.zeros((2, 2))),
    lambda: ref.binary_cross_entropy(np.zeros((2, 3)), np.zeros((2, 3)), reduction="batchmean"),
    lambda: ref.binary_cross_entropy(np.zeros((2, 3)), np.zeros((2, 3)), pos_weight=np.ones(2)),
])
def test_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_type_errors():
    with pytest.raises(TypeError):
        ref.logsumexp(np.zeros((2, 3), dtype=np.complex128))
    with pytest.raises(TypeError):
        ref.softmax(np.array([["a", "b"]]))
    with pytest.raises(TypeError):
        ref.cross_entropy(np.zeros((2, 3)), np.array([True, False]))
