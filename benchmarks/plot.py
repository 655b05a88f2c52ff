#!/usr/bin/env python
"""Plot a pytest-benchmark JSON of this suite against the roofline.

    python benchmarks/plot.py out.json                       # -> out.png
    python benchmarks/plot.py out.json --roofline probe.json -o roofline.png
    python benchmarks/plot.py out.json -k float32            # groups containing this text

One panel per (function, threads): achieved GB/s (bytes of logits read /
median) against C (log scale) for fastxent (and fastxent-out where the
function has it), torch, JAX and the NumPy reference, float32 as filled
markers joined by lines, float64 as open markers. The horizontal lines are
the roofline bound of ``roofline.bounds`` for the function's kind in the same
units (solid: max(memory, exp); dotted: memory + exp), from ``--roofline
PATH`` or this machine's cached probe. The bound does not depend on the
shape (every term is proportional to N*C). Points above it are inputs that
stay in the last-level cache between calls, or call overhead (8 x 10).

Needs matplotlib (``pip install matplotlib``), which fastxent itself does
not; without it this prints how to get it and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
from compare import contender_of, load  # noqa: E402

FUNCTIONS = ("cross_entropy", "cross_entropy_with_grad", "logsumexp", "log_softmax", "softmax", "entropy")
DEFAULT_CONTENDERS = ("fastxent", "fastxent-out", "torch", "jax", "reference")
STYLE = {  # contender: (colour, marker, line style)
    "fastxent": ("#d62728", "o", "-"),
    "fastxent-out": ("#ff7f0e", "D", "--"),
    "torch": ("#1f77b4", "s", "-"),
    "jax": ("#2ca02c", "^", "-"),
    "reference": ("#7f7f7f", "v", "-"),
    "scipy": ("#9467bd", "P", "-"),
}
DTYPE_BYTES = {"float32": 4, "float64": 8}
# Inputs smaller than this are call overhead, not bandwidth: drawn, not joined.
LINE_MIN_ELEMENTS = 1 << 16


def collect(report: dict, filter_text: str, contenders):
    """(function, threads) -> contender -> [(C, N, dtype, GB/s)]."""
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for bench in report.get("benchmarks", []):
        group = bench.get("group") or bench.get("name", "")
        if filter_text not in group:
            continue
        info = bench.get("extra_info") or {}
        contender = contender_of(bench)
        shape, median = info.get("shape"), (bench.get("stats") or {}).get("median")
        if contender not in contenders or not shape or len(shape) != 2 or not median:
            continue
        gbps = info["bytes"] / median / 1e9
        panels[(info.get("function"), info.get("threads"))][contender].append(
            (shape[1], shape[0], info.get("dtype"), gbps))
    return panels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="pytest-benchmark JSON of this suite (--benchmark-json=PATH)")
    parser.add_argument("-o", "--output", help="PNG to write (default: the JSON's name with .png)")
    parser.add_argument("--roofline", metavar="PATH",
                        help="the probe's JSON (roofline.py --json PATH); default: this machine's cached probe")
    parser.add_argument("-k", dest="filter", default="", help="only groups whose name contains this text")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                        help="comma-separated contenders to draw (default %(default)s)")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("plot.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 1

    report = load(args.json)
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    panels = collect(report, args.filter, contenders)
    if not panels:
        print("no benchmarks to plot" + (f" matching {args.filter!r}" if args.filter else ""), file=sys.stderr)
        return 1
    probe = roofline.load(args.roofline)
    machine = report.get("machine_info") or {}
    mismatch = roofline.machine_mismatch(probe, machine)
    if mismatch:
        print(f"plot: warning: {mismatch}", file=sys.stderr)

    functions = [f for f in FUNCTIONS if any(k[0] == f for k in panels)]
    functions += sorted({k[0] for k in panels} - set(functions))
    threads = sorted({k[1] for k in panels})
    fig, axes = plt.subplots(len(functions), len(threads), figsize=(6.2 * len(threads), 3.4 * len(functions)),
                             squeeze=False, sharex=True, sharey=True)
    ymin, ymax = float("inf"), 0.0
    for i, function in enumerate(functions):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            per = panels.get((function, t), {})
            dtypes = set()
            for contender in contenders:
                points = per.get(contender)
                if not points:
                    continue
                colour, marker, ls = STYLE.get(contender, ("black", "x", "-"))
                for dtype in ("float32", "float64"):
                    pts = sorted(p for p in points if p[2] == dtype)
                    if not pts:
                        continue
                    dtypes.add(dtype)
                    filled = dtype == "float32"
                    big = [p for p in pts if p[0] * p[1] >= LINE_MIN_ELEMENTS]
                    if filled and len(big) > 1:
                        ax.plot([p[0] for p in big], [p[3] for p in big], ls, color=colour, lw=1.3, alpha=0.85)
                    ax.scatter([p[0] for p in pts], [p[3] for p in pts], marker=marker, s=34, zorder=3,
                               facecolors=colour if filled else "none", edgecolors=colour, linewidths=1.3)
                    ymin = min(ymin, min(p[3] for p in pts))
                    ymax = max(ymax, max(p[3] for p in pts))
            kind = roofline.FUNCTION_KIND.get(function)
            if kind:
                for dtype in sorted(dtypes):
                    try:
                        top = roofline.bound_gbps(DTYPE_BYTES[dtype], t, kind, probe=probe)
                        low = roofline.bound_gbps(DTYPE_BYTES[dtype], t, kind, probe=probe, serial=True)
                    except ValueError:
                        continue
                    dash = "-" if dtype == "float32" else "--"
                    ax.axhline(top, color="black", ls=dash, lw=1.6, zorder=1)
                    ax.axhline(low, color="black", ls=":", lw=1.0, zorder=1)
                    ax.annotate(f"bound {dtype} {top:.1f} GB/s", xy=(1.0, top), xycoords=("axes fraction", "data"),
                                xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8)
                    ymax = max(ymax, top)
            ax.set_title(f"{function}  ({kind or '?'}), {t} thread{'s' if t != 1 else ''}", fontsize=10)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.grid(True, which="minor", alpha=0.1)
            if j == 0:
                ax.set_ylabel("GB/s of logits read")
            if i == len(functions) - 1:
                ax.set_xlabel("C (classes)")
    if ymax > 0:
        axes[0][0].set_ylim(max(ymin / 1.6, 1e-4), ymax * 1.8)

    handles = [Line2D([], [], color=STYLE.get(c, ("black",))[0], marker=STYLE.get(c, (0, "x"))[1],
                      ls=STYLE.get(c, (0, 0, "-"))[2], label=c) for c in contenders]
    handles += [
        Line2D([], [], color="black", ls="-", lw=1.6, label="bound float32: max(memory, exp)"),
        Line2D([], [], color="black", ls="--", lw=1.6, label="bound float64"),
        Line2D([], [], color="black", ls=":", lw=1.0, label="memory + exp (no overlap)"),
        Line2D([], [], color="gray", marker="o", ls="", markerfacecolor="none", label="open marker: float64"),
    ]
    fx = machine.get("fastxent") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw") or (probe.get("machine") or {}).get("cpu")
    fig.suptitle(f"fastxent {fx.get('version')} ({fx.get('isa')}) vs the roofline on {cpu}; "
                 f"JAX with XLA's default threading in every panel", fontsize=11, y=0.998, va="top")
    top = 1.0 - 0.42 / fig.get_figheight()  # below the title
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=9, frameon=False, bbox_to_anchor=(0.5, top))
    fig.tight_layout(rect=(0, 0, 1, top - 0.42 / fig.get_figheight()))
    output = args.output or str(Path(args.json).with_suffix(".png"))
    fig.savefig(output, dpi=args.dpi)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
