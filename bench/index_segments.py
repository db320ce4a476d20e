"""What many small adds cost a search, with and without merging (issue 13's compaction).

One index gets `--adds` calls of `--docs-per-add` documents each (random unit vectors, `--tokens` x 128,
float16), first with merging after adds off (`auto_compact = False`: one segment per add), then the same
adds into a fresh index with merging on (the default); then `compact()` on the first. For each: the
time of all the adds, the segment count, and the latency of a search of one 32 x 128 query (median of
`--searches`); the scan's results are checked equal across the three.

    python bench/index_segments.py [--adds 1000] [--docs-per-add 1] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenpool.index import MultiVectorIndex  # noqa: E402


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    m = rng.standard_normal((rows, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adds", type=int, default=1000)
    ap.add_argument("--docs-per-add", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--searches", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    calls = [[_unit(rng, args.tokens, args.dim) for _ in range(args.docs_per_add)] for _ in range(args.adds)]
    query = [_unit(rng, 32, args.dim)]

    def search_ms(index: MultiVectorIndex) -> tuple[float, list]:
        hits = index.search(query, k=10)
        times = []
        for _ in range(args.searches):
            t0 = time.perf_counter()
            index.search(query, k=10)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, hits

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, merging in (("one segment per add (auto_compact off)", False), ("merging after adds (default)", True)):
            index = MultiVectorIndex.create(Path(tmp) / name.split()[0], args.dim, codec="float16")
            index.auto_compact = merging
            t0 = time.perf_counter()
            for c, mats in enumerate(calls):
                index.add([c * args.docs_per_add + i for i in range(len(mats))], mats)
            adding = time.perf_counter() - t0
            ms, results[name] = search_ms(index)
            rows.append((name, adding, index.stats()["segments"], ms))
            if not merging:
                unmerged = index
        t0 = time.perf_counter()
        unmerged.compact()
        seconds = time.perf_counter() - t0
        ms, results["compacted"] = search_ms(unmerged)
        rows.append((f"the first, then compact() ({seconds:.2f} s)", float("nan"), unmerged.stats()["segments"], ms))
    same = all(r == results["compacted"] for r in results.values())
    docs = args.adds * args.docs_per_add
    print(f"{args.adds} adds of {args.docs_per_add} document(s) x {args.tokens} tokens x {args.dim} dims "
          f"({docs * args.tokens:,} tokens, float16); one 32-row query, k=10; results equal: {same}")
    print("| index | all adds, s | segments | one search, ms |\n|---|---:|---:|---:|")
    for name, adding, segments, ms in rows:
        print(f"| {name} | {adding:.2f} | {segments} | {ms:.2f} |")


if __name__ == "__main__":
    main()
