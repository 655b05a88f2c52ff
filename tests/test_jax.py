"""fastxent.jax: values and gradients against optax and fastxent.reference,
under jit, grad, value_and_grad and vmap; 16-bit inputs; errors.

Skipped when jax or optax is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import reference  # noqa: E402

# float32 results against optax (float32 too) and the float64 reference.
RTOL, ATOL = 2e-6, 2e-7


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol)


def vg(f, **kw):
    """jit(value_and_grad(f)): one compile instead of one per eager op."""
    return jax.jit(jax.value_and_grad(f, **kw))


def jgrad(f, **kw):
    return jax.jit(jax.grad(f, **kw))


def rng(seed=0):
    return np.random.default_rng(seed)


def logits_of(shape, seed=0, scale=3.0):
    return jnp.asarray(scale * rng(seed).standard_normal(shape), jnp.float32)


def labels_of(shape, c, seed=1):
    return jnp.asarray(rng(seed).integers(0, c, shape), jnp.int32)


def probs_of(shape, seed=2):
    return jax.nn.softmax(jnp.asarray(rng(seed).standard_normal(shape), jnp.float32), axis=-1)


@pytest.fixture(params=["ffi", "callback"])
def transport(request, monkeypatch):
    """Both ways into the kernels: the XLA FFI handler and jax.pure_callback
    (fastxent.jax.transport is read when a function is traced)."""
    monkeypatch.setattr(fxj, "transport", request.param)
    return request.param


def optax_ce(x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


# ------------------------------------------------------------------ vs optax


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 17), (4, 1000), (2, 1)])
def test_cross_entropy_integer_labels_matches_optax(shape):
    x, y = logits_of(shape), labels_of(shape[:-1], shape[-1])
    loss, grad = vg(fxj.cross_entropy)(x, y)
    want_loss, want_grad = vg(optax_ce)(x, y)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    close(loss, want_loss)
    close(grad, want_grad)


def test_cross_entropy_class_axis_1_matches_optax():
    x, y = logits_of((2, 7, 5)), labels_of((2, 5), 7)
    got = jgrad(lambda x: fxj.cross_entropy(x, y, axis=1))(x)
    want = jgrad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=1).mean())(x)
    close(got, want)


def test_cross_entropy_probability_targets_match_optax():
    x, p = logits_of((6, 33)), probs_of((6, 33))
    loss, grad = vg(fxj.cross_entropy)(x, p)
    want_loss, want_grad = vg(
        lambda x: optax.softmax_cross_entropy(x, p).mean())(x)
    close(loss, want_loss)
    close(grad, want_grad)


def test_binary_cross_entropy_matches_optax():
    x = logits_of((5, 9))
    t = jnp.asarray(rng(3).random((5, 9)), jnp.float32)
    loss, grad = vg(fxj.binary_cross_entropy)(x, t)
    want_loss, want_grad = vg(
        lambda x: optax.sigmoid_binary_cross_entropy(x, t).mean())(x)
    close(loss, want_loss)
    close(grad, want_grad)
    none = fxj.binary_cross_entropy(x, t, reduction="none")
    close(none, optax.sigmoid_binary_cross_entropy(x, t), rtol=1e-5, atol=1e-6)


def test_kl_div_probs_and_log_probs_match_optax():
    x, p = logits_of((7, 12)), probs_of((7, 12))
    want_loss, want_grad = vg(
        lambda x: optax.kl_divergence(jax.nn.log_softmax(x), p).mean())(x)
    for kind, target in (("probs", p), ("log_probs", jnp.log(p))):
        loss, grad = vg(lambda x: fxj.kl_div(x, target, target_kind=kind))(x)
        close(loss, want_loss, rtol=1e-5)
        close(grad, want_grad)
    log_targets = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(x), jnp.log(p))
    close(fxj.kl_div(x, jnp.log(p), target_kind="log_probs", reduction="none"), log_targets,
          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_div_logits_target_with_temperature_matches_optax(temperature):
    T = temperature
    x, t = logits_of((4, 20)), logits_of((4, 20), seed=5)

    def optax_kd(x):
        p = jax.nn.softmax(t / T)
        return T * T * optax.kl_divergence(jax.nn.log_softmax(x / T), p).mean()

    loss, grad = vg(
        lambda x: fxj.kl_div(x, t, target_kind="logits", temperature=T))(x)
    want_loss, want_grad = vg(optax_kd)(x)
    close(loss, want_loss, rtol=1e-5)
    close(grad, want_grad, atol=1e-6)


def test_building_blocks_match_jax_nn():
    x = logits_of((3, 4, 11))
    close(fxj.log_softmax(x), jax.nn.log_softmax(x), atol=1e-6)
    close(fxj.softmax(x, axis=1), jax.nn.softmax(x, axis=1))
    close(fxj.logsumexp(x, axis=0), jax.nn.logsumexp(x, axis=0), atol=1e-6)
    w = jnp.asarray(rng(4).standard_normal(x.shape), jnp.float32)
    for ours, theirs, kw in (
        (fxj.log_softmax, jax.nn.log_softmax, {"axis": -1}),
        (fxj.softmax, jax.nn.softmax, {"axis": 1}),
    ):
        got = jgrad(lambda x: jnp.sum(w * ours(x, **kw)))(x)
        want = jgrad(lambda x: jnp.sum(w * theirs(x, **kw)))(x)
        close(got, want, atol=2e-6)
    got = jgrad(lambda x: jnp.sum(w[0] * fxj.logsumexp(x, axis=0)))(x)
    want = jgrad(lambda x: jnp.sum(w[0] * jax.nn.logsumexp(x, axis=0)))(x)
    close(got, want)


# ------------------------------------------------------ vs fastxent.reference


def _ref_grad(np_fn, x, t, cot, **kw):
    """The reference gradient with the cotangent as grad_output."""
    return np_fn(np.asarray(x), np.asarray(t), grad_output=np.asarray(cot, np.float64), **kw)[1]


@pytest.mark.parametrize("options", [
    {"weight": True},
    {"ignore_index": 3},
    {"label_smoothing": 0.2},
    {"weight": True, "ignore_index": 0, "label_smoothing": 0.1, "reduction": "sum"},
    {"reduction": "none", "base": 2},
    {"reduction": "none", "weight": True, "axis": 0},
])
def test_cross_entropy_options_against_reference(options):
    kw = dict(options)
    axis = kw.get("axis", -1)
    x = logits_of((6, 9))
    c = x.shape[axis]
    y = labels_of((9,) if axis == 0 else (6,), c)
    if kw.pop("weight", False):
        kw["weight"] = jnp.asarray(rng(7).random(c) + 0.1, jnp.float32)
    np_kw = {k: (np.asarray(v) if k == "weight" else v) for k, v in kw.items()}
    loss = fxj.cross_entropy(x, y, **kw)
    close(loss, reference.cross_entropy(np.asarray(x), np.asarray(y), **np_kw), rtol=1e-5, atol=1e-6)
    cot = jnp.asarray(rng(8).standard_normal(loss.shape), jnp.float32)
    grad = jgrad(lambda x: jnp.sum(cot * fxj.cross_entropy(x, y, **kw)))(x)
    close(grad, _ref_grad(reference.cross_entropy_with_grad, x, y, cot, **np_kw), atol=1e-6)


def test_soft_labels_with_weight_and_smoothing_against_reference():
    x, p = logits_of((5, 8)), probs_of((5, 8))
    w = jnp.asarray(rng(9).random(8), jnp.float32)
    kw = dict(weight=w, label_smoothing=0.3)
    np_kw = dict(weight=np.asarray(w), label_smoothing=0.3)
    loss, grad = vg(lambda x: fxj.cross_entropy(x, p, **kw))(x)
    want_loss, want_grad = reference.cross_entropy_with_grad(np.asarray(x), np.asarray(p), **np_kw)
    close(loss, want_loss, rtol=1e-5)
    close(grad, want_grad, atol=1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_reductions_against_reference(reduction):
    x, t = logits_of((2, 3, 10)), logits_of((2, 3, 10), seed=11)
    kw = dict(target_kind="logits", temperature=2.0, reduction=reduction)
    loss = fxj.kl_div(x, t, **kw)
    close(loss, reference.kl_div(np.asarray(x), np.asarray(t), **kw), rtol=1e-5, atol=1e-6)
    cot = jnp.asarray(rng(12).standard_normal(loss.shape), jnp.float32)
    grad = jgrad(lambda x: jnp.sum(cot * fxj.kl_div(x, t, **kw)))(x)
    close(grad, _ref_grad(reference.kl_div_with_grad, x, t, cot, **kw), atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_weights_against_reference(reduction):
    x = logits_of((4, 6))
    t = jnp.asarray(rng(13).random((4, 6)), jnp.float32)
    w = jnp.asarray(rng(14).random((4, 1)), jnp.float32)
    pw = jnp.asarray(rng(15).random(6) * 3, jnp.float32)
    kw = dict(weight=w, pos_weight=pw, reduction=reduction)
    np_kw = dict(weight=np.asarray(w), pos_weight=np.asarray(pw), reduction=reduction)
    loss = fxj.binary_cross_entropy(x, t, **kw)
    close(loss, reference.binary_cross_entropy(np.asarray(x), np.asarray(t), **np_kw),
          rtol=1e-5, atol=1e-6)
    cot = jnp.asarray(rng(16).standard_normal(loss.shape), jnp.float32)
    grad = jgrad(lambda x: jnp.sum(cot * fxj.binary_cross_entropy(x, t, **kw)))(x)
    close(grad, _ref_grad(reference.binary_cross_entropy_with_grad, x, t, cot, **np_kw), atol=1e-6)


def test_float64_against_reference():
    with jax.enable_x64(True):
        x = jnp.asarray(rng(17).standard_normal((5, 13)), jnp.float64)
        y = jnp.asarray(rng(18).integers(0, 13, 5))
        loss, grad = vg(lambda x: fxj.cross_entropy(x, y, label_smoothing=0.1))(x)
        assert loss.dtype == jnp.float64 and grad.dtype == jnp.float64
        want_loss, want_grad = reference.cross_entropy_with_grad(
            np.asarray(x), np.asarray(y), label_smoothing=0.1)
        close(loss, want_loss, rtol=1e-12, atol=0)
        close(grad, want_grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------ transformations


def test_jit_value_and_grad_and_threads(transport):
    x, y = logits_of((64, 50)), labels_of(64, 50)
    jaxpr = str(jax.make_jaxpr(lambda x, y: fxj.cross_entropy(x, y))(x, y))
    assert ("pure_callback" in jaxpr) == (transport == "callback"), jaxpr
    f = jax.jit(jax.value_and_grad(lambda x, y: fxj.cross_entropy(x, y)))
    loss, grad = f(x, y)
    want_loss, want_grad = vg(optax_ce)(x, y)
    close(loss, want_loss)
    close(grad, want_grad)
    for n in (1, 2):
        l_n, g_n = jax.jit(jax.value_and_grad(
            lambda x, y: fxj.cross_entropy(x, y, num_threads=n)))(x, y)
        assert float(l_n) == float(loss)
        assert np.array_equal(np.asarray(g_n), np.asarray(grad))


def test_vmap_over_batches_of_problems(transport):
    xs, ys = logits_of((3, 8, 10)), labels_of((3, 8), 10)
    per = jax.vmap(fxj.cross_entropy)(xs, ys)
    close(per, [optax_ce(xs[i], ys[i]) for i in range(3)])
    # unbatched labels, vmapped grad, and a nested vmap
    shared = jax.vmap(jgrad(fxj.cross_entropy), in_axes=(0, None))(xs, ys[0])
    close(shared, [jgrad(optax_ce)(xs[i], ys[0]) for i in range(3)])
    x4, y4 = xs[:, :4].reshape(3, 2, 2, 10), ys[:, :4].reshape(3, 2, 2)
    nested = jax.vmap(jax.vmap(fxj.cross_entropy))(x4, y4)
    close(nested, jax.vmap(jax.vmap(optax_ce))(x4, y4))
    # vmap of jit of value_and_grad, with a batched weight
    w = jnp.asarray(rng(19).random((3, 10)) + 0.5, jnp.float32)
    vg = jax.vmap(jax.jit(jax.value_and_grad(
        lambda x, y, w: fxj.cross_entropy(x, y, weight=w, reduction="sum"))))
    loss, grad = vg(xs, ys, w)
    for i in range(3):
        wl, wg = reference.cross_entropy_with_grad(np.asarray(xs[i]), np.asarray(ys[i]),
                                                   weight=np.asarray(w[i]), reduction="sum")
        close(loss[i], wl, rtol=1e-5)
        close(grad[i], wg, atol=1e-6)


def test_vmap_of_the_other_functions(transport):
    xs, ts = logits_of((2, 5, 7)), probs_of((2, 5, 7))
    close(jax.vmap(fxj.kl_div)(xs, ts), [fxj.kl_div(xs[i], ts[i]) for i in range(2)])
    close(jax.vmap(fxj.binary_cross_entropy, in_axes=(0, None))(xs, ts[0]),
          [fxj.binary_cross_entropy(xs[i], ts[0]) for i in range(2)])
    close(jax.vmap(fxj.log_softmax)(xs), jax.nn.log_softmax(xs), atol=1e-6)
    close(jax.vmap(lambda x: fxj.logsumexp(x, axis=0))(xs), jax.nn.logsumexp(xs, axis=1),
          atol=1e-6)
    close(jax.vmap(jgrad(lambda x: fxj.softmax(x)[0, 0]))(xs),
          jax.vmap(jgrad(lambda x: jax.nn.softmax(x)[0, 0]))(xs))


def test_integer_labels_get_float0_cotangents(transport):
    x, y = logits_of((4, 6)), labels_of(4, 6)
    gx, gy = jax.grad(fxj.cross_entropy, argnums=(0, 1), allow_int=True)(x, y)
    assert gy.dtype == jax.dtypes.float0 and gy.shape == y.shape
    close(gx, jgrad(optax_ce)(x, y))


def test_loss_not_used_gives_zero_gradient():
    x, y = logits_of((4, 6)), labels_of(4, 6)
    g = jgrad(lambda x: jnp.sum(x) + 0.0 * fxj.cross_entropy(x, y))(x)
    close(g, jnp.ones_like(x))
    g = jgrad(lambda x: jnp.sum(x) + jax.lax.stop_gradient(fxj.cross_entropy(x, y)))(x)
    close(g, jnp.ones_like(x))


def test_sgd_steps_decrease_the_loss():
    data = rng(20)
    feats = jnp.asarray(data.standard_normal((256, 16)), jnp.float32)
    labels = jnp.asarray(np.argmax(np.asarray(feats) @ data.standard_normal((16, 4)), 1))
    params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros(4)}
    opt = optax.sgd(0.5)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = vg(
            lambda p: fxj.cross_entropy(feats @ p["w"] + p["b"], labels))(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(4), rel=1e-6)
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------ 16-bit


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits(dtype, transport):
    x, y = logits_of((16, 40)).astype(dtype), labels_of(16, 40)
    loss, grad = jax.jit(jax.value_and_grad(fxj.cross_entropy))(x, y)
    assert loss.dtype == jnp.float32 and grad.dtype == dtype
    want_loss, want_grad = fastxent.cross_entropy_with_grad(np.asarray(x), np.asarray(y))
    assert float(loss) == float(want_loss)
    assert np.array_equal(np.asarray(grad), want_grad)
    # and within 16-bit rounding of optax on the widened input
    close(grad, jgrad(optax_ce)(x.astype(jnp.float32), y), rtol=1e-2, atol=1e-4)
    ls = fxj.log_softmax(x)
    assert ls.dtype == dtype and fxj.logsumexp(x).dtype == jnp.float32


# ------------------------------------------------------------------ errors


def test_static_option_errors():
    x, y = logits_of((4, 6)), labels_of(4, 6)
    with pytest.raises(ValueError, match="reduction"):
        fxj.cross_entropy(x, y, reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        fxj.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        fxj.cross_entropy(x, y[:3])
    with pytest.raises(ValueError, match="axis 2"):
        fxj.cross_entropy(x, y, axis=2)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        fxj.cross_entropy(x, y, weight=jnp.ones(5))
    with pytest.raises(TypeError, match="floating dtype"):
        fxj.cross_entropy(y.reshape(2, 2), y[:2])
    with pytest.raises(ValueError, match="target_kind"):
        fxj.kl_div(x, x, target_kind="log")
    with pytest.raises(ValueError, match="temperature"):
        fxj.kl_div(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="base"):
        fxj.kl_div(x, x, base=1)
    with pytest.raises(ValueError, match="num_threads"):
        fxj.softmax(x, num_threads=0)
    with pytest.raises(ValueError, match="pos_weight"):
        fxj.binary_cross_entropy(x, x, pos_weight=jnp.ones(5))
    with pytest.raises(TypeError, match="label_smoothing must be a static"):
        jax.jit(lambda x, e: fxj.cross_entropy(x, y, label_smoothing=e))(x, 0.1)


def test_gradient_with_respect_to_targets_is_refused():
    x, p = logits_of((4, 6)), probs_of((4, 6))
    with pytest.raises(NotImplementedError, match="not labels"):
        jax.grad(fxj.cross_entropy, argnums=1)(x, p)
    with pytest.raises(NotImplementedError, match="not target"):
        jax.grad(fxj.kl_div, argnums=(0, 1))(x, p)
    w = jnp.ones(6)
    with pytest.raises(NotImplementedError, match="not weight"):
        jax.grad(lambda w: fxj.cross_entropy(x, labels_of(4, 6), weight=w))(w)
    # a constant target is fine when it is not differentiated
    jax.grad(lambda x, p: fxj.kl_div(x, jax.lax.stop_gradient(p)), argnums=(0, 1))(x, p)


@pytest.mark.parametrize("jit", [False, True])
def test_data_errors_carry_fastxent_message(jit, transport):
    x, y = logits_of((4, 6)), labels_of(4, 6).at[2].set(6)
    f = jax.jit(lambda x, y: fxj.cross_entropy(x, y)) if jit else fxj.cross_entropy
    with pytest.raises(Exception, match=r"label 6 at position \(2,\) is out of range"):
        jax.block_until_ready(f(x, y))
    w = jnp.asarray([1, 1, -1, 1, 1, 1], jnp.float32)
    with pytest.raises(Exception, match="weight must be finite and non-negative"):
        jax.block_until_ready(jax.grad(lambda x: fxj.cross_entropy(x, y.at[2].set(0), weight=w))(x))


def test_second_derivatives_raise():
    x, y = logits_of((2, 3)), labels_of(2, 3)
    with pytest.raises((ValueError, TypeError)):
        jax.hessian(lambda x: fxj.cross_entropy(x, y))(x)


def test_compiled_program_finds_its_function_by_content():
    # What a program from the persistent compilation cache relies on: the
    # call's attribute alone names the NumPy function and its options.
    x, y = logits_of((4, 6)), labels_of(4, 6)
    f = jax.jit(lambda x: fxj.cross_entropy(x, y, label_smoothing=0.25))
    before = f(x)
    fxj._host.cache_clear()
    assert float(f(x)) == float(before)
    close(before, reference.cross_entropy(np.asarray(x), np.asarray(y), label_smoothing=0.25),
          rtol=1e-5)


def test_vmap_of_bce_with_broadcast_weights(transport):
    xs = logits_of((3, 4, 6))
    t = jnp.asarray(rng(21).random((4, 6)), jnp.float32)
    w, pw = jnp.asarray(rng(22).random((4, 1)), jnp.float32), jnp.arange(1.0, 7.0)
    f = jax.vmap(jax.value_and_grad(
        lambda x, pw: fxj.binary_cross_entropy(x, t, weight=w, pos_weight=pw, reduction="sum")))
    pws = jnp.stack([pw, 2 * pw, 3 * pw])
    loss, grad = f(xs, pws)
    for i in range(3):
        wl, wg = reference.binary_cross_entropy_with_grad(
            np.asarray(xs[i]), np.asarray(t), weight=np.asarray(w), pos_weight=np.asarray(pws[i]),
            reduction="sum")
        close(loss[i], wl, rtol=1e-5)
        close(grad[i], wg, atol=1e-6)
