"""Exact MaxSim scan of `tokenpool.index.MultiVectorIndex` on the CPU: effective bytes/s against the machine's
memory bandwidth measured in the same run.

    python bench/index_scan.py [--docs 20000] [--tokens 128] [--dim 128] [--codec float16 ...] [--queries 1 8]

Random unit vectors (documents of exactly --tokens rows), queries of 32 x dim, encoding not included. The
scan reads every stored byte once per pass; "effective bytes/s" = stored code bytes / seconds per pass (one
query, or a batch of queries searched in one call). Memory bandwidth: the median of 5 passes over a 1 GiB
array of each of numpy's single-threaded copy, torch's threaded copy (copies counted as read + write) and
torch's threaded sum (a read, as the scan's), whichever is fastest, measured before and after the scans (the
higher of the two is the denominator: the rate moves between runs on shared machines). Several codecs: one table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def memory_bandwidth() -> tuple[float, str]:
    """Over 1 GiB: numpy's copy (one thread), torch's copy (its threads, which a many-core machine needs to reach
    its bandwidth), both counted as read + write, and torch's sum (a read, as a scan is); the median of 5 passes
    after a warm-up (on the 2-core VM single passes reached up to twice the sustained rate now and then), the
    fastest of the three."""
    import torch

    src = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    dst = np.empty_like(src)
    s, d = torch.from_numpy(src), torch.from_numpy(dst)
    medians = {}
    for name, moved, run in (("numpy copy", 2, lambda: np.copyto(dst, src)), ("torch copy", 2, lambda: d.copy_(s)),
                             ("torch sum", 1, lambda: s.sum())):
        run()
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            rates.append(moved * src.nbytes / (time.perf_counter() - t))
        medians[name] = float(np.median(rates))
    return max(medians.values()), ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in medians.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--codec", nargs="+", default=["float16", "float32", "int8"], help="one or more codecs")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the scan's; default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tokenpool.index import MultiVectorIndex

    rng = np.random.default_rng(0)
    before, methods_before = memory_bandwidth()
    rows = []
    for codec in args.codec:
        with tempfile.TemporaryDirectory() as tmp:
            index = MultiVectorIndex.create(Path(tmp) / "ix", args.dim, codec=codec)
            step = 2000
            data = np.random.default_rng(1)  # the same documents for every codec
            for start in range(0, args.docs, step):
                n = min(step, args.docs - start)
                mats = data.standard_normal((n, args.tokens, args.dim)).astype(np.float32)
                mats /= np.linalg.norm(mats, axis=2, keepdims=True)
                index.add(list(range(start, start + n)), list(mats))
            stored = index.stats()["bytes_per_token"] * args.docs * args.tokens
            for q in args.queries:
                queries = [m / np.linalg.norm(m, axis=1, keepdims=True)
                           for m in rng.standard_normal((q, 32, args.dim)).astype(np.float32)]
                index.search(queries, k=10)  # warm: pages in the page cache
                best = min(_timed(index, queries) for _ in range(3))
                rows.append((codec, stored, q, best, stored * q / best))
    after, methods_after = memory_bandwidth()
    bandwidth = max(before, after)  # it moves between runs on shared machines: the scans against the higher
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"\n{args.docs:,} docs x {args.tokens} tokens x {args.dim} dims, queries of 32 x {args.dim}, random unit "
          f"vectors; {cpu}, {os.cpu_count()} cores, {__import__('torch').get_num_threads()} threads; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, the higher of the measurements before the scans "
          f"({methods_before}) and after them ({methods_after})")
    from tokenpool.kernels import build_variant
    from tokenpool.kernels import maxsim as kernel

    if kernel.available(bf16=True) and os.environ.get("TOKENPOOL_INDEX_BF16", "1") != "0":
        how = "on the AMX tiles" if build_variant() == "amx" else "with AVX512-BF16"
        path = f"C kernel, bf16 products {how}, candidates within the error bound rescored in fp32"
    elif kernel.available():
        path = f"C kernel, fp32 products ({build_variant()} class)"
    else:
        path = "PyTorch blocks"
    print(f"scan of the exact codecs: {path}")
    print("| codec | GB stored | queries per call | seconds per call | QPS | effective GB/s (stored bytes x queries / s) "
          "| vs memory bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for codec, stored, q, seconds, rate in rows:
        print(f"| {codec} | {stored / 1e9:.2f} | {q} | {seconds:.3f} | {q / seconds:.1f} | {rate / 1e9:.2f} "
              f"| {rate / bandwidth:.0%} |")


def _timed(index, queries) -> float:
    t = time.perf_counter()
    index.search(queries, k=10)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
