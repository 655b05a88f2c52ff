"""The C row kernel of the cross entropy options (csrc/rows/ce_opts.h),
compiled on its own with a two-function driver and called through ctypes,
against fastxent.reference: per-row loss, lse, argmax and the gradient with
per-row factors, soft-capping and z-loss, hard and soft labels, in place."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import assert_close, compile_c_driver, grad_scale

from fastxent import reference


DRIVER = """
#include "rows/ce_opts.h"
void run_f32(const fx_ce_opts_job *job) { fx_ce_opts_rows_f32(job, 0, job->n_rows); }
void run_f64(const fx_ce_opts_job *job) { fx_ce_opts_rows_f64(job, 0, job->n_rows); }
"""


class Job(ctypes.Structure):
    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_ld", ctypes.c_int64),
        ("labels", ctypes.c_void_p), ("ignore_index", ctypes.c_int64),
        ("t", ctypes.c_void_p), ("t_ld", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("w_sum", ctypes.c_double), ("eps", ctypes.c_double),
        ("softcap", ctypes.c_double), ("z_loss", ctypes.c_double),
        ("ce_scale", ctypes.c_void_p), ("z_scale", ctypes.c_void_p),
        ("grad", ctypes.c_void_p), ("grad_ld", ctypes.c_int64),
        ("ce", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("argmax", ctypes.c_void_p),
    ]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return compile_c_driver(tmp_path_factory, "ce_opts", DRIVER)


def _ptr(a):
    return None if a is None else a.ctypes.data


def _run(kernel, x, labels=None, t=None, w=None, eps=0.0, softcap=0.0, z_loss=0.0,
         ce_scale=None, z_scale=None, inplace=False):
    n, c = x.shape
    grad = None if ce_scale is None else (x if inplace else np.empty_like(x))
    ce, lse, am = np.empty(n), np.empty(n), np.empty(n, np.int64)
    job = Job(n, c, _ptr(x), c, _ptr(labels), -100, _ptr(t), c, _ptr(w),
              float(c if w is None else np.sum(w, dtype=np.float64)), eps, softcap, z_loss,
              _ptr(ce_scale), _ptr(z_scale), _ptr(grad), c, _ptr(ce), _ptr(lse), _ptr(am))
    getattr(kernel, "run_f32" if x.dtype == np.float32 else "run_f64")(ctypes.byref(job))
    return ce, lse, am, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(softcap=4.0),
    dict(z_loss=1e-2),
    dict(softcap=3.0, z_loss=1e-3, eps=0.1, weighted=True),
    dict(eps=0.2),
], ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_against_reference(kernel, dtype, soft, opts, inplace):
    rng = np.random.default_rng(len(str(opts)) + 7 * soft)
    n, c = 9, 37
    x = (4 * rng.standard_normal((n, c))).astype(dtype)
    x[0, [3, 9]] = x[0].max() + 1  # a tie: the lowest index wins
    labels = t = None
    if soft:
        t = rng.random((n, c)).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    else:
        labels = rng.integers(0, c, n)
        labels[4] = -100
    w = (rng.random(c) + 0.5).astype(dtype) if opts.get("weighted") else None
    eps, cap, z = opts.get("eps", 0.0), opts.get("softcap", 0.0), opts.get("z_loss", 0.0)
    ce_scale, z_scale = rng.random(n), rng.random(n)
    x64 = x.astype(np.float64)
    ce, lse, am, grad = _run(kernel, x.copy() if inplace else x, labels, t, w, eps, cap, z,
                             ce_scale, z_scale, inplace)
    kw = dict(weight=w, label_smoothing=eps, softcap=cap or None, reduction="none")
    y = t.astype(np.float64) if soft else labels
    # reduction "none" with sample_weight = ce_scale gives grad_output * ce_scale;
    # the z part is checked with its own scale below.
    ref_ce = reference.cross_entropy(x64, y, **kw)
    _, ref_g = reference.cross_entropy_with_grad(x64, y, grad_output=ce_scale, **kw)
    ref_lse = reference.logsumexp(cap * np.tanh(x64 / cap) if cap else x64)
    counted = np.ones(n, bool) if soft else labels != -100
    if z:
        zc = cap * np.tanh(x64 / cap) if cap else x64
        dz = (1 - np.tanh(x64 / cap) ** 2) if cap else 1.0
        ref_g = ref_g + np.where(counted, 2 * z * ref_lse * z_scale, 0)[:, None] \
            * reference.softmax(zc) * dz
    assert_close(ce, ref_ce, dtype, ulps=32, rtol64=1e-12, what="ce")
    assert_close(lse, ref_lse, dtype, ulps=32, rtol64=1e-12, what="lse")
    np.testing.assert_array_equal(am, np.argmax(x, axis=1))
    assert am[0] == 3
    assert_close(grad, ref_g, dtype, ulps=64, scale=grad_scale(ref_g, 1e-30), rtol64=1e-11,
                 what="grad")
    if not soft:
        assert not grad[4].any()


def test_loss_only_leaves_no_gradient(kernel):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    ce, lse, am, grad = _run(kernel, x, labels=np.array([0, 1, 2]))
    assert grad is None
    np.testing.assert_allclose(lse, reference.logsumexp(x), rtol=1e-15)
    np.testing.assert_array_equal(am, [3, 3, 3])
