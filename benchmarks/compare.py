#!/usr/bin/env python
"""Print a pytest-benchmark JSON report of the fastxent suite as one table per group.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python benchmarks/compare.py out.json
    python benchmarks/compare.py out.json -k "cross_entropy 4096x32000"
    python benchmarks/compare.py new.json --baseline old.json

For every group (function, shape, dtype, threads): each contender's median,
IQR, GB/s of logits read, and its time relative to ``fastxent``
(``torch/fastxent = 5.0x`` means fastxent is five times faster). A summary at
the end gives, per function and thread count, the geometric mean of
torch/fastxent, jax/fastxent, reference/fastxent and scipy/fastxent over the
shapes. (For the table against the roofline bounds, see report.py.) With ``--baseline``,
each row also shows old median / new median for the same benchmark
(> 1: faster now).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

BASE = "fastxent"
RATIO_CONTENDERS = ("torch", "jax", "reference", "scipy")
CONTENDER_ORDER = {"fastxent": 0, "torch": 1, "jax": 2, "scipy": 3, "reference": 4}


def format_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}" if s / scale < 100 else f"{s / scale:.0f} {unit}"
    return f"{s / 1e-9:.3g} ns"


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def contender_of(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if "contender" in info:
        return info["contender"]
    # <shape>-<dtype>-<T>thread-<contender>: everything after the thread field
    param = bench.get("param") or bench.get("name", "")
    parts = param.split("thread-", 1)
    return parts[1] if len(parts) == 2 else param


def group_sort_key(group: str, benches: list[dict]):
    info = benches[0].get("extra_info") or {}
    shape = info.get("shape") or []
    return (
        info.get("function", group),
        math.prod(shape) if shape else 0,
        tuple(shape),
        info.get("dtype", ""),
        info.get("threads", 0),
    )


def key_of(bench: dict) -> tuple:
    return (bench.get("group"), contender_of(bench))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=PATH)")
    parser.add_argument("--baseline", help="an older JSON of the same suite to compare medians with")
    parser.add_argument("-k", dest="filter", default="", help="only groups whose name contains this substring")
    args = parser.parse_args(argv)

    report = load(args.json)
    baseline = {}
    if args.baseline:
        baseline = {key_of(b): b["stats"]["median"] for b in load(args.baseline).get("benchmarks", [])}

    machine = report.get("machine_info", {})
    fx = machine.get("fastxent") or {}
    print(
        f"fastxent {fx.get('version')} isa={fx.get('isa')} openmp={fx.get('openmp')} | "
        f"torch {machine.get('torch')} | jax {machine.get('jax')} | numpy {machine.get('numpy')} | "
        f"cpu: {(machine.get('cpu') or {}).get('brand_raw', machine.get('processor', '?'))}"
    )

    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in report.get("benchmarks", []):
        group = bench.get("group") or bench.get("name")
        if args.filter in group:
            groups[group].append(bench)
    if not groups:
        print("no benchmarks" + (f" matching {args.filter!r}" if args.filter else ""), file=sys.stderr)
        return 1

    # (function, threads) -> contender -> [ratio over shapes]
    ratios: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    header = f"  {'contender':<14}{'median':>11}{'iqr':>11}{'GB/s':>8}{'vs fastxent':>13}"
    if baseline:
        header += f"{'old':>11}{'old/new':>9}"
    for group, benches in sorted(groups.items(), key=lambda kv: group_sort_key(*kv)):
        medians = {contender_of(b): b["stats"]["median"] for b in benches}
        base = medians.get(BASE)
        print(f"\n{group}")
        print(header)
        order = sorted(benches, key=lambda b: (CONTENDER_ORDER.get(contender_of(b).split("-")[0], 9), contender_of(b)))
        for bench in order:
            contender = contender_of(bench)
            stats, info = bench["stats"], bench.get("extra_info") or {}
            median = stats["median"]
            gbps = info.get("gbps") or (info["bytes"] / median / 1e9 if info.get("bytes") and median else None)
            ratio = f"{median / base:.2f}x" if base else "-"
            line = (
                f"  {contender:<14}{format_seconds(median):>11}{format_seconds(stats.get('iqr')):>11}"
                f"{(f'{gbps:.3g}' if gbps else '-'):>8}{ratio:>13}"
            )
            if baseline:
                old = baseline.get(key_of(bench))
                line += f"{format_seconds(old):>11}{(f'{old / median:.2f}' if old else '-'):>9}"
            print(line)
        if base:
            summary = [f"{c}/fastxent = {medians[c] / base:.2f}x" for c in RATIO_CONTENDERS if c in medians]
            if summary:
                print("  " + ", ".join(summary))
            info = benches[0].get("extra_info") or {}
            for c in RATIO_CONTENDERS:
                if c in medians:
                    ratios[(info.get("function", group.split()[0]), info.get("threads"))][c].append(medians[c] / base)

    if ratios:
        print("\nGeometric mean over shapes and dtypes of <contender>/fastxent (> 1: fastxent faster)")
        print(f"  {'function':<26}{'threads':>8}" + "".join(f"{c:>12}" for c in RATIO_CONTENDERS))
        for (function, threads), per in sorted(ratios.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            cells = []
            for c in RATIO_CONTENDERS:
                values = per.get(c)
                if values:
                    gm = math.exp(sum(math.log(v) for v in values) / len(values))
                    cells.append(f"{gm:.2f}x ({len(values)})")
                else:
                    cells.append("-")
            print(f"  {function:<26}{threads!s:>8}" + "".join(f"{cell:>12}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
