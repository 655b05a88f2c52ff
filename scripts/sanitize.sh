#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the test suite.
#
#   scripts/sanitize.sh                      quick subset + a short fuzz run per ISA
#   scripts/sanitize.sh --full               the whole test suite (slow tests excluded) + fuzz
#   scripts/sanitize.sh tests/test_x.py -k y pytest arguments of your own (no fuzz unless --fuzz N)
#   scripts/sanitize.sh --fuzz 100000 ...    fuzz iterations per ISA (0: none)
#   scripts/sanitize.sh --rebuild ...        force a clean rebuild
#
# The package is built with FASTXENT_SANITIZE=1 (setup.py: -fsanitize=address,
# undefined, -fno-sanitize-recover=undefined, -O1 -g1) in a COPY of the
# repository under /tmp (FASTXENT_SANITIZE_DIR, default
# /tmp/fastxent-sanitize), with `setup.py build_ext --inplace`; the normal
# editable install in the repository's src/ is not touched.  Tests run from
# the copy with PYTHONPATH=<copy>/src and the ASan runtime preloaded
# (LD_PRELOAD=$(gcc -print-file-name=libasan.so)): Python itself is not
# instrumented, so leak detection is off (Python's own allocations would
# drown it).  Every sanitizer report is written to a log file too, so that
# reports from subprocesses (forked children, OMP_NUM_THREADS tests) count;
# the run fails on any report, or on a failing test.
#
# Needs: gcc with libasan/libubsan, the build requirements (numpy, Cython,
# setuptools) and the test requirements (pytest, hypothesis, threadpoolctl)
# in the current Python.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${FASTXENT_SANITIZE_DIR:-/tmp/fastxent-sanitize}"
PY="${PYTHON:-python3}"
FULL=0
REBUILD=0
FUZZ=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --full) FULL=1 ;;
        --rebuild) REBUILD=1 ;;
        --fuzz) FUZZ="$2"; shift ;;
        --fuzz=*) FUZZ="${1#--fuzz=}" ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done

# (UBSan halts at its first report: the broadest tests come first)
QUICK=(tests/test_softmax.py tests/test_shard.py tests/test_hypothesis.py
       tests/test_concurrency.py tests/test_bad_input.py tests/test_jax_ffi.py)
if [ "$FULL" = 1 ]; then
    PYTEST_ARGS=(tests -m "not slow")
    FUZZ="${FUZZ:-20000}"
elif [ ${#ARGS[@]} -eq 0 ]; then
    PYTEST_ARGS=("${QUICK[@]}" -m "not slow")
    FUZZ="${FUZZ:-20000}"
else
    PYTEST_ARGS=("${ARGS[@]}")
    FUZZ="${FUZZ:-0}"
fi

LIBASAN="$(gcc -print-file-name=libasan.so)"
if [ ! -e "$LIBASAN" ] || [ "$LIBASAN" = "libasan.so" ]; then
    echo "sanitize: libasan.so not found (gcc -print-file-name=libasan.so)" >&2
    exit 2
fi

# ---------------------------------------------------------------- the copy
echo "sanitize: copying $REPO to $WORK"
mkdir -p "$WORK"
if [ "$REBUILD" = 1 ]; then
    rm -rf "$WORK/build" "$WORK/src/fastxent/"_core*.so "$WORK/src/fastxent/_core.c"
fi
# Tracked and untracked-but-not-ignored files: what a checkout would build.
# Files deleted from the repository are removed from the copy too.
(cd "$REPO" && git ls-files -co --exclude-standard -z) > "$WORK/.files"
(cd "$REPO" && tar --null -T "$WORK/.files" --ignore-failed-read -cf - 2>/dev/null) | (cd "$WORK" && tar -xf -)
(cd "$WORK" && git -C "$REPO" ls-files -co --exclude-standard | sort > .files.now
 find src tests csrc scripts -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.pyx' -o -name '*.pyi' \) \
     ! -name '_core.c' 2>/dev/null | sort | comm -23 - .files.now | xargs -r rm -f)

# ---------------------------------------------------------------- the build
echo "sanitize: building with FASTXENT_SANITIZE=1 (log: $WORK/build.log)"
if ! (cd "$WORK" && FASTXENT_SANITIZE=1 "$PY" setup.py build_ext --inplace > build.log 2>&1); then
    tail -40 "$WORK/build.log"
    echo "sanitize: BUILD FAILED" >&2
    exit 2
fi
SO="$(ls "$WORK"/src/fastxent/_core*.so 2>/dev/null | head -1)"
# Captured first, then searched: under pipefail, `ldd | grep -q` fails at
# random when grep exits before ldd has finished writing (SIGPIPE).
DEPS="$( [ -n "$SO" ] && ldd "$SO" 2>&1 )"
case "$DEPS" in
    *libasan*) ;;
    *)
        tail -20 "$WORK/build.log"
        echo "$DEPS"
        echo "sanitize: '$SO' is not linked against libasan: not a sanitized build" >&2
        exit 2 ;;
esac

# ---------------------------------------------------------------- the run
# libstdc++ right after the runtime: ASan's __cxa_throw interceptor must find
# the real one when a C++ extension (jaxlib) throws, or the process aborts.
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$LIBASAN${LIBSTDCXX:+:$LIBSTDCXX}${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython "leaks" by design.  allocator_may_return_null=1:
# a huge numpy allocation must give MemoryError, not an ASan report.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1${ASAN_EXTRA:+:$ASAN_EXTRA}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_EXTRA:+:$UBSAN_EXTRA}"
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1
export FASTXENT_HYPOTHESIS_PROFILE="${FASTXENT_HYPOTHESIS_PROFILE:-ci}"
cd "$WORK"

where="$("$PY" -c 'import fastxent, os; print(os.path.dirname(fastxent.__file__))' 2>&1)"
if [ "$where" != "$WORK/src/fastxent" ]; then
    echo "sanitize: 'import fastxent' does not load the sanitized copy: $where" >&2
    exit 2
fi
"$PY" -c 'import fastxent; fastxent.show_config()'

LOG="$WORK/sanitize.log"
: > "$LOG"
status=0
echo "sanitize: pytest ${PYTEST_ARGS[*]}" | tee -a "$LOG"
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "${PYTEST_ARGS[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "sanitize: pytest exited with $rc" | tee -a "$LOG" >&2
    status=1
fi

if [ "${FUZZ:-0}" -gt 0 ] 2>/dev/null; then
    for isa in $("$PY" -c 'from fastxent import _core; print(" ".join(_core.available_isas()))'); do
        echo "sanitize: fuzz loop, $FUZZ runs, FASTXENT_ISA=$isa" | tee -a "$LOG"
        FASTXENT_ISA=$isa "$PY" tests/fuzz/fuzz_api.py --no-atheris --runs "$FUZZ" --seed 12345 \
            --report-every 0 2>&1 | tee -a "$LOG"
        if [ "${PIPESTATUS[0]}" -ne 0 ]; then
            echo "sanitize: fuzz loop failed under FASTXENT_ISA=$isa" | tee -a "$LOG" >&2
            status=1
        fi
    done
fi

# Any sanitizer report fails the run, wherever it came from.
if grep -Eq 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$LOG"; then
    echo "sanitize: SANITIZER REPORTS (see $LOG):" >&2
    grep -E -A3 'ERROR: AddressSanitizer|runtime error:' "$LOG" | head -40 >&2
    status=1
fi

if [ $status -eq 0 ]; then
    echo "sanitize: OK (no ASan/UBSan report, tests passed)"
else
    echo "sanitize: FAILED" >&2
fi
exit $status
