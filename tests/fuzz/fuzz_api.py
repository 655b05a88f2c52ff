#!/usr/bin/env python3
"""Fuzz harness for the public fastxent API.

Arbitrary bytes are decoded into arrays (shape, dtype, memory layout,
values including NaN, +-inf, huge and subnormal numbers), labels, targets and
options, and fed to every public function (kl_div and binary_cross_entropy
too, once the package has them).  The only acceptable failures are
``ValueError`` and ``TypeError`` (``numpy.exceptions.AxisError`` is both a
ValueError and an IndexError); any other exception is a finding, and a crash
or a hang of the process is one too.

Beyond "no crash", a successful call is checked for cheap invariants:

* the result has the documented shape (scalar, batch shape, or the input's
  shape) and dtype family;
* repeating the call with another ``num_threads`` gives bitwise the same
  result (only for calls without ``out=``, which may alias the input).

Two drivers share one decoder:

* with atheris installed (``pip install atheris``), coverage-guided fuzzing
  of the Python layer (``fastxent._api`` is instrumented); the command line is
  libFuzzer's, e.g. ``python tests/fuzz/fuzz_api.py -atheris_runs=100000``;
* without it (or with ``--no-atheris``), a plain loop over random byte
  strings: ``python tests/fuzz/fuzz_api.py --runs 100000 [--seed S]``.

Not named test_*.py on purpose: pytest must not collect it.
"""
from __future__ import annotations

import math
import os
import struct
import sys
import time
import warnings

import numpy as np

try:  # atheris is optional
    if "--no-atheris" in sys.argv:
        raise ImportError
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["fastxent"]):
        import fastxent
        import fastxent._api  # noqa: F401
else:
    import fastxent

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

ACCEPTED = (ValueError, TypeError)


# --------------------------------------------------------------------------
# Decoding bytes
# --------------------------------------------------------------------------

class Bytes:
    """Consumes a byte string; once it is exhausted every read yields zeros,
    so that any input decodes to *some* call."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        if len(chunk) < n:
            chunk = chunk + bytes(n - len(chunk))
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def pick(self, seq):
        return seq[self.u8() % len(seq)]

    def int_in(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return lo + self.u16() % (hi - lo + 1)

    def chance(self, p256: int) -> bool:
        """True with probability p256 / 256; False once the bytes run out
        (the rare branch is the True one: short inputs decode to common calls)."""
        return self.u8() >= 256 - p256

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, math.nan, math.inf, -math.inf, 1e30, -1e30,
           1e300, -1e300, 1e4, -1e4, 5e-324, 1e-310, 1.2e-38, 65504.0, 88.7, -103.0,
           709.0, -745.0, 3.4e38]

BASE_DTYPES = ["float16", "float32", "float64", ">f4", ">f8", "int8", "int32", "int64",
               "uint8", "uint64", "bool", "longdouble"]
ODD_DTYPES = ["complex64", "complex128", "object", "<U3", "S2", "datetime64[s]", "V8"]
if ml_dtypes is not None:
    BASE_DTYPES.append(ml_dtypes.bfloat16)

LAYOUTS = ["contiguous", "contiguous", "contiguous", "fortran", "transpose", "reversed",
           "step2", "readonly", "unaligned", "list", "broadcast"]


def values(b: Bytes, size: int, kind: str) -> np.ndarray:
    """``size`` float64 values whose flavour is chosen by the bytes."""
    mode = b.u8() % 6
    if mode == 0:  # small normal-ish numbers from a seed
        rng = np.random.default_rng(b.u16())
        return rng.standard_normal(size) * b.pick([1.0, 3.0, 30.0, 1e4])
    if mode == 1:  # a large shared offset
        rng = np.random.default_rng(b.u16())
        return rng.standard_normal(size) + b.pick([1e4, -1e4, 1e30, 1e300])
    if mode == 2:  # specials mixed in
        rng = np.random.default_rng(b.u16())
        v = rng.standard_normal(size)
        for _ in range(b.u8() % 4):
            if size:
                v[b.u16() % size] = b.pick(SPECIAL)
        return v
    if mode == 3:  # raw doubles from the bytes
        return np.array([b.f64() for _ in range(min(size, 16))] * (size // 16 + 1))[:size]
    if mode == 4:  # probabilities
        rng = np.random.default_rng(b.u16())
        v = rng.random(size)
        return v / max(v.sum(), 1e-300) if b.chance(128) else v
    return np.full(size, b.pick(SPECIAL))  # constant rows


def cast(v: np.ndarray, dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dt.kind in "iu":
            v = np.nan_to_num(v, nan=0.0, posinf=1e6, neginf=-1e6)
            info = np.iinfo(dt)
            v = np.clip(v, info.min, info.max)
        if dt.kind == "O":
            return v.astype(object)
        if dt.kind in "US":
            return v.astype(dt)
        if dt.kind == "M":
            return np.nan_to_num(v).astype(np.int64).astype(dt)
        if dt.kind == "V":
            return np.zeros(v.shape, dt)
        return v.astype(dt)


def layout(b: Bytes, a: np.ndarray, allow_list=True):
    """``a`` (already of its final dtype) laid out in memory as the bytes say.
    Returns an array-like whose *logical* contents are those of ``a`` up to a
    permutation of axes (for "transpose"): the caller does not care."""
    kind = b.pick(LAYOUTS)
    if a.ndim == 0 or a.dtype.kind in "OUSV":
        return a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "transpose":
        return np.ascontiguousarray(a.T).T
    if kind == "reversed":
        rev = tuple(slice(None, None, -1) for _ in range(a.ndim))
        return np.ascontiguousarray(a[rev])[rev]
    if kind == "step2":
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
        idx = tuple(slice(1, None, 2) for _ in range(a.ndim))
        big[idx] = a
        return big[idx]
    if kind == "readonly":
        a = a.copy()
        a.setflags(write=False)
        return a
    if kind == "unaligned" and a.dtype.itemsize > 1 and a.size:
        raw = np.zeros(a.nbytes + 1, np.uint8)
        u = raw[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        return u
    if kind == "list" and allow_list and a.size <= 64 and a.dtype.kind in "fiub" and a.dtype.isnative:
        return a.tolist()
    if kind == "broadcast" and a.ndim >= 1 and a.shape[0] > 1:
        # zero strides along the first axis
        return np.broadcast_to(a[:1], a.shape)
    return a


def shape(b: Bytes):
    ndim = b.pick([1, 2, 2, 2, 3, 3, 0, 4])
    dims = []
    for _ in range(ndim):
        r = b.u8()
        if r < 200:
            dims.append(1 + (r + 2) % 9)
        elif r < 243:
            dims.append(1 + b.u16() % 70)
        elif r < 248:
            dims.append(1 + b.u16() % 1100)
        else:
            dims.append(0)
    # bound the size, zero-size dimensions aside (labels have the other ones)
    while math.prod(max(d, 1) for d in dims) > 20000:
        i = dims.index(max(dims))
        dims[i] = max(dims[i] // 2, 1)
    return tuple(dims)


def logits_array(b: Bytes, shp, kind="logits"):
    dt = b.pick(ODD_DTYPES) if b.chance(6) else b.pick(BASE_DTYPES)
    a = cast(values(b, math.prod(shp), kind).reshape(shp), dt)
    return layout(b, a)


def batch_of(shp, axis):
    if not shp:
        return None
    try:
        ax = axis % len(shp)
    except ZeroDivisionError:
        return None
    return tuple(s for i, s in enumerate(shp) if i != ax)


def int_labels(b: Bytes, bshape, c, ignore_index):
    n = math.prod(bshape)
    rng = np.random.default_rng(b.u16())
    lab = rng.integers(0, max(c, 1), size=n)
    # sprinkle bad or special values
    ii = ignore_index if isinstance(ignore_index, int) and -2**63 <= ignore_index < 2**63 else -100
    specials = [ii, -1, c, c + 1, -100, 2**63 - 1, -2**63, 2**31, -2**31 - 1]
    for _ in range(b.u8() % 3 if b.chance(100) else 0):
        if n:
            lab[b.u16() % n] = b.pick(specials)
    dt = b.pick(["int64", "int64", "int32", "int8", "uint8", "uint64", "int16", "uint32"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.dtype(dt) == np.uint64 and b.chance(60) and n:
            lab = lab.astype(np.uint64)
            lab[b.u16() % n] = np.uint64(b.pick([2**64 - 1, 2**63, 2**64 - 100, c]))
        else:
            lab = lab.astype(dt)  # wraps for narrow dtypes: fine, more bad values
    return layout(b, lab.reshape(bshape))


def labels_for(b: Bytes, shp, axis, ignore_index):
    bshape = batch_of(shp, axis)
    kind = b.u8() % 10
    c = shp[axis % len(shp)] if shp and -len(shp) <= axis < len(shp) else 3
    if bshape is None or kind == 9:  # garbage
        return b.pick([None, 0, 1.5, "a", [[1, 2], [3]], np.zeros((2, 2, 2, 2)),
                       np.full(bshape or (1,), 0.5), np.zeros(bshape or (1,), complex),
                       np.zeros(bshape or (1,), bool), np.zeros(bshape or (1,), object)])
    if kind < 6:
        return int_labels(b, bshape, c, ignore_index)
    if kind == 6 and bshape:  # wrong batch shape
        wrong = list(bshape)
        wrong[b.u8() % len(wrong)] += b.pick([1, -1, 2])
        wrong = [max(0, s) for s in wrong]
        return np.zeros(tuple(wrong), np.int64)
    return logits_array(b, shp, "target")  # soft labels / targets


def scalar_option(b: Bytes, good, bad):
    return b.pick(bad) if b.chance(8) else b.pick(good)


NAN = math.nan
OPT_REDUCTION = (["mean", "sum", "none"], ["batchmean", "avg", None, 1, "MEAN", ""])
OPT_KL_REDUCTION = (["batchmean", "mean", "sum", "none"], ["avg", None, 1, ""])
OPT_BASE = ([None, None, None, 2, 10, 0.5, math.e, np.float32(2)], [1, 0, -2, NAN, math.inf, "2", 1j, [2]])
OPT_SMOOTH = ([0.0, 0.0, 0.1, 1.0, 0.5], [-0.1, 1.5, NAN, math.inf, "0.1", None, [0.1]])
OPT_THREADS = ([None, None, 1, 2, 3], [0, -1, 1025, 2**40, 1.5, "2", 2**64])
OPT_IGNORE = ([-100, -100, 0, -1, 1, 2**63 - 1], [2**63, -2**63 - 1, 1.5, None, "a"])
OPT_AXIS = ([-1, -1, -1, 0, 1, -2, 2], [3, -4, 5, 1.0, None, "x", 2**70])
OPT_TEMP = ([1.0, 1.0, 2.0, 0.5, 1e-3, 100.0], [0.0, -1.0, NAN, math.inf, "2", None])
OPT_KIND = (["probs", "log_probs", "logits"], ["prob", None, 1, ""])


def weight_for(b: Bytes, c, dtype_hint="float64"):
    r = b.u8() % 12
    if r < 7:
        return None
    if r < 10:
        w = np.abs(values(b, c, "weight"))
        return cast(w, b.pick(["float64", "float32", "float16", "int64"]))
    return b.pick([np.ones(c + 1), np.ones(max(c - 1, 0)), np.full(c, NAN), -np.ones(c),
                   np.full(c, math.inf), np.ones((1, c)), np.ones(c, complex), "w",
                   np.array([1e300] * c)])


def grad_output_for(b: Bytes, bshape, reduction):
    r = b.u8() % 10
    if r < 5:
        return 1.0
    if r < 7:
        return b.pick([0.0, -1.0, 2.5, NAN, math.inf, np.float32(3), 7])
    if r < 9 and reduction == "none" and bshape is not None:
        return values(b, math.prod(bshape), "g").reshape(bshape)
    return b.pick([np.ones(3), "a", None, 1j, np.ones((2, 2)), np.ones(1)])


def out_for(b: Bytes, x, fn_name):
    """An out= argument: None, a good array, the logits, or something bad."""
    r = b.u8() % 10
    if r < 4 or not isinstance(x, np.ndarray):
        return None
    try:
        xd = x.dtype
        good_dt = xd if (xd.kind == "f" or xd.name == "bfloat16") else np.dtype(np.float64)
        if xd.kind == "f" and xd.itemsize > 8:
            good_dt = np.dtype(np.float64)
        if not good_dt.isnative:
            good_dt = good_dt.newbyteorder("=")
    except Exception:
        good_dt = np.dtype(np.float64)
    if r < 7:
        return layout(b, np.full(x.shape, 12345, good_dt), allow_list=False)
    if r == 7:
        return x  # in place (may be read-only, of another dtype, ...)
    if r == 8 and x.size > 1:
        flat = x.reshape(-1) if x.flags.c_contiguous else None
        if flat is not None and b.chance(128):
            return flat[::-1].reshape(x.shape)  # overlapping, not the same
        return x.T if x.ndim >= 2 else x[::-1]
    return b.pick([np.empty((1,)), np.empty(x.shape, np.float16), np.empty(x.shape, np.int64),
                   [0.0], np.float64(0), np.empty(x.shape + (1,))])


# --------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------

FUNCS = ["cross_entropy", "cross_entropy_with_grad", "logsumexp", "log_softmax", "softmax",
         "entropy", "threads", "kl_div", "kl_div_with_grad", "binary_cross_entropy",
         "binary_cross_entropy_with_grad"]

STATS = {"calls": 0, "ok": 0, "rejected": 0}


def decode_call(data: bytes):
    """(function name, args, kwargs) decoded from ``data``; None to skip."""
    b = Bytes(data)
    name = b.pick(FUNCS)
    if name == "threads":
        return name, (scalar_option(b, [1, 2, None], OPT_THREADS[1]),), {}
    if not hasattr(fastxent, name):
        name = b.pick(FUNCS[:6])
    shp = shape(b)
    x = logits_array(b, shp)
    axis = scalar_option(b, *OPT_AXIS)
    kw = {}
    kw["num_threads"] = scalar_option(b, *OPT_THREADS)
    args = (x,)
    is_ax = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
    ax_ok = is_ax and len(shp) > 0 and -len(shp) <= axis < len(shp)
    c = shp[axis % len(shp)] if ax_ok else 3
    bshape = batch_of(shp, axis) if ax_ok else None
    if name.startswith("cross_entropy"):
        ii = scalar_option(b, *OPT_IGNORE)
        kw.update(axis=axis, ignore_index=ii,
                  reduction=scalar_option(b, *OPT_REDUCTION),
                  label_smoothing=scalar_option(b, *OPT_SMOOTH),
                  from_logits=not b.chance(56),
                  base=scalar_option(b, *OPT_BASE),
                  weight=weight_for(b, c))
        args = (x, labels_for(b, shp, axis if ax_ok else -1, ii))
    elif name.startswith("kl_div"):
        kw.update(axis=axis, target_kind=scalar_option(b, *OPT_KIND),
                  reduction=scalar_option(b, *OPT_KL_REDUCTION),
                  temperature=scalar_option(b, *OPT_TEMP), base=scalar_option(b, *OPT_BASE))
        tgt = logits_array(b, shp, "target") if not b.chance(26) else labels_for(b, shp, -1, -100)
        args = (x, tgt)
    elif name.startswith("binary_cross_entropy"):
        kw.update(reduction=scalar_option(b, *OPT_REDUCTION), from_logits=not b.chance(96),
                  base=scalar_option(b, *OPT_BASE))
        tgt = logits_array(b, shp, "target") if not b.chance(26) else labels_for(b, shp, -1, -100)
        if b.chance(40):
            kw["weight"] = b.pick([np.ones(shp), np.ones(shp[-1:] or (1,)), 2.0, np.ones(shp + (2,)), NAN])
        if b.chance(40):
            kw["pos_weight"] = b.pick([np.ones(shp[-1:] or (1,)) * 2, 3.0, np.ones((7, 7)), -1.0])
        args = (x, tgt)
    elif name == "entropy":
        kw.update(axis=axis, from_logits=not b.chance(56), base=scalar_option(b, *OPT_BASE))
    else:
        kw.update(axis=axis)
    if name.endswith("_with_grad"):
        kw["grad_output"] = grad_output_for(b, bshape, kw.get("reduction"))
    if name.endswith("_with_grad") or name in ("log_softmax", "softmax"):
        kw["out"] = out_for(b, x, name)
    if name == "binary_cross_entropy_with_grad" or name == "binary_cross_entropy":
        kw.pop("axis", None)
    return name, args, kw


def check_result(name, args, kw, res):
    """Cheap invariants of a successful call."""
    x = np.asarray(args[0])
    if name in ("log_softmax", "softmax"):
        assert isinstance(res, np.ndarray) and res.shape == x.shape, (name, np.shape(res), x.shape)
        if kw.get("out") is not None:
            assert res is kw["out"], "out= was not returned"
    elif name.endswith("_with_grad"):
        loss, grad = res
        assert isinstance(grad, np.ndarray) and grad.shape == x.shape, (name, grad.shape, x.shape)
        if kw.get("out") is not None:
            assert grad is kw["out"], "out= was not returned"
        if kw.get("reduction", "mean") not in ("none",):
            assert np.ndim(loss) == 0, (name, np.shape(loss))
    elif name in ("cross_entropy", "kl_div", "binary_cross_entropy"):
        if kw.get("reduction") != "none":
            assert np.ndim(res) == 0, (name, np.shape(res))


def same_bits(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def one_input(data: bytes):
    decoded = decode_call(data)
    name, args, kw = decoded
    STATS["calls"] += 1
    if name == "threads":
        before = fastxent.get_num_threads()
        try:
            fastxent.set_num_threads(args[0])
        except ACCEPTED:
            STATS["rejected"] += 1
        finally:
            fastxent.set_num_threads(None)
            if fastxent.get_num_threads() != before:
                fastxent.set_num_threads(before)
        fastxent.show_config(print_=False)
        return
    fn = getattr(fastxent, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fn(*args, **kw)
        except ACCEPTED:
            STATS["rejected"] += 1
            return
    STATS["ok"] += 1
    check_result(name, args, kw, res)
    # Determinism across thread counts (only without out=, which may alias
    # an input and change it).
    if kw.get("out") is None and len(data) % 4 == 0:
        kw2 = dict(kw)
        kw2["num_threads"] = 2 if kw.get("num_threads") in (None, 1) else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res2 = fn(*args, **kw2)
        pairs = zip(res, res2) if isinstance(res, tuple) else [(res, res2)]
        for r1, r2 in pairs:
            assert same_bits(r1, r2), f"{name}: result depends on num_threads"


def describe(data: bytes) -> str:
    name, args, kw = decode_call(data)

    def d(v):
        if isinstance(v, np.ndarray):
            return f"ndarray(shape={v.shape}, dtype={v.dtype}, strides={v.strides}, writeable={v.flags.writeable}, aligned={v.flags.aligned})"
        if isinstance(v, list):
            return f"list(len={len(v)})"
        return repr(v)
    return f"{name}({', '.join(d(a) for a in args)}, " + ", ".join(f"{k}={d(v)}" for k, v in kw.items()) + ")"


# --------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------

KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING", "") not in ("", "0")
SEEN = {}


def guarded(data: bytes, tag: str):
    """one_input(data); a failure is raised, or with FUZZ_KEEP_GOING=1 (or
    --keep-going) logged once per distinct signature, its input saved, and
    the run goes on."""
    try:
        one_input(data)
    except Exception as e:
        if not KEEP_GOING:
            print(f"\nfuzz_api: FAILURE: {describe(data)}", file=sys.stderr)
            raise
        import traceback
        tb = traceback.extract_tb(e.__traceback__)[-1]
        sig = (type(e).__name__, tb.filename, tb.lineno)
        STATS["failures"] = STATS.get("failures", 0) + 1
        if sig not in SEEN:
            path = f"failure-{len(SEEN)}-{tag}"
            with open(path, "wb") as f:
                f.write(data)
            SEEN[sig] = path
            print(f"\nfuzz_api: NEW FAILURE {sig} {type(e).__name__}: {e}\n  input saved to "
                  f"{path}: {describe(data)}", file=sys.stderr, flush=True)

def _report(start):
    dt = time.time() - start
    print(f"fuzz_api: {STATS['calls']} calls ({STATS['ok']} accepted, {STATS['rejected']} "
          f"rejected with ValueError/TypeError, {STATS.get('failures', 0)} failures) in {dt:.0f} s",
          file=sys.stderr, flush=True)


def fallback_main(argv):
    import argparse

    p = argparse.ArgumentParser(description="fastxent fuzz loop without atheris (random bytes)")
    p.add_argument("--runs", type=int, default=10000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--report-every", type=int, default=100000)
    p.add_argument("--no-atheris", action="store_true")
    p.add_argument("--keep-going", action="store_true",
                   help="log each distinct failure once and go on (also FUZZ_KEEP_GOING=1)")
    p.add_argument("--reproduce", metavar="FILE", help="run one input from a file (e.g. a crash-* file)")
    ns = p.parse_args(argv)
    global KEEP_GOING
    KEEP_GOING = KEEP_GOING or ns.keep_going
    if ns.reproduce:
        data = open(ns.reproduce, "rb").read()
        print(describe(data))
        one_input(data)
        print("no failure")
        return 0
    seed = ns.seed if ns.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    print(f"fuzz_api: fallback loop, seed {seed}, {ns.runs} runs", file=sys.stderr)
    start = time.time()
    for i in range(ns.runs):
        n = int(rng.integers(0, ns.max_len))
        data = rng.bytes(n)
        try:
            guarded(data, f"{seed}-{i}")
        except BaseException:
            path = f"crash-fallback-{seed}-{i}"
            with open(path, "wb") as f:
                f.write(data)
            print(f"fuzz_api: input {i} saved to {path}", file=sys.stderr)
            raise
        if ns.report_every and (i + 1) % ns.report_every == 0:
            _report(start)
    _report(start)
    return 0


def atheris_main(argv):
    start = time.time()
    every = int(os.environ.get("FUZZ_REPORT_EVERY", "100000"))

    def target(data):
        guarded(data, str(STATS["calls"]))
        if every and STATS["calls"] % every == 0:
            _report(start)

    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    argv = sys.argv
    if atheris is None or any(a.startswith("--") for a in argv[1:]):
        sys.exit(fallback_main([a for a in argv[1:]]))
    atheris_main(argv)
