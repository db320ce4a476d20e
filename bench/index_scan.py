"""Exact MaxSim scan of `tokenpool.index.MultiVectorIndex` on the CPU: effective bytes/s against the machine's
memory bandwidth measured in the same run.

    python bench/index_scan.py [--docs 20000] [--tokens 128] [--dim 128] [--codec float16] [--queries 1 8]

Random unit vectors (documents of exactly --tokens rows), queries of 32 x dim, encoding not included. The
scan reads every stored byte once per pass; "effective bytes/s" = stored code bytes / seconds per pass (one
query, or a batch of queries searched in one call). Memory bandwidth: the best of 5 copies of a 1 GiB
array (numpy's single-threaded copy and torch's threaded one, counted as read + write).
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


def copy_bandwidth() -> float:
    """The best of 5 copies of 1 GiB, counted as read + write: numpy's (one thread) and torch's (its threads,
    which a many-core machine needs to reach its bandwidth), whichever is faster."""
    import torch

    src = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    dst = np.empty_like(src)
    best = 0.0
    for copy in (lambda: np.copyto(dst, src), lambda: torch.from_numpy(dst).copy_(torch.from_numpy(src))):
        for _ in range(5):
            t = time.perf_counter()
            copy()
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--codec", default="float16")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the scan's; default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tokenpool.index import MultiVectorIndex

    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        index = MultiVectorIndex.create(Path(tmp) / "ix", args.dim, codec=args.codec)
        step = 2000
        for start in range(0, args.docs, step):
            n = min(step, args.docs - start)
            mats = rng.standard_normal((n, args.tokens, args.dim)).astype(np.float32)
            mats /= np.linalg.norm(mats, axis=2, keepdims=True)
            index.add(list(range(start, start + n)), list(mats))
        stored = index.stats()["bytes_per_token"] * args.docs * args.tokens
        rows = []
        for q in args.queries:
            queries = [m / np.linalg.norm(m, axis=1, keepdims=True)
                       for m in rng.standard_normal((q, 32, args.dim)).astype(np.float32)]
            index.search(queries, k=10)  # warm: pages in the page cache
            best = min(_timed(index, queries) for _ in range(3))
            rows.append((q, best, stored * q / best))
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"\n{args.docs:,} docs x {args.tokens} tokens x {args.dim} dims, {args.codec} ({stored / 1e9:.2f} GB stored), "
          f"queries of 32 x {args.dim}, random unit vectors; {cpu}, {os.cpu_count()} cores, "
          f"{__import__('torch').get_num_threads()} threads; "
          f"memory copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    from tokenpool.kernels import build_variant
    from tokenpool.kernels import maxsim as kernel

    if args.codec != "residual" and kernel.available(bf16=True) and os.environ.get("TOKENPOOL_INDEX_BF16", "1") != "0":
        how = "on the AMX tiles" if build_variant() == "amx" else "with AVX512-BF16"
        path = f"C kernel, bf16 products {how}, candidates within the error bound rescored in fp32"
    elif args.codec != "residual" and kernel.available():
        path = f"C kernel, fp32 products ({build_variant()} class)"
    else:
        path = "PyTorch blocks"
    print(f"scan: {path}")
    print("| queries per call | seconds per call | QPS | effective GB/s (stored bytes x queries / s) | vs memory bandwidth |")
    print("|---|---|---|---|---|")
    for q, seconds, rate in rows:
        print(f"| {q} | {seconds:.3f} | {q / seconds:.1f} | {rate / 1e9:.2f} | {rate / bandwidth:.0%} |")


def _timed(index, queries) -> float:
    t = time.perf_counter()
    index.search(queries, k=10)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
