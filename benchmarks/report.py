#!/usr/bin/env python
"""fastxent against the roofline: the table for the README.

    python benchmarks/roofline.py --json probe.json          # seconds
    python -m pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json --roofline probe.json
    python benchmarks/report.py out.json -k "2thread"       # groups containing this text
    python benchmarks/report.py out.json --md               # the README's Performance block
    FASTXENT_ISA=avx2 python -m pytest benchmarks/ ... --benchmark-json=avx2.json
    python benchmarks/report.py out.json avx2.json          # one row per group and ISA

For every group (function, shape, dtype, threads) of a pytest-benchmark JSON
of this suite, one row:

- ``ISA``: the instruction set of the kernels that ran (the benchmark's
  ``extra_info``); give several JSON files, e.g. one run per
  ``FASTXENT_ISA``, to see the gap to the bound per ISA side by side;
- ``fastxent``: its median; ``out=``: the median of ``fastxent-out`` (the
  result written into one reused buffer), where the function has one;
- ``/bound``: median / bound, the lower bound of ``roofline.bounds`` for the
  function's kind (1.00 = at the roofline; 2.00 = twice the bound);
- ``1-pass``: the measured one-pass figure (the probe's ``read_exp``: each
  element read from memory and exponentiated once, plus the result's write
  for the kinds that write; float32 only), what a one-pass row kernel would
  take, and ``/1-pass``: fastxent's median (``out=``'s where there is one)
  over it;
- ``bound``: max(memory, exp), the time at the roofline (loads and exp
  overlapping perfectly); ``serial``: memory + exp (no overlap at all);
  ``limit``: which of memory and exp sets the bound;
- ``fastest other``: the fastest of torch, JAX and the NumPy reference in
  that group, and its median / fastxent's (> 1: fastxent faster).

A ``*`` after a ratio marks an input (plus output) that fits in the
last-level cache: repeated calls then read it from cache, not from main
memory, so it can beat the main-memory bound. A summary gives, per function
and thread count, the geometric mean of fastxent / bound over the other
(main-memory) groups.

The bounds come from ``--roofline PATH`` (a probe's JSON) or else the cached
probe of this machine (probing if there is none). The probe and the benchmark
must come from the same machine; the report warns when the host name or
CPU differ.
Output is a Markdown table (``--format text`` for plain columns). ``--md``
prints the README's block instead: one line naming the CPU, the ISA of the
kernels, the compiler that built them and the date of the run, then the
table (run it where the measured build is importable, e.g. with
``PYTHONPATH=src``: the compiler is read from the extension itself).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
from compare import contender_of, format_seconds, group_sort_key, load  # noqa: E402

OTHERS = ("torch", "jax", "reference")
DTYPE_BYTES = {"float32": 4, "float64": 8}


def _fmt_ratio(r, cached=False):
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.2f}" + ("*" if cached else "")


def rows_of(report: dict, probe: dict, *, filter_text: str = "", others=OTHERS, stores: str = "regular"):
    """One dict per group: the cells of the table, plus raw numbers."""
    llc = (probe.get("machine") or {}).get("llc_bytes")
    default_isa = ((report.get("machine_info") or {}).get("fastxent") or {}).get("isa")
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in report.get("benchmarks", []):
        group = bench.get("group") or bench.get("name")
        if filter_text in group:
            groups[group].append(bench)
    rows = []
    for group, benches in sorted(groups.items(), key=lambda kv: group_sort_key(*kv)):
        isa = next((b["extra_info"]["isa"] for b in benches
                    if (b.get("extra_info") or {}).get("isa")), default_isa)
        medians = {contender_of(b): b["stats"]["median"] for b in benches}
        info = benches[0].get("extra_info") or {}
        function = info.get("function", group.split()[0])
        shape = info.get("shape") or []
        dtype = info.get("dtype")
        threads = info.get("threads")
        kind = roofline.FUNCTION_KIND.get(function)
        bound = None
        if kind and len(shape) == 2 and dtype in DTYPE_BYTES and threads:
            try:
                bound = roofline.bounds(shape[0], shape[1], DTYPE_BYTES[dtype], threads, kind,
                                        probe=probe, stores=stores)
            except ValueError as exc:
                print(f"report: {group}: {exc}", file=sys.stderr)
        moved = max((b.get("extra_info") or {}).get("bytes_moved", 0) for b in benches)
        cached = bool(llc and moved and moved <= llc)
        fx, out = medians.get("fastxent"), medians.get("fastxent-out")
        present = [(medians[c], c) for c in others if c in medians]
        fastest = min(present) if present else None
        best = out or fx
        rows.append({
            "group": group,
            "isa": isa,
            "function": function,
            "shape": "x".join(map(str, shape)) if shape else "?",
            "dtype": dtype,
            "threads": threads,
            "kind": kind,
            "fastxent": fx,
            "out": out,
            "bound": bound,
            "cached": cached,
            "fx_ratio": fx / bound.seconds if fx and bound else None,
            "out_ratio": out / bound.seconds if out and bound else None,
            "onepass_ratio": best / bound.onepass if best and bound and bound.onepass else None,
            "fastest_other": fastest[1] if fastest else None,
            "other_ratio": fastest[0] / fx if fastest and fx else None,
        })
    return rows


COLUMNS = ("function", "N x C", "dtype", "T", "ISA", "fastxent", "/bound", "out=", "/bound",
           "bound", "1-pass", "/1-pass", "serial", "limit", "fastest other", "other/fastxent")
RIGHT = {"fastxent", "/bound", "out=", "bound", "1-pass", "/1-pass", "serial", "other/fastxent",
         "T"}


def cells_of(row: dict) -> list[str]:
    b = row["bound"]
    return [
        row["function"],
        row["shape"],
        row["dtype"] or "-",
        str(row["threads"]),
        row["isa"] or "-",
        format_seconds(row["fastxent"]) if row["fastxent"] else "-",
        _fmt_ratio(row["fx_ratio"], row["cached"]),
        format_seconds(row["out"]) if row["out"] else "-",
        _fmt_ratio(row["out_ratio"], row["cached"]),
        format_seconds(b.seconds) if b else "-",
        format_seconds(b.onepass) if b and b.onepass else "-",
        _fmt_ratio(row["onepass_ratio"], row["cached"]),
        format_seconds(b.serial) if b else "-",
        b.limiter if b else "-",
        row["fastest_other"] or "-",
        _fmt_ratio(row["other_ratio"]),
    ]


def render(rows: list[dict], fmt: str = "markdown") -> str:
    table = [list(COLUMNS)] + [cells_of(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]

    def line(cells):
        padded = [c.rjust(w) if COLUMNS[i] in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |" if fmt == "markdown" else "  ".join(padded).rstrip()

    out = [line(table[0])]
    if fmt == "markdown":
        out.append("|" + "|".join(("-" * (w + 1) + ":") if COLUMNS[i] in RIGHT else ("-" * (w + 2))
                                  for i, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(cells) for cells in table[1:])
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    per: dict[tuple, list[float]] = defaultdict(list)
    per_out: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["cached"]:
            continue
        key = (r["function"], r["threads"], r["isa"])
        if r["fx_ratio"]:
            per[key].append(r["fx_ratio"])
        if r["out_ratio"]:
            per_out[key].append(r["out_ratio"])
    if not per:
        return ""

    def gm(values):
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None

    lines = ["Geometric mean of median / bound over the main-memory groups (1.00 = at the roofline):", ""]
    lines.append(f"  {'function':<26}{'threads':>8}{'ISA':>10}{'fastxent':>14}{'out=':>14}")
    for key in sorted(per, key=lambda k: (k[0], k[1] or 0, k[2] or "")):
        a, b = per[key], per_out.get(key, [])
        lines.append(f"  {key[0]:<26}{key[1]!s:>8}{key[2]!s:>10}{f'{gm(a):.2f} ({len(a)})':>14}"
                     f"{(f'{gm(b):.2f} ({len(b)})' if b else '-'):>14}")
    return "\n".join(lines)


def describe_probe(probe: dict) -> str:
    parts = []
    for t, per in sorted(probe["threads"].items(), key=lambda kv: int(kv[0])):
        parts.append(
            f"{t} thread{'s' if t != '1' else ''}: read {per['read']['gbps']:.1f} GB/s, "
            f"read+write {per['rw']['gbps']:.1f} GB/s, write {per['write']['gbps']:.1f} GB/s, "
            f"exp f32 {per['exp_f32']['ns_per_element']:.3f} ns/element, "
            f"exp f64 {per['exp_f64']['ns_per_element']:.3f} ns/element"
        )
    m = probe.get("machine") or {}
    return f"roofline probe ({m.get('cpu')}, {probe.get('created')}): " + "; ".join(parts)


def extension_compiler() -> str:
    """The compiler named in the importable fastxent extension (its ELF
    .comment section), or "unknown"."""
    try:
        from fastxent import _core
        data = Path(_core.__file__).read_bytes()
    except Exception:  # noqa: BLE001 - the report still renders without it
        return "unknown"
    found = re.findall(rb"GCC: \([^)]*\) [0-9][\w.]*|clang version [0-9][\w.]*", data)
    return max(set(found), key=found.count).decode() if found else "unknown"


def machine_line(report: dict, probe: dict) -> str:
    """Where and when the benchmark ran, for the README."""
    machine = report.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw") or (probe.get("machine") or {}).get("cpu")
    cores = (machine.get("cpu") or {}).get("count")
    fx = machine.get("fastxent") or {}
    date = str(report.get("datetime", "?"))[:10]
    return (f"{cpu or 'unknown CPU'}" + (f" ({cores} logical CPUs)" if cores else "")
            + f", {fx.get('isa')} kernels built by {extension_compiler()}; fastxent "
            f"{fx.get('version')}, torch {machine.get('torch')}; {date}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+",
                        help="pytest-benchmark JSON of this suite (--benchmark-json=PATH); several "
                             "(e.g. one run per FASTXENT_ISA) give one row per group and run")
    parser.add_argument("--roofline", metavar="PATH",
                        help="the probe's JSON (roofline.py --json PATH); default: this machine's cached probe")
    parser.add_argument("-k", dest="filter", default="", help="only groups whose name contains this text")
    parser.add_argument("--format", choices=("markdown", "text"), default="markdown")
    parser.add_argument("--md", action="store_true",
                        help="the README block: CPU, ISA, compiler and date, then the Markdown table")
    parser.add_argument("--stores", choices=("regular", "streaming"), default="regular",
                        help="bound of the writing kinds with ordinary (default) or streaming stores")
    parser.add_argument("--others", default=",".join(OTHERS),
                        help="contenders to find the fastest other among (default %(default)s)")
    args = parser.parse_args(argv)

    reports = [load(path) for path in args.json]
    report = reports[0]
    probe = roofline.load(args.roofline)
    machine = report.get("machine_info") or {}
    rows = []
    for rep in reports:
        mismatch = roofline.machine_mismatch(probe, rep.get("machine_info") or {})
        if mismatch:
            print(f"report: warning: {mismatch}", file=sys.stderr)
        rows += rows_of(rep, probe, filter_text=args.filter, stores=args.stores,
                        others=tuple(c.strip() for c in args.others.split(",") if c.strip()))
    # the runs of one group side by side
    order = {row["group"]: i for i, row in enumerate(rows)}
    rows.sort(key=lambda row: order[row["group"]])
    if not rows:
        print("no benchmarks" + (f" matching {args.filter!r}" if args.filter else ""), file=sys.stderr)
        return 1

    if args.md:
        print(machine_line(report, probe) + " " + describe_probe(probe) + ".\n")
        print(render(rows, "markdown"))
        return 0
    fx = machine.get("fastxent") or {}
    print(f"fastxent {fx.get('version')} isa={fx.get('isa')} | torch {machine.get('torch')} | "
          f"jax {machine.get('jax')} | numpy {machine.get('numpy')}")
    print(describe_probe(probe))
    print(f"bounds: forward = max(read, exp); fused_out and write_op = max(read+write, exp) with "
          f"{args.stores} stores; one exp per element. * = fits in the last-level cache.\n")
    print(render(rows, args.format))
    text = summary(rows)
    if text:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
