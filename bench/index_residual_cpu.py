"""The residual codec's candidate search on the CPU, one query at a time: with its C kernels (the centroid stage,
tokenpool/kernels/centroid_maxsim.c; the exact stage, maxsim.c; the codes' unpack, residual_unpack.c), with the
centroid stage's alone, and with torch only, same index, same run.

    python bench/index_residual_cpu.py [--docs 5000] [--tokens 100] [--dim 128] [--queries 20]

Corpus: unit token vectors around 1,024 random topic directions (each document draws 8; noise of norm 0.8),
nbits=2, 4,096 centroids; queries: 32 tokens of a random document each; encoding not included. Prints the
machine's CPU model and instruction-set class, and per path the mean milliseconds per one-query search
(best of 3 passes) and whether both paths return the same hits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=20)
    args = p.parse_args()
    import torch

    from tokenpool.index import MultiVectorIndex
    from tokenpool.kernels import build_variant
    from tokenpool.kernels import centroid_maxsim as kernel
    from tokenpool.kernels import maxsim as exact_kernel
    from tokenpool.kernels import residual_unpack as unpack_kernel
    from tokenpool.platforms.cpu import cpu_info

    rng = np.random.default_rng(0)
    topics = rng.standard_normal((1024, args.dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    docs = []
    for _ in range(args.docs):
        m = topics[rng.integers(0, 1024, 8)][rng.integers(0, 8, args.tokens)]
        m = m + 0.8 * rng.standard_normal(m.shape).astype(np.float32) / args.dim ** 0.5
        docs.append(m / np.linalg.norm(m, axis=1, keepdims=True))
    queries = [docs[i][rng.integers(0, args.tokens, 32)] for i in rng.integers(0, args.docs, args.queries)]
    kernels = (kernel, exact_kernel, unpack_kernel)
    real = [k.available for k in kernels]
    off = lambda *a, **k: False  # noqa: E731
    paths = (("all C kernels (centroid stage, exact stage, unpack)", real),
             ("centroid stage only (before 2026-12-07 12:45)", [real[0], off, off]),
             ("torch (before 2026-12-06)", [off, off, off]))
    with tempfile.TemporaryDirectory() as tmp:
        index = MultiVectorIndex.create(Path(tmp) / "ix", args.dim, codec="residual", nbits=2, num_centroids=4096)
        index.add(list(range(args.docs)), docs)
        hits, times = {}, {name: [] for name, _ in paths}
        for _ in range(5):  # the paths alternate, best of 5 passes each (shared machines drift)
            for name, available in paths:
                for k, a in zip(kernels, available):
                    k.available = a
                index.search(queries[:2], k=10)  # warm
                t = time.perf_counter()
                hits[name] = [index.search([q], k=10)[0] for q in queries]
                times[name].append((time.perf_counter() - t) / len(queries))
        for k, a in zip(kernels, real):
            k.available = a
    rows = [(name, min(times[name])) for name, _ in paths]
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"\n{args.docs:,} docs x {args.tokens} tokens x {args.dim} dims, residual nbits=2, 4,096 centroids; one "
          f"32-row query per search; {cpu}, class {cpu_info().isa_class} (kernel build {build_variant()}), "
          f"{torch.get_num_threads()} threads")
    first = list(hits.values())[0]
    same = min(sum([h[0] for h in a] == [h[0] for h in b] for a, b in zip(first, other)) for other in hits.values())
    print(f"same ids from every path on {same}/{len(queries)} queries")
    print("| path | ms per one-query search | speed-up |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.1f} | {rows[-1][1] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
