"""The smoke subset: fast checks that an installed build of fastxent works.

``pytest -m smoke tests/test_smoke.py`` runs them against whatever
``import fastxent`` finds. ``.ci/run`` and cibuildwheel run them against a
freshly installed wheel from outside the source tree; they are part of the
ordinary test run too. What the build should be is read from the
environment:

* ``FASTXENT_EXPECT_OPENMP=0``: a serial build (a compiler without OpenMP,
  or ``FASTXENT_DISABLE_OPENMP=1``); otherwise OpenMP must be on.
* ``FASTXENT_EXPECT_VENDORED_OPENMP=1``: the OpenMP runtime must be the one
  ``auditwheel repair`` vendored next to the package (``fastxent.libs/``).
  It must be whenever that folder exists.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import fastxent
from fastxent import _core, reference

from conftest import assert_bitwise_equal, assert_close, each_isa, grad_scale

pytestmark = pytest.mark.smoke

EXPECT_OPENMP = os.environ.get("FASTXENT_EXPECT_OPENMP", "1") != "0"
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags():
    """The CPU's feature flags as the Linux kernel reports them."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _cpu_isas():
    """The kernel builds this CPU can run (same rules as csrc/dispatch.c)."""
    flags = _cpu_flags()
    isas = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        isas.append("avx512")
    return isas


def _vendored_libs_dir():
    """auditwheel's folder of vendored libraries next to the package, if any."""
    libs = Path(fastxent.__file__).resolve().parent.parent / "fastxent.libs"
    return libs if libs.is_dir() else None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _openmp_runtime_in_use():
    """The file of the OpenMP runtime the extension's calls go to in this process.

    Not what ``ldd`` says: a library already loaded under the same soname
    (torch's own libgomp.so.1, say) serves the extension instead of the
    system's. The symbol is looked up from the extension's handle, the way
    its own calls are bound, and dladdr names the file that holds it.
    """
    core = ctypes.CDLL(_core.__file__)
    address = ctypes.cast(core.omp_get_max_threads, ctypes.c_void_p)
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:  # glibc < 2.34: in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    info = _DlInfo()
    assert dladdr(address, ctypes.byref(info)), "dladdr found no library for omp_get_max_threads"
    return os.path.realpath(info.dli_fname.decode())


def test_version_is_the_package_metadata():
    try:
        installed = metadata.version("fastxent")
    except metadata.PackageNotFoundError:
        pytest.skip("fastxent runs from a source tree, not installed")
    assert fastxent.__version__ == installed
    assert fastxent.show_config(print_=False)["version"] == installed


def test_show_config_reports_openmp_and_every_isa_of_the_cpu(capsys, restore_num_threads):
    fastxent.set_num_threads(None)
    config = fastxent.show_config()
    printed = capsys.readouterr().out
    assert printed.startswith(f"fastxent {fastxent.__version__}\n")
    assert config["openmp"] is EXPECT_OPENMP
    if EXPECT_OPENMP:
        assert "OpenMP          : on" in printed
    else:
        assert "OpenMP          : OFF (serial build)" in printed
        assert config["num_threads"] == 1
    if sys.platform.startswith("linux") and X86_64:
        expected = _cpu_isas()
        assert config["isas_available"] == expected, (
            f"the CPU runs {expected}, the build offers {config['isas_available']}")
        if "FASTXENT_ISA" not in os.environ:
            assert config["isa"] == expected[-1]
    else:
        assert "baseline" in config["isas_available"]
    assert config["isa"] in printed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_and_gradient_on_every_isa(rng, dtype):
    logits = (3.0 * rng.standard_normal((33, 1000))).astype(dtype)
    logits[0] += 1e4  # a shared offset: the loss must keep its digits
    labels = rng.integers(0, 1000, size=33)
    labels[3] = -100  # ignored
    ref_loss = reference.cross_entropy(logits, labels)
    ref_loss_g, ref_grad = reference.cross_entropy_with_grad(logits, labels)
    results = []
    for _ in each_isa():
        loss = fastxent.cross_entropy(logits, labels)
        loss_g, grad = fastxent.cross_entropy_with_grad(logits, labels)
        assert_close(loss, ref_loss, dtype, what="loss")
        assert_close(loss_g, ref_loss_g, dtype, what="loss with grad")
        assert_close(grad, ref_grad, dtype, scale=grad_scale(ref_grad, 1e-3), what="grad")
        results.append((loss, grad))
    for loss, grad in results[1:]:  # the same bits on every instruction set
        assert_bitwise_equal(loss, results[0][0], "loss across ISAs")
        assert_bitwise_equal(grad, results[0][1], "grad across ISAs")


@pytest.mark.parametrize("name", ["log_softmax", "logsumexp", "entropy"])
def test_row_functions_against_the_reference(rng, name):
    x = (4.0 * rng.standard_normal((2, 17, 9))).astype(np.float32)
    got = getattr(fastxent, name)(x, axis=1)
    ref = getattr(reference, name)(x, axis=1)
    assert_close(got, ref, np.float32, what=name)


def test_softmax_rows_sum_to_one(rng):
    x = rng.standard_normal((64, 50257)).astype(np.float32)
    p = fastxent.softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1, dtype=np.float64), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, reference.softmax(x), rtol=1e-5, atol=1e-12)


def test_thread_counts_give_the_same_bits(rng):
    logits = rng.standard_normal((4096, 300)).astype(np.float32)
    labels = rng.integers(0, 300, size=4096)
    one = fastxent.cross_entropy_with_grad(logits, labels, num_threads=1)
    two = fastxent.cross_entropy_with_grad(logits, labels, num_threads=2)
    assert_bitwise_equal(one[0], two[0], "loss")
    assert_bitwise_equal(one[1], two[1], "grad")


def test_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="label"):
        fastxent.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))


@pytest.mark.skipif(not EXPECT_OPENMP, reason="a serial build has no OpenMP runtime")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dladdr and auditwheel: Linux")
def test_threadpoolctl_sees_and_limits_the_openmp_runtime(restore_num_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    runtime = _openmp_runtime_in_use()
    libs = _vendored_libs_dir()
    if libs is not None or os.environ.get("FASTXENT_EXPECT_VENDORED_OPENMP") == "1":
        assert libs is not None, "FASTXENT_EXPECT_VENDORED_OPENMP=1 but there is no fastxent.libs/"
        assert Path(runtime).parent == libs.resolve(), f"{runtime} is not the vendored runtime"
    listed = {os.path.realpath(info["filepath"]) for info in threadpoolctl.threadpool_info()
              if info["user_api"] == "openmp"}
    assert runtime in listed, f"threadpoolctl lists {sorted(listed)}, not {runtime}"

    fastxent.set_num_threads(None)  # follow OpenMP
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert fastxent.get_num_threads() == 2
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            assert fastxent.get_num_threads() == 1
            assert fastxent.show_config(print_=False)["num_threads"] == 1
        assert fastxent.get_num_threads() == 2
