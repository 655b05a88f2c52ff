"""Measure the transports of fastxent.jax against a compiled XLA FFI handler.

    flock /tmp/fx-bench.lock python benchmarks/jax_ffi/build_and_time.py [rounds]

Compiles ce_ffi.cc (g++, C++17) against ``jax.ffi.include_dir()`` and
``csrc/fastxent.h`` into a temporary directory, registers it for the CPU
platform, and times ``jit(value_and_grad(mean cross entropy))`` and the
forward alone, one fastxent thread, at (8, 10) and (4096, 32000) float32:

- ``c++ ffi``: the compiled handler (a prototype: float32 logits, int64
  labels, mean only), not part of the package build;
- ``ctypes ffi``: ``fastxent.jax.cross_entropy`` as shipped (its handler is
  a ctypes function, ``transport = "ffi"``);
- ``pure_callback``: the same with ``transport = "callback"``;
- ``optax``: ``softmax_cross_entropy_with_integer_labels(...).mean()``.

Contenders are interleaved round by round (the machine may be shared);
prints the median of each over the rounds.
"""

import ctypes
import os
import subprocess
import sys
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)  # int64 labels, as the handler takes

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _core  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build():
    out = os.path.join(tempfile.mkdtemp(prefix="fx-jax-ffi-"), "libce_ffi.so")
    cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
           "-I", jax.ffi.include_dir(), "-I", os.path.join(ROOT, "csrc"),
           os.path.join(HERE, "ce_ffi.cc"), "-o", out]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"built in {time.perf_counter() - t:.1f} s: {' '.join(cmd)}")
    return out


def register(path):
    lib = ctypes.cdll.LoadLibrary(path)
    core = ctypes.CDLL(_core.__file__)  # the loaded extension: same handle
    addr = [ctypes.cast(getattr(core, f), ctypes.c_void_p) for f in
            ("fx_run", "fx_check_labels", "fx_sum_f64")]
    lib.fxjax_bind(*addr)
    for name in ("FxCeMeanGrad", "FxCeMeanLoss"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")


def ffi_cross_entropy(num_threads=1, ignore_index=-100):
    attrs = dict(ignore_index=np.int64(ignore_index), num_threads=np.int32(num_threads))

    @jax.custom_vjp
    def ce(x, y):
        return jax.ffi.ffi_call("FxCeMeanLoss", jax.ShapeDtypeStruct((), jnp.float32))(x, y, **attrs)

    def fwd(x, y):
        loss, grad = jax.ffi.ffi_call(
            "FxCeMeanGrad",
            (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(x.shape, x.dtype)),
        )(x, y, **attrs)
        return loss, grad

    def bwd(grad, g):
        return (grad * g, None)

    ce.defvjp(fwd, bwd)
    return ce


def median_us(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * float(np.median(ts))


def fastxent_via(transport):
    def ce(x, y):
        previous, fxj.transport = fxj.transport, transport  # read when traced
        try:
            return fxj.cross_entropy(x, y, num_threads=1)
        finally:
            fxj.transport = previous
    return ce


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    register(build())
    contenders = {
        "c++ ffi": ffi_cross_entropy(),
        "ctypes ffi": fastxent_via("ffi"),
        "pure_callback": fastxent_via("callback"),
        "optax": lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
    }
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, fastxent ISA {fastxent.show_config(False).get('isa')}, "
          f"{os.cpu_count()} CPUs, one fastxent thread; XLA default threading; "
          f"median of {rounds} rounds")
    for (n, c), reps in (((8, 10), 500), ((4096, 32000), 1)):
        x = jnp.asarray(rng.standard_normal((n, c), dtype=np.float32))
        y = jnp.asarray(rng.integers(0, c, n))
        ref_loss, ref_grad = fastxent.cross_entropy_with_grad(np.asarray(x), np.asarray(y))
        fns = {}
        for name, f in contenders.items():
            vg, fw = jax.jit(jax.value_and_grad(f)), jax.jit(f)
            loss, grad = vg(x, y)
            err = float(np.max(np.abs(np.asarray(grad) - ref_grad)))
            assert abs(float(loss) - float(ref_loss)) < 1e-5 and err < 1e-6, (name, loss, err)
            jax.block_until_ready(fw(x, y))
            fns[name] = (vg, fw)
        times = {name: ([], []) for name in contenders}
        for _ in range(rounds):
            for name, (vg, fw) in fns.items():
                times[name][0].append(median_us(lambda: jax.block_until_ready(vg(x, y)), reps))
                times[name][1].append(median_us(lambda: jax.block_until_ready(fw(x, y)), reps))
        for name, (t_vg, t_fw) in times.items():
            print(f"({n}, {c}) {name:14s} fwd+bwd {np.median(t_vg):12.1f} us   "
                  f"fwd {np.median(t_fw):12.1f} us")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
