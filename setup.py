"""Build of the fastxent extension.

One extension module, fastxent._core: the Cython binding, the dispatcher and
the threading layer, plus the row kernels compiled once per instruction set
(csrc/kernels_<isa>.c, each with its own -m flags). The build never uses
-march=native: a wheel carries every ISA and picks one at run time.

OpenMP: probed with a test compile. Without it the build is serial and says
so loudly; with FASTXENT_REQUIRE_OPENMP=1 a missing OpenMP is an error.
FASTXENT_DISABLE_OPENMP=1 skips the probe: the serial build a compiler without
OpenMP (Apple clang) gives, made on any machine so that it can be tested.

FASTXENT_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(-O1 -g1: line tables, enough for their stack traces at half the compile time
of -g; every object including the ISA kernels); run Python with the ASan
runtime preloaded (scripts/sanitize.sh does this).

FASTXENT_BUILD_CACHE=<dir> keeps the compiled kernel objects there, keyed by
the compiler, its flags and the content of every file under csrc/: a build
whose key matches (the sdist, wheel and serial builds of one tree, a rebuild
after a change to the binding) copies them instead of compiling, which is
most of the build time. The kernel objects do not depend on OpenMP.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

# No contraction: an FMA in one ISA build and not in another would change
# the bits of the results (the float32 exp fuses explicitly, on every ISA,
# see csrc/simd/expm.h). No fast-math: the kernels rely on IEEE inf/NaN.
BASE_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi"]
SANITIZE = os.environ.get("FASTXENT_SANITIZE", "").strip().lower() in ("1", "true", "yes", "on")
# No use-after-scope poisoning: every always-inlined helper's vector locals
# got their own, which doubled the kernels' compile time (GCC 12: 13 to 6
# minutes for the baseline and avx2 files); the kernels keep no pointer to
# a scoped local.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-sanitize-address-use-after-scope",
                  "-fno-omit-frame-pointer", "-g1", "-O1"]
if SANITIZE:
    BASE_FLAGS = [f for f in BASE_FLAGS if f != "-O3"] + SANITIZE_FLAGS

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386", "x86")
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # GCC's tuning for some AVX-512 CPUs prefers 256-bit vectors; the kernels
    # want the full width.
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq",
               "-mavx512vl", "-mprefer-vector-width=512"],
} if X86 else {}

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class BuildExt(build_ext):
    def _compiles(self, source, flags):
        tmp = tempfile.mkdtemp(prefix="fastxent-probe-")
        try:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            objs = self.compiler.compile([path], output_dir=tmp, extra_postargs=flags)
            self.compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
            return subprocess.call([os.path.join(tmp, "probe")]) == 0
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extension(self, ext):
        disabled = _truthy("FASTXENT_DISABLE_OPENMP")
        openmp = not disabled and self._compiles(OPENMP_PROBE, ["-fopenmp"])
        if openmp:
            ext.extra_compile_args += ["-fopenmp"]
            ext.extra_link_args += ["-fopenmp"]
        elif _truthy("FASTXENT_REQUIRE_OPENMP"):
            why = "FASTXENT_DISABLE_OPENMP=1" if disabled else "the compiler cannot build OpenMP code (-fopenmp failed)"
            raise RuntimeError(f"FASTXENT_REQUIRE_OPENMP=1 but {why}")
        else:
            banner = "*" * 72
            sys.stderr.write(f"\n{banner}\nWARNING: OpenMP is not available: fastxent is "
                             f"being built SERIAL (one thread).\n{banner}\n\n")

        # The kernel files (one per instruction set, the baseline included)
        # are most of the build time, and independent: compiled in parallel.
        cache = os.environ.get("FASTXENT_BUILD_CACHE", "").strip()
        sources_key = _kernel_sources_key(self.compiler.compiler_so) if cache else None

        def compile_kernels(isa):
            src = os.path.join(CSRC, f"kernels_{isa}.c")
            flags = BASE_FLAGS + ISA_FLAGS.get(isa, [])
            cached = None
            if cache:
                key = hashlib.sha256(f"{sources_key}|{src}|{flags}".encode()).hexdigest()[:32]
                cached = os.path.join(cache, f"{key}.o")
                if os.path.exists(cached):
                    obj = self.compiler.object_filenames([src], output_dir=self.build_temp)[0]
                    self.mkpath(os.path.dirname(obj))
                    shutil.copyfile(cached, obj)
                    sys.stderr.write(f"fastxent: {src} from the build cache\n")
                    return [obj]
            objs = self.compiler.compile([src], output_dir=self.build_temp,
                                         include_dirs=[CSRC], extra_postargs=flags)
            if cached:
                os.makedirs(cache, exist_ok=True)
                tmp = f"{cached}.{os.getpid()}.tmp"
                shutil.copyfile(objs[0], tmp)
                os.replace(tmp, cached)
            return objs

        isas = ["baseline", *ISA_FLAGS]
        self.mkpath(os.path.join(self.build_temp, CSRC))
        with ThreadPoolExecutor(max_workers=min(len(isas), os.cpu_count() or 1)) as pool:
            for objs in pool.map(compile_kernels, isas):
                ext.extra_objects += objs
        for isa in ISA_FLAGS:
            ext.define_macros.append((f"FX_HAVE_{isa.upper()}", "1"))
        super().build_extension(ext)


def _kernel_sources_key(compiler):
    """What the kernel objects depend on besides their flags: the compiler
    (its command and version) and the content of every file under csrc/."""
    h = hashlib.sha256(repr(compiler).encode())
    try:
        h.update(subprocess.run([compiler[0], "--version"], capture_output=True,
                                check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        h.update(b"unknown compiler version")
    for path in _csrc_files():
        h.update(path.encode() + b"\0")
        with open(os.path.join(HERE, path), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _csrc_files():
    """Every file under csrc/, subfolders included (the kernels include
    simd/*.h and rows/*.h): a change to any of them rebuilds."""
    found = []
    for root, _dirs, files in os.walk(os.path.join(HERE, CSRC)):
        rel = os.path.relpath(root, HERE)
        found += [os.path.join(rel, f) for f in sorted(files)]
    return sorted(found)


ext = Extension(
    "fastxent._core",
    sources=[
        "src/fastxent/_core.pyx",
        os.path.join(CSRC, "dispatch.c"),
        os.path.join(CSRC, "parallel.c"),
        os.path.join(CSRC, "selftest.c"),
        os.path.join(CSRC, "reduce.c"),
        os.path.join(CSRC, "xla_ffi.c"),
    ],
    # third_party: the vendored XLA FFI C API header (csrc/third_party/README.md).
    include_dirs=[CSRC, os.path.join(CSRC, "third_party"), np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=list(BASE_FLAGS),
    extra_link_args=list(SANITIZE_FLAGS) if SANITIZE else [],
    depends=_csrc_files(),
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives={"language_level": 3, "boundscheck": False,
                             "wraparound": False, "initializedcheck": False},
    ),
    cmdclass={"build_ext": BuildExt},
)
