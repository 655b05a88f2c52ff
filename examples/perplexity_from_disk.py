"""Perplexity and accuracy of logits stored on disk, read a block at a time.

Writes a synthetic float32 logits file (``.npy``) and its labels, then
computes the mean cross entropy, perplexity and accuracy over it with
``fastxent.dask``: each block of rows is memory-mapped, reduced by
fastxent's kernels and released, so the file may be far larger than the
memory budget. Dask's progress bar shows the blocks as they finish.

    python examples/perplexity_from_disk.py                  # 256 MiB file
    python examples/perplexity_from_disk.py --rows 65536 --classes 32000 \\
        --budget "512 MiB"                                   # 8 GiB file
    python examples/perplexity_from_disk.py --cluster        # 2 worker processes

Needs ``dask[array]`` (and ``distributed`` for ``--cluster``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import dask
import fastxent.dask as fxd


def write_logits(path, rows, classes, seed=0, block=1024):
    """Random logits with the label's logit raised by 2 (a model that is
    right about a third of the time at 32000 classes), written block by
    block so the file is never whole in memory."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, classes))
    labels = rng.integers(0, classes, rows)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        b = rng.standard_normal((r1 - r0, classes), dtype=np.float32)
        b[np.arange(r1 - r0), labels[r0:r1]] += 2.0
        out[r0:r1] = b
    out.flush()
    del out
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=16384)
    ap.add_argument("--budget", default="64 MiB", help="memory budget of the blocks in flight")
    ap.add_argument("--dir", default=None, help="where to write the file (a temporary directory)")
    ap.add_argument("--cluster", action="store_true",
                    help="run on a dask.distributed LocalCluster of 2 worker processes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "logits.npy")
        t0 = time.perf_counter()
        labels = write_logits(path, args.rows, args.classes)
        size = os.path.getsize(path)
        print(f"wrote {path}: {args.rows} x {args.classes} float32, {size / 2**20:.0f} MiB "
              f"in {time.perf_counter() - t0:.1f} s")

        logits = fxd.open_logits(path, memory_budget=args.budget)
        print(f"blocks of {logits.chunks[0][0]} rows ({logits.numblocks[0]} blocks) "
              f"for a budget of {args.budget}")
        m = fxd.metrics(logits, labels)  # lazy; one read of the file for all three

        if args.cluster:
            from distributed import Client, LocalCluster, progress

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=":0") as cluster, Client(cluster) as client:
                print(f"dashboard: {client.dashboard_link}")
                t0 = time.perf_counter()
                futures = client.compute(list(m.values()))
                progress(futures)
                print()
                values = client.gather(futures)
        else:
            from dask.diagnostics import ProgressBar

            t0 = time.perf_counter()
            with ProgressBar():
                values = dask.compute(*m.values(), scheduler="threads")
        elapsed = time.perf_counter() - t0
        res = dict(zip(m, values))
        print(f"cross entropy {res['cross_entropy']:.6f} nats, perplexity {res['perplexity']:.2f}, "
              f"accuracy {res['accuracy']:.4f} in {elapsed:.2f} s "
              f"({size / elapsed / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
