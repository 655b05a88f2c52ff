"""The C row kernel of jsd (csrc/rows/jsd.h), compiled on its own with a
two-function driver and called through ctypes, against fastxent.reference."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import assert_close, compile_c_driver, grad_scale

from fastxent import reference

KINDS = {"logits": 0, "log_probs": 1, "probs": 2}

DRIVER = """
#include "rows/jsd.h"
void run_f32(const fx_jsd_job *job) { fx_jsd_rows_f32(job, 0, job->n_rows); }
void run_f64(const fx_jsd_job *job) { fx_jsd_rows_f64(job, 0, job->n_rows); }
"""


class Job(ctypes.Structure):
    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_ld", ctypes.c_int64),
        ("t", ctypes.c_void_p), ("t_ld", ctypes.c_int64),
        ("kind", ctypes.c_int),
        ("labels", ctypes.c_void_p), ("ignore_index", ctypes.c_int64),
        ("beta", ctypes.c_double), ("temperature", ctypes.c_double),
        ("gscale", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("grad_ld", ctypes.c_int64),
        ("loss", ctypes.c_void_p),
    ]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return compile_c_driver(tmp_path_factory, "jsd", DRIVER)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_against_reference(kernel, dtype, kind, beta, inplace):
    rng = np.random.default_rng(3)
    n, c, T = 7, 29, 1.6
    x = (3 * rng.standard_normal((n, c))).astype(dtype)
    t = 3 * rng.standard_normal((n, c))
    t = {"logits": t, "log_probs": reference.log_softmax(t), "probs": reference.softmax(t)}[kind]
    t = t.astype(dtype)
    labels = rng.integers(0, c, n)
    labels[2] = -100
    gscale = rng.random(n)
    ref_rows = reference.jsd(x, t, beta=beta, temperature=T, target_kind=kind, labels=labels,
                             reduction="none")
    _, ref_g = reference.jsd_with_grad(x, t, beta=beta, temperature=T, target_kind=kind,
                                       labels=labels, reduction="none", grad_output=gscale)
    xin = x.copy()
    grad = xin if inplace else np.empty_like(x)
    loss = np.empty(n)
    job = Job(n, c, xin.ctypes.data, c, t.ctypes.data, c, KINDS[kind], labels.ctypes.data, -100,
              beta, T, gscale.ctypes.data, grad.ctypes.data, c, loss.ctypes.data)
    getattr(kernel, "run_f32" if dtype == np.float32 else "run_f64")(ctypes.byref(job))
    assert_close(loss, ref_rows, dtype, ulps=64, rtol64=1e-11, what="loss")
    assert_close(grad, ref_g, dtype, ulps=64, scale=grad_scale(ref_g, 1e-30), rtol64=1e-11,
                 what="grad")
    assert not grad[2].any()
