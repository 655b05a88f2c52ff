#!/usr/bin/env python
"""Roofline probe: how fast could a fastxent kernel possibly be on this machine?

    python benchmarks/roofline.py                      # probe, print, cache
    python benchmarks/roofline.py --json probe.json    # ... and keep a copy
    python benchmarks/roofline.py --cached --shape 4096x32000   # bounds of a shape

Compiles ``benchmarks/roofline.c`` with the system C compiler into a temporary
directory (``$CC``, else ``cc``; ``-O3 -ffp-contract=off -fopenmp`` and the
widest of the ISA flag sets of ``setup.py`` that ``/proc/cpuinfo`` allows,
falling back to ``-O3`` alone if that does not build) and runs it. For each
thread count (1 and 2 by default) it measures, as the median of several
repetitions:

- ``read``: main-memory read bandwidth (sum of a 512 MiB float32 array);
- ``write``: write bandwidth (ordinary stores into a pre-faulted 512 MiB array;
  the hardware reads each line before writing it, the write-allocate);
- ``rw``: read+write bandwidth, ``y = a * x`` into a separate, pre-faulted
  array (bytes of x plus bytes of y per second, the STREAM convention);
- ``write_nt`` / ``rw_nt``: the same with streaming (non-temporal) stores,
  which skip the write-allocate read; what a kernel could gain from them;
- ``read_exp``: one pass that reads each float32 element from main memory
  and exponentiates it once (the exp loop below on the ``read`` array, each
  line prefetched 3 KiB ahead as the row kernels' one pass does): the
  measured cost of the one-pass row statistics, which the bound's
  ``max(memory, exp)`` assumes overlap perfectly;
- ``exp_f32`` / ``exp_f64``: throughput of the exp polynomial of
  ``csrc/simd/expm.h`` (``fx_expm_f32`` / ``fx_expm_f64``) in the loop of the
  fastxent sum-of-exponentials pass, on data in L1: nanoseconds per element,
  for all threads together (and per core = that times the thread count).

The result is cached in ``$FASTXENT_ROOFLINE_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/fastxent/roofline.json``, and reused while the
CPU model, core count and ``roofline.c`` are unchanged. ``bounds()`` turns it
into a lower bound on the time of one call:

    >>> from roofline import bounds
    >>> b = bounds(4096, 32000, 4, threads=2, kind="forward")
    >>> b.seconds, b.serial, b.limiter

The model (``B`` = N*C*dtype_bytes bytes of logits, ``E`` = N*C elements, each
rate the one measured with the same thread count):

===========  =================================  ============================
kind         functions                          memory time
===========  =================================  ============================
forward      cross_entropy, logsumexp, entropy  one read of the logits:
                                                ``B / read``
fused_out    cross_entropy_with_grad(out=g)     two reads + one write: x is
                                                read, g is read (write-
                                                allocate) and written:
                                                ``2B / rw``
write_op     log_softmax, softmax               one read of x + one write
                                                of the result: ``2B / rw``
===========  =================================  ============================

``rw`` is measured on exactly that traffic (read x, write a separate
pre-faulted y with ordinary stores, the write-allocate read of y included), so
fused_out and write_op have the same memory time: "two reads" of fused_out
*are* the read of x and the write-allocate read of g, which every ordinary
store to memory incurs, write_op's included. They are separate kinds so
that a report can say which function is held to which model. With
``stores="streaming"`` both use ``rw_nt`` instead (one read + one write on the
bus; fastxent does not use streaming stores, so this is what it could gain).

Every kind does at least one exp per element: ``exp = E * ns_per_element(T)``
(float32 or float64 polynomial by ``dtype_bytes``). The two are combined as

- ``seconds = max(memory, exp)``: the bound, if loads and exp overlap
  perfectly (the roofline);
- ``serial = memory + exp``: if they do not overlap at all (a kernel that
  streams and computes in turn would land here).

The bound is for data in main memory. An input (plus output) that fits in the
last-level cache (``llc_bytes`` in the probe's JSON) is read from cache when
a benchmark calls the function repeatedly and can beat it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "roofline.c"
CSRC = HERE.parent / "csrc"

SCHEMA = 1
DEFAULT_MIB = 512
DEFAULT_REPS = 7
DEFAULT_THREADS = (1, 2)
NOISY_SPREAD = 0.25  # (max - min) / median of the repetitions above which print_table warns
MIN_CPU_SHARE = 0.9  # CPU time / (wall x threads) below which it warns: the cores were shared

BASE_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi"]
# The flag sets of setup.py, widest first, with the /proc/cpuinfo flags each needs.
ISA_FLAGS = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"),
        ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
         "-mprefer-vector-width=512"],
    ),
    "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"]),
    "baseline": ((), []),
}

# Which model each benchmarked function is held to.
FUNCTION_KIND = {
    "cross_entropy": "forward",
    "logsumexp": "forward",
    "entropy": "forward",
    "cross_entropy_with_grad": "fused_out",
    "log_softmax": "write_op",
    "softmax": "write_op",
}
KINDS = ("forward", "fused_out", "write_op")


# --------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_bytes() -> int | None:
    """Size of the largest cache level of cpu0, from sysfs."""
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        value = int(size.rstrip("KMGkmg")) * scale
        if best is None or level > best[0]:
            best = (level, value)
    return best[1] if best else None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def source_hash() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update((CSRC / "simd" / "expm.h").read_bytes())
    h.update((CSRC / "simd" / "vec.h").read_bytes())
    return h.hexdigest()[:16]


def default_isa(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    for isa, (needs, _) in ISA_FLAGS.items():
        if all(f in flags for f in needs):
            return isa
    return "baseline"


def cache_path() -> Path:
    env = os.environ.get("FASTXENT_ROOFLINE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastxent" / "roofline.json"


# --------------------------------------------------------------------------
# Build and run
# --------------------------------------------------------------------------


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0] if out else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def build(workdir: str, isa: str | None = None, cc: str | None = None, verbose: bool = False):
    """Compile roofline.c into workdir; returns (binary, flags, isa, openmp).

    Tries ISA flags + OpenMP, then OpenMP alone, then ``-O3`` alone."""
    cc = cc or os.environ.get("CC") or "cc"
    isa = isa or default_isa()
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa must be one of {sorted(ISA_FLAGS)}, not {isa!r}")
    binary = os.path.join(workdir, "roofline")
    attempts = [
        (BASE_FLAGS + ["-fopenmp"] + ISA_FLAGS[isa][1], isa, True),
        (BASE_FLAGS + ["-fopenmp"], "baseline", True),
        (["-O3", "-ffp-contract=off"], "baseline", False),
    ]
    errors = []
    for flags, used_isa, openmp in attempts:
        cmd = [cc, *flags, str(SOURCE), "-o", binary, "-lm"]
        if verbose:
            print("+ " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return binary, flags, used_isa, openmp, cc
        errors.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()}")
    raise RuntimeError("could not compile roofline.c:\n" + "\n\n".join(errors))


def probe(mib: int = DEFAULT_MIB, reps: int = DEFAULT_REPS, threads=DEFAULT_THREADS,
          isa: str | None = None, cc: str | None = None, verbose: bool = False) -> dict:
    """Build and run the probe; returns its JSON (a dict). Takes seconds."""
    threads = [int(t) for t in threads]
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="fastxent-roofline-") as tmp:
        binary, flags, used_isa, openmp, cc = build(tmp, isa=isa, cc=cc, verbose=verbose)
        if not openmp and any(t > 1 for t in threads):
            print("roofline: built without OpenMP; measuring 1 thread only", file=sys.stderr)
            threads = [1]
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "passive")
        proc = subprocess.run([binary, str(mib), str(reps), *map(str, threads)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"roofline probe failed ({proc.returncode}):\n{proc.stderr}")
        raw = json.loads(proc.stdout)
    # ns_per_element is for T threads together; per core = that times T.
    for t, per in raw["threads"].items():
        for key in ("exp_f32", "exp_f64"):
            if key in per:
                per[key]["ns_per_element_per_core"] = per[key]["ns_per_element"] * int(t)
    return {
        "schema": SCHEMA,
        "loadavg_before": load_before,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "node": platform.node(),
            "llc_bytes": llc_bytes(),
        },
        "build": {
            "compiler": _compiler_version(cc),
            "flags": flags,
            "isa": used_isa,
            "openmp": openmp,
            "source_hash": source_hash(),
        },
        **raw,
    }


def _matches_machine(result: dict) -> bool:
    machine, build_info = result.get("machine", {}), result.get("build", {})
    return (
        result.get("schema") == SCHEMA
        and machine.get("cpu") == cpu_model()
        and machine.get("nproc") == os.cpu_count()
        and build_info.get("source_hash") == source_hash()
    )


def load(path: str | os.PathLike | None = None, *, run_if_missing: bool = True,
         verbose: bool = True) -> dict:
    """The probe's JSON.

    With a path: that file, as it is (a probe from another machine is fine:
    the report of a run made there). Without: the cache, if it was made on
    this CPU by this roofline.c; otherwise (and if ``run_if_missing``) a
    fresh probe, saved to the cache."""
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    if _loaded is not None and _loaded[0] == cache_path():
        return _loaded[1]
    result = _load_cache(run_if_missing, verbose)
    globals()["_loaded"] = (cache_path(), result)
    return result


_loaded = None  # (cache path, probe) of the last load() without a path


def _load_cache(run_if_missing: bool, verbose: bool) -> dict:
    cache = cache_path()
    if cache.exists():
        try:
            with open(cache, encoding="utf-8") as fh:
                result = json.load(fh)
            if _matches_machine(result):
                return result
            if verbose:
                print(f"roofline: {cache} is from another machine or probe; probing again", file=sys.stderr)
        except (OSError, ValueError):
            pass
    if not run_if_missing:
        raise FileNotFoundError(f"no roofline probe cached at {cache}; run benchmarks/roofline.py")
    if verbose:
        print("roofline: probing this machine (a few seconds) ...", file=sys.stderr)
    result = probe()
    save(result, cache)
    return result


def save(result: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """Lower bound on the time of one call, and what it is made of (seconds)."""

    seconds: float  # max(memory, exp): the bound (perfect overlap)
    serial: float  # memory + exp: no overlap at all
    memory: float  # the memory traffic alone, at the measured rate
    exp: float  # one exp per element alone, at the measured rate
    limiter: str  # "memory" or "exp": which term sets `seconds`
    kind: str
    bytes: int  # bytes of logits (N * C * dtype_bytes)
    # One measured pass that reads and exponentiates each element once
    # (``read_exp``), plus, for the kinds that write, the write of the result
    # at the write rate; None for float64 or a probe without read_exp.
    onepass: float | None = None

    def __float__(self) -> float:
        return self.seconds

    def as_dict(self) -> dict:
        return asdict(self)


def _per_threads(result: dict, threads: int) -> dict:
    per = result["threads"].get(str(int(threads)))
    if per is None:
        have = sorted(result["threads"], key=int)
        raise ValueError(f"the roofline probe has no {threads}-thread numbers (it has {', '.join(have)}); "
                         f"run benchmarks/roofline.py --threads {','.join(have + [str(threads)])}")
    return per


def bounds(n: int, c: int, dtype_bytes: int, threads: int, kind: str, *,
           probe: dict | None = None, stores: str = "regular") -> Bound:
    """Lower-bound time of one call on an (n, c) input, from the measured roofs.

    kind: "forward", "fused_out" or "write_op" (see the module docstring; or
    ``FUNCTION_KIND[function]``). dtype_bytes: 4 (float32) or 8 (float64).
    probe: a probe's JSON (default: ``load()``, the cache, probing if needed).
    stores: "regular" (ordinary stores, as fastxent writes) or "streaming"
    (non-temporal stores) for the kinds that write an N x C result."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if dtype_bytes not in (4, 8):
        raise ValueError(f"dtype_bytes must be 4 or 8, not {dtype_bytes!r}")
    if stores not in ("regular", "streaming"):
        raise ValueError(f"stores must be 'regular' or 'streaming', not {stores!r}")
    result = load() if probe is None else probe
    per = _per_threads(result, threads)
    elements = int(n) * int(c)
    nbytes = elements * int(dtype_bytes)
    if kind == "forward":
        memory = nbytes / (per["read"]["gbps"] * 1e9)
    else:
        rate = per["rw_nt" if stores == "streaming" else "rw"]["gbps"] * 1e9  # bytes of x + y per s
        memory = 2 * nbytes / rate
    ns = per["exp_f32" if dtype_bytes == 4 else "exp_f64"]["ns_per_element"]  # all threads
    exp = elements * ns * 1e-9
    onepass = None
    if dtype_bytes == 4 and "read_exp" in per:
        onepass = nbytes / (per["read_exp"]["gbps"] * 1e9)
        if kind != "forward":
            onepass += nbytes / (per["write_nt" if stores == "streaming" else "write"]["gbps"] * 1e9)
    return Bound(
        seconds=max(memory, exp),
        serial=memory + exp,
        memory=memory,
        exp=exp,
        limiter="memory" if memory >= exp else "exp",
        kind=kind,
        bytes=nbytes,
        onepass=onepass,
    )


def bound_gbps(dtype_bytes: int, threads: int, kind: str, *, probe: dict | None = None,
               serial: bool = False, stores: str = "regular") -> float:
    """The bound as GB/s of logits read (shape-independent: every term is
    proportional to N*C)."""
    b = bounds(1 << 20, 1, dtype_bytes, threads, kind, probe=probe, stores=stores)
    return b.bytes / (b.serial if serial else b.seconds) / 1e9


def machine_mismatch(result: dict, machine_info: dict) -> str | None:
    """Why a probe looks like it comes from another machine than a
    pytest-benchmark run's ``machine_info`` (None: nothing to say)."""
    probe_machine = result.get("machine") or {}
    reasons = []
    node = machine_info.get("node")
    if node and probe_machine.get("node") and node != probe_machine["node"]:
        reasons.append(f"host {node!r} vs {probe_machine['node']!r}")
    brand = (machine_info.get("cpu") or {}).get("brand_raw")
    mine = probe_machine.get("cpu")
    if brand and mine:
        def norm(s):
            return " ".join(s.replace("(R)", "").replace("(TM)", "").split()).lower()

        if norm(brand) not in norm(mine) and norm(mine) not in norm(brand):
            reasons.append(f"cpu {brand!r} vs {mine!r}")
    if not reasons:
        return None
    return "the benchmark and the roofline probe come from different machines (" + "; ".join(reasons) + ")"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def print_table(result: dict, file=sys.stdout) -> None:
    m, b = result.get("machine", {}), result.get("build", {})
    llc = m.get("llc_bytes")
    print(f"cpu: {m.get('cpu')} ({m.get('nproc')} cpus, last-level cache "
          f"{llc / 2**20:.0f} MiB)" if llc else f"cpu: {m.get('cpu')} ({m.get('nproc')} cpus)", file=file)
    print(f"probe: {result.get('mib_per_array')} MiB per array, median of {result.get('repetitions')}; "
          f"{b.get('compiler')}; isa={b.get('isa')} openmp={b.get('openmp')}; {result.get('created')}", file=file)
    print(file=file)
    cols = [("read", "read GB/s"), ("write", "write GB/s"), ("rw", "rw GB/s"),
            ("write_nt", "write nt"), ("rw_nt", "rw nt"), ("read_exp", "read+exp")]
    header = f"{'threads':>8}" + "".join(f"{name:>12}" for _, name in cols)
    header += f"{'exp f32 ns/el':>15}{'(per core)':>12}{'exp f64 ns/el':>15}{'(per core)':>12}"
    print(header, file=file)
    for t, per in sorted(result["threads"].items(), key=lambda kv: int(kv[0])):
        line = f"{t:>8}"
        for key, _ in cols:
            line += f"{per[key]['gbps']:>12.1f}" if key in per else f"{'-':>12}"
        for key in ("exp_f32", "exp_f64"):
            e = per[key]
            line += f"{e['ns_per_element']:>15.3f}{e['ns_per_element_per_core']:>12.3f}"
        print(line, file=file)
    print("\nGB/s: bytes of the arrays touched per second (rw: x and y); exp: ns per element, "
          "all threads together.", file=file)
    noisy = [f"{t}:{k}" for t, per in sorted(result["threads"].items()) for k, v in per.items()
             if v.get("spread", 0) > NOISY_SPREAD]
    shared = [f"{t}:{k}" for t, per in sorted(result["threads"].items()) for k, v in per.items()
              if v.get("cpu_share", 1) < MIN_CPU_SHARE]
    load_before = result.get("loadavg_before")
    problems = []
    if load_before is not None and load_before > 0.5:
        problems.append(f"load average {load_before} before it")
    if shared:
        problems.append(f"threads had under {MIN_CPU_SHARE:.0%} of their cores in {len(shared)} entries "
                        f"({', '.join(shared[:4])}{', ...' if len(shared) > 4 else ''})")
    if noisy:
        problems.append(f"(max - min) / median above {NOISY_SPREAD:.0%} in {len(noisy)} entries")
    if problems:
        print("warning: noisy probe: " + "; ".join(problems) + ". Close other work and probe again.",
              file=file)
    print("Bounds in GB/s of logits read (max(memory, exp); serial memory + exp in brackets):", file=file)
    print(f"{'threads':>8}{'dtype':>9}" + "".join(f"{k:>22}" for k in KINDS), file=file)
    for t in sorted(result["threads"], key=int):
        for dtype, nb in (("float32", 4), ("float64", 8)):
            cells = []
            for kind in KINDS:
                hi = bound_gbps(nb, int(t), kind, probe=result)
                lo = bound_gbps(nb, int(t), kind, probe=result, serial=True)
                cells.append(f"{hi:.1f} ({lo:.1f})")
            print(f"{t:>8}{dtype:>9}" + "".join(f"{c:>22}" for c in cells), file=file)


def print_kernels(path, result: dict, file=sys.stdout) -> None:
    """Each fastxent benchmark of a pytest-benchmark JSON beside its bound
    and the one-pass read+exp figure of its shape (float32 and float64; the
    one-pass figure is float32 only)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    print(f"\nkernels of {path} (median / bound; median / one-pass):", file=file)
    print(f"  {'function':<26}{'shape':>13}{'dtype':>9}{'thr':>4}{'isa':>9}{'median':>11}"
          f"{'bound':>11}{'one-pass':>11}{'/bound':>8}{'/1-pass':>8}", file=file)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        kind = FUNCTION_KIND.get(info.get("function"))
        if not str(info.get("contender", "")).startswith("fastxent") or kind is None:
            continue
        nb = {"float32": 4, "float64": 8}.get(info.get("dtype"))
        shape, threads = info.get("shape"), int(info.get("threads", 1))
        if nb is None or not shape or str(threads) not in result["threads"]:
            continue
        b = bounds(shape[0], shape[1], nb, threads, kind, probe=result)
        med = bench["stats"]["median"]
        one = format_seconds(b.onepass) if b.onepass is not None else "-"
        rel = f"{med / b.onepass:.2f}" if b.onepass else "-"
        name = info["function"] + ("" if info["contender"] == "fastxent" else " (out=)")
        print(f"  {name:<26}{'x'.join(map(str, shape)):>13}{info['dtype']:>9}{threads:>4}"
              f"{str(info.get('isa', '')):>9}{format_seconds(med):>11}{format_seconds(b.seconds):>11}"
              f"{one:>11}{med / b.seconds:>8.2f}{rel:>8}", file=file)


def _shape(text: str) -> tuple[int, int]:
    n, c = text.lower().split("x")
    return int(n), int(c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the probe's JSON here")
    parser.add_argument("--cached", action="store_true",
                        help="use the cached probe if it matches this machine (probe otherwise)")
    parser.add_argument("--mib", type=int, default=DEFAULT_MIB, help="MiB per array (default %(default)s)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="repetitions (default %(default)s)")
    parser.add_argument("--threads", default=",".join(map(str, DEFAULT_THREADS)),
                        help="comma-separated thread counts (default %(default)s)")
    parser.add_argument("--isa", choices=sorted(ISA_FLAGS),
                        help="flag set to compile with (default: the widest this CPU has)")
    parser.add_argument("--no-cache", action="store_true", help="do not write the cache")
    parser.add_argument("--shape", action="append", type=_shape, default=[], metavar="NxC",
                        help="also print the bounds of this shape (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--bench", metavar="JSON", action="append", default=[],
                        help="a pytest-benchmark JSON: print each fastxent kernel's median beside "
                             "its shape's bound and one-pass figure (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compile command")
    args = parser.parse_args(argv)

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.cached:
        result = load()
    else:
        result = probe(mib=args.mib, reps=args.reps, threads=threads, isa=args.isa, verbose=args.verbose)
        if not args.no_cache:
            save(result, cache_path())
    print_table(result)
    if not args.cached and not args.no_cache:
        print(f"\ncached in {cache_path()}")
    if args.json:
        save(result, args.json)
        print(f"written to {args.json}")

    for path in args.bench:
        print_kernels(path, result)
    nb = 4 if args.dtype == "float32" else 8
    for n, c in args.shape:
        print(f"\nbounds of {n}x{c} {args.dtype}:")
        print(f"  {'kind':<10}{'threads':>8}{'bound':>11}{'one-pass':>11}{'serial':>11}{'memory':>11}"
              f"{'exp':>11}  limiter")
        for kind in KINDS:
            for t in sorted(result["threads"], key=int):
                b = bounds(n, c, nb, int(t), kind, probe=result)
                one = format_seconds(b.onepass) if b.onepass is not None else "-"
                print(f"  {kind:<10}{t:>8}{format_seconds(b.seconds):>11}{one:>11}"
                      f"{format_seconds(b.serial):>11}{format_seconds(b.memory):>11}"
                      f"{format_seconds(b.exp):>11}  {b.limiter}")
        print("  one-pass: the measured read+exp pass over the logits (plus the write of the result "
              "for the kinds that write); the bound assumes memory and exp overlap perfectly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
