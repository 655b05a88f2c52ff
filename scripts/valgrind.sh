#!/usr/bin/env bash
# Valgrind memcheck over a representative small workload of fastxent.
#
#   scripts/valgrind.sh                 the built-in driver (every function, option,
#                                       dtype, layout, class count and ISA valgrind
#                                       can run) + a small pytest subset
#   scripts/valgrind.sh --driver-only   the driver only
#   scripts/valgrind.sh tests/x.py -k y the driver + these pytest arguments
#
# Runs the package as installed for this Python (the normal build, no
# rebuild).  PYTHONMALLOC=malloc so that memcheck sees Python's allocations;
# --errors-for-leak-kinds=none (CPython leaks by design).  Memcheck writes
# XML; an error counts when its stack holds a frame of fastxent's own code
# (the fastxent extension module or an fx_* function), all other errors
# (CPython, numpy, libc, libgomp noise) are listed but do not fail the run.
# Known noise can also be suppressed with a file given in
# VALGRIND_SUPPRESSIONS (one or more --suppressions files, colon-separated).
#
# Note: valgrind has no AVX-512; under it the CPU looks like one without, so
# fastxent dispatches to its AVX2 and baseline kernels (the driver runs both).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${VALGRIND_OUT:-/tmp/fastxent-valgrind}"
DRIVER_ONLY=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --driver-only) DRIVER_ONLY=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done
# Default pytest subset: one invocation per line.
if [ ${#ARGS[@]} -eq 0 ]; then
    SUBSETS=('tests/test_bad_input.py -k unusual_layouts|empty_batch|overlapping|out_equal_to_logits|1024'
             'tests/test_concurrency.py -k bitwise_identical|sharing|forked')
else
    SUBSETS=()
fi

command -v valgrind >/dev/null || { echo "valgrind: not installed" >&2; exit 2; }
mkdir -p "$OUT"
rm -f "$OUT"/*.xml

SUPP=()
if [ -n "${VALGRIND_SUPPRESSIONS:-}" ]; then
    IFS=: read -r -a files <<< "$VALGRIND_SUPPRESSIONS"
    for f in "${files[@]}"; do SUPP+=("--suppressions=$f"); done
fi

VG=(valgrind --tool=memcheck --error-limit=no --track-origins=yes
    --partial-loads-ok=no --leak-check=no --show-leak-kinds=none --errors-for-leak-kinds=none
    --child-silent-after-fork=no --trace-children=no --num-callers=40
    --xml=yes "${SUPP[@]}")

cat > "$OUT/driver.py" <<'EOF'
"""Every public function over options, dtypes, layouts, class counts and ISAs."""
import itertools

import numpy as np

import fastxent
from fastxent import _core

rng = np.random.default_rng(0)
calls = 0


def layouts(x):
    yield x
    yield np.asfortranarray(x)
    yield x[::-1, ::-1].copy()[::-1, ::-1]
    big = np.full((2 * x.shape[0] + 1, 3 * x.shape[1] + 2), np.nan, dtype=x.dtype)
    v = big[1::2, 2::3]
    v[...] = x
    yield v
    raw = np.zeros(x.nbytes + 1, np.uint8)
    u = raw[1:].view(x.dtype).reshape(x.shape)
    u[...] = x
    yield u


def run(fn, *a, **k):
    global calls
    calls += 1
    try:
        return fn(*a, **k)
    except (ValueError, TypeError):
        return None


has_kl = hasattr(fastxent, "kl_div")
has_bce = hasattr(fastxent, "binary_cross_entropy")
print("ISAs:", _core.available_isas(), flush=True)
for isa in _core.available_isas():
    _core.set_isa(isa)
    for dtype, n, c in itertools.product([np.float32, np.float64, np.float16], [1, 3, 5],
                                         [1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 100, 257]):
        base = (3 * rng.standard_normal((n, c))).astype(dtype)
        base[0, c // 2] = -np.inf if c > 1 else base[0, 0]
        lab = rng.integers(0, c, n)
        lab[0] = -100
        soft = rng.random((n, c)).astype(dtype)
        w = rng.random(c)
        probs = (rng.random((n, c)) + 0.01).astype(dtype)
        t01 = rng.random((n, c))
        for x in layouts(base):
            for nt in (1, 2):
                run(fastxent.logsumexp, x, num_threads=nt)
                run(fastxent.entropy, x, num_threads=nt, base=2)
                run(fastxent.entropy, probs, from_logits=False, num_threads=nt)
                run(fastxent.softmax, x, num_threads=nt)
                run(fastxent.log_softmax, x, num_threads=nt, out=np.empty(x.shape, x.dtype))
                run(fastxent.cross_entropy, x, lab, num_threads=nt, weight=w, label_smoothing=0.1)
                run(fastxent.cross_entropy, x, soft, num_threads=nt, reduction="none")
                run(fastxent.cross_entropy, probs, lab, from_logits=False, num_threads=nt, label_smoothing=0.2)
                run(fastxent.cross_entropy_with_grad, x, lab, num_threads=nt, label_smoothing=0.3, weight=w)
                run(fastxent.cross_entropy_with_grad, x, soft, num_threads=nt, reduction="none",
                    grad_output=rng.standard_normal(n))
                run(fastxent.cross_entropy_with_grad, probs, soft, from_logits=False, num_threads=nt)
                xi = np.array(x, copy=True)
                run(fastxent.cross_entropy_with_grad, xi, lab, num_threads=nt, out=xi)
                run(fastxent.softmax, xi, num_threads=nt, out=xi)
                if has_kl:
                    for kind, t in (("probs", soft), ("log_probs", np.log(soft + 1e-3)), ("logits", x)):
                        run(fastxent.kl_div, x, t, target_kind=kind, num_threads=nt, temperature=2.0)
                        run(fastxent.kl_div_with_grad, x, t, target_kind=kind, num_threads=nt, reduction="none")
                if has_bce:
                    run(fastxent.binary_cross_entropy, x, t01, pos_weight=w, num_threads=nt)
                    run(fastxent.binary_cross_entropy_with_grad, x, t01, weight=w, reduction="none",
                        num_threads=nt)
                    run(fastxent.binary_cross_entropy_with_grad, probs.clip(0, 1), t01, from_logits=False,
                        num_threads=nt)
        # error paths
        bad = lab.copy()
        bad[-1] = c
        run(fastxent.cross_entropy, base, bad)
        run(fastxent.cross_entropy_with_grad, base, lab, out=np.empty((n, c + 1), dtype))
        run(fastxent.softmax, base, axis=3)
    # empty batches, one class, long rows
    for shape in [(0, 5), (5, 1), (1, 5000), (2, 70000)]:
        x = rng.standard_normal(shape).astype(np.float32)
        run(fastxent.cross_entropy_with_grad, x, rng.integers(0, shape[1], shape[0]), num_threads=2)
        run(fastxent.log_softmax, x, num_threads=2)
        run(fastxent.logsumexp, x[::-1], num_threads=2)
print(f"driver: {calls} calls", flush=True)
EOF

cat > "$OUT/judge.py" <<'EOF'
"""Count memcheck errors whose stack reaches fastxent's own code."""
import collections
import re
import sys
import xml.etree.ElementTree as ET

ours_total = 0
other = collections.Counter()


def frames_of(err):
    return [(f.findtext("fn") or "?", f.findtext("obj") or "?", f.findtext("file") or "",
             f.findtext("line") or "") for f in err.iter("frame")]


def judge(err):
    global ours_total
    kind = err.findtext("kind") or ""
    if kind.startswith("Leak_"):
        return  # --errors-for-leak-kinds=none: leaks are not errors here
    what = err.findtext("what") or err.findtext("xwhat/text") or ""
    frames = frames_of(err)  # the error's stack and, with --track-origins, the origin's
    if any("fastxent" in obj or fn.startswith("fx_") for fn, obj, _, _ in frames):
        ours_total += 1
        print(f"[FASTXENT] {kind}: {what}")
        for fn, obj, file, line in frames[:16]:
            print(f"      {fn}  ({file + ':' + line if file else obj})")
    else:
        other[(kind, " < ".join(fn for fn, _, _, _ in frames[:3]))] += 1


for path in sys.argv[1:]:
    try:
        for _, el in ET.iterparse(path):
            if el.tag == "error":
                judge(el)
                el.clear()
    except ET.ParseError as e:
        text = open(path, errors="replace").read()
        if "<error>" not in text:
            # a forked child that exec'd another program (pytest plugins and
            # ctypes run a few): valgrind stops following it after the preamble
            continue
        print(f"{path}: unreadable XML ({e}): valgrind did not finish cleanly; counted as a failure")
        ours_total += 1
for (kind, where), n in other.most_common(12):
    print(f"[other x{n}] {kind}: {where}")
print(f"valgrind: {ours_total} error(s) in fastxent's code, {sum(other.values())} elsewhere "
      f"(CPython/numpy/libc noise, not counted)")
sys.exit(1 if ours_total else 0)
EOF

cd "$REPO"
# The real interpreter, not a wrapper script (pyenv shims are bash scripts,
# and valgrind would check bash).
PY="$("$PY" -c 'import sys; print(sys.executable)')"
export PYTHONMALLOC=malloc
export FASTXENT_HYPOTHESIS_PROFILE="${FASTXENT_HYPOTHESIS_PROFILE:-ci}"
export FASTXENT_STRESS_CALLS="${FASTXENT_STRESS_CALLS:-30}"
"$PY" -c 'import fastxent, os; print("fastxent from", os.path.dirname(fastxent.__file__))'

status=0
echo "valgrind: driver"
"${VG[@]}" --xml-file="$OUT/driver.%p.xml" "$PY" "$OUT/driver.py" || status=1
if [ "$DRIVER_ONLY" = 0 ]; then
    run_pytest() {
        echo "valgrind: pytest $*"
        "${VG[@]}" --xml-file="$OUT/pytest.%p.xml" "$PY" -m pytest -q -p no:cacheprovider "$@" || status=1
    }
    if [ ${#SUBSETS[@]} -gt 0 ]; then
        for line in "${SUBSETS[@]}"; do
            file="${line%% -k *}"
            expr="${line#* -k }"
            run_pytest "$file" -k "${expr//|/ or }"
        done
    else
        run_pytest "${ARGS[@]}"
    fi
fi
"$PY" "$OUT/judge.py" "$OUT"/*.xml || status=1
if [ $status -eq 0 ]; then echo "valgrind: OK"; else echo "valgrind: FAILED" >&2; fi
exit $status
