"""The AMX scan of tokenpool/kernels/maxsim.c (the working tree's) against earlier versions of that file and
against the experimental variants of bench/amx_ab/scan_ab.c, over the same codes in one process: one 32-row query
and 8, cold (every document once) and hot (200 documents repeated), medians of alternating calls, each output
checked against the working tree's; the memory bandwidth measured before and after (bench/index_scan.py's way).

    git show 57f9cab:tokenpool/kernels/maxsim.c > bench/amx_ab/base.c     (a baseline: any version of the file)
    taskset -c 0,1 python bench/amx_ab/ab.py --threads 2 --baseline before=bench/amx_ab/base.c --variants 3 7
    python bench/amx_ab/ab.py --emulate --docs 100 --variants 0 7 9     (no AMX: the tile unit emulated in C,
                                                                          results checked, nothing timed)
Needs a CPU with AMX (or, with --emulate, AVX-512 + BF16) and a C compiler.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
NAMES = {0: "57f9cab's scheme (copy)", 1: "+ next doc prefetched in tiles", 2: "bf16 codes in place",
         3: "bf16 in place + next doc prefetch", 4: "2 token tiles a step + prefetch", 5: "conversion only",
         6: "no 8KB-ahead, next doc prefetch", 7: "next doc converted during tiles",
         8: "v0, scratch same page offset", 9: "v7, scratch same page offset", 10: "conversion only, same page offset"}


def build(source: Path, out: Path, emulate: bool) -> ctypes.CDLL:
    from tokenpool import kernels
    flags = [*kernels._COMMON_FLAGS, *kernels._ISA_FLAGS["amx"], f"-I{Path(kernels.__file__).parent}"]
    if emulate:
        src = [f'-DKERNEL="{source}"', str(ROOT / "tests/fixtures/amx_emulated.c")]
    else:
        src = [str(source)]
    subprocess.run([os.environ.get("CC", "cc"), *flags, *src, "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--variants", type=int, nargs="*", default=[], help=f"scan_ab.c's: {NAMES}")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=FILE",
                    help="a version of maxsim.c to time against the working tree's (repeatable)")
    ap.add_argument("--data", default="numpy", choices=["numpy", "4k", "file"],
                    help="the codes in numpy's memory (it advises huge pages), anonymous 4 KB pages, or a memory map")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--codec", default="float16", choices=["float16", "float32"],
                    help="float32: the working tree's kernel and the baselines only (no variants)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    D = args.dim
    if args.emulate:
        lens = rng.integers(1, 300, args.docs)
    else:
        lens = np.full(args.docs, args.tokens)
    offsets = np.zeros(args.docs + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    n_tok = int(offsets[-1])
    if args.data == "4k":
        import mmap
        region = mmap.mmap(-1, (n_tok + 32) * D * 2)
        region.madvise(mmap.MADV_NOHUGEPAGE)
        f16 = np.frombuffer(region, dtype=np.float16, count=(n_tok + 32) * D).reshape(n_tok + 32, D)
    else:
        f16 = np.empty((n_tok + 32, D), dtype=np.float16)
    for s in range(0, n_tok + 32, 1 << 20):
        blk = rng.standard_normal((min(1 << 20, n_tok + 32 - s), D), dtype=np.float32)
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        f16[s:s + len(blk)] = blk
    bf16 = torch.from_numpy(np.asarray(f16)).to(torch.bfloat16).view(torch.int16).numpy()
    if args.data == "file":
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"amx_ab_codes_{os.getpid()}.f16"
        f16.tofile(path)
        f16 = np.memmap(path, dtype=np.float16, mode="r", shape=f16.shape)
        path.unlink()  # the mapping keeps the data
    stored = f16
    if args.codec == "float32":
        stored = f16.astype(np.float32)
        args.variants = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"amx_ab_{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    lib = build(ROOT / "bench/amx_ab/scan_ab.c", tmp / "scan_ab.so", args.emulate)
    fn = lib.ab_scan
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ctypes.c_int, P, I64, I64, P, I64, P, P, P, I64, P, ctypes.c_int]
    fn.restype = ctypes.c_int
    from tokenpool.kernels.maxsim import _ARGS

    baselines = {}
    if args.emulate:
        ref_lib = build(ROOT / "tokenpool/kernels/maxsim.c", tmp / "maxsim_emu.so", True)
        ref_fn = ref_lib.tp_maxsim
        ref_fn.argtypes, ref_fn.restype = list(_ARGS), ctypes.c_int
    else:
        from tokenpool.kernels import function
        ref_fn = function("maxsim", _ARGS, "amx")  # the working tree's kernel
        assert ref_fn is not None, "no amx build"
        for spec in args.baseline:
            name, _, path = spec.partition("=")
            f = build(Path(path).resolve(), tmp / f"base_{len(baselines)}.so", False).tp_maxsim
            f.argtypes, f.restype = list(_ARGS), ctypes.c_int
            baselines[name] = f

    def tree(q, starts, row_query, order, fn=None):  # the working tree's kernel, or a baseline's
        out = np.empty((len(order), len(starts)), dtype=np.float32)
        table = lambda a: np.array([a.ctypes.data], dtype=np.uintp)  # noqa: E731
        codes_t, off_t, sc_t = table(stored), table(offsets), np.zeros(1, dtype=np.uintp)
        first = np.array([0, args.docs], dtype=np.int64)
        kind = 0 if args.codec == "float32" else 1
        rc = (fn or ref_fn)(q.ctypes.data, len(q), D, row_query.ctypes.data, len(starts), 1, codes_t.ctypes.data,
                            kind, sc_t.ctypes.data, None, off_t.ctypes.data, first.ctypes.data, order.ctypes.data,
                            len(order), out.ctypes.data, 1, args.threads)
        assert rc == 0, rc
        return out

    def variant(v, q, starts, row_query, order):
        out = np.empty((len(order), len(starts)), dtype=np.float32)
        codes = bf16 if v in (2, 3) else f16
        rc = fn(v, q.ctypes.data, len(q), D, row_query.ctypes.data, len(starts), codes.ctypes.data,
                offsets.ctypes.data, order.ctypes.data, len(order), out.ctypes.data, args.threads)
        assert rc == 0, rc
        return out

    bw = None
    if not args.emulate:
        sys.path.insert(0, str(ROOT / "bench"))
        from index_scan import memory_bandwidth
        bw, detail = memory_bandwidth()
        print(f"bandwidth before: {bw / 1e9:.1f} GB/s ({detail})", flush=True)
    cold = np.arange(args.docs, dtype=np.int64)
    hot = np.tile(np.arange(min(200, args.docs), dtype=np.int64), max(1, args.docs // 200))
    code_bytes = stored[:n_tok].nbytes
    rows = []
    for nq in args.queries:
        q = rng.standard_normal((32 * nq, D), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        starts = np.arange(0, 32 * nq, 32, dtype=np.int64)
        row_query = np.repeat(np.arange(nq, dtype=np.int32), 32)
        for label, order in (("cold", cold), ("hot", hot)):
            ref = tree(q, starts, row_query, order)
            runs = {"tree": lambda: tree(q, starts, row_query, order)}
            for name, f in baselines.items():
                got = tree(q, starts, row_query, order, f)
                print(f"{nq}q {label} {name} kernel: max |diff| vs new {float(np.abs(got - ref).max()):.3g}",
                      flush=True)
                runs[name] = lambda f=f: tree(q, starts, row_query, order, f)
            for v in args.variants:
                if v == 4 and nq > 1:
                    continue
                got = variant(v, q, starts, row_query, order)
                diff = float(np.abs(got - ref).max()) if v not in (5, 10) else float("nan")
                runs[f"v{v}"] = (lambda v=v: variant(v, q, starts, row_query, order))
                if args.emulate or label == "cold":
                    print(f"{nq}q {label} v{v} {NAMES[v]}: max |diff| vs new {diff:.3g}", flush=True)
            if args.emulate:
                continue
            times = {k: [] for k in runs}
            for _ in range(args.reps):
                for k, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            for k, ts in times.items():
                rows.append((nq, label, k, float(np.median(ts)), float(np.min(ts))))
    if args.emulate:
        return
    bw2, detail2 = memory_bandwidth()
    print(f"bandwidth after: {bw2 / 1e9:.1f} GB/s ({detail2})")
    bw = max(bw, bw2)
    print(f"data {args.data}: {args.docs} docs x {args.tokens} x {D}, {args.codec} {code_bytes / 1e6:.0f} MB, "
          f"threads {args.threads}, bandwidth {bw / 1e9:.1f} GB/s")
    print("| queries | data | kernel | median ms | min ms | % of bandwidth (cold) |")
    for nq, label, k, med, mn in rows:
        name = "working tree's kernel" if k == "tree" else k if k in baselines else f"{k} {NAMES[int(k[1:])]}"
        pct = f"{100 * code_bytes / med / bw:.0f}%" if label == "cold" else ""
        print(f"| {nq} | {label} | {name} | {med * 1e3:.1f} | {mn * 1e3:.1f} | {pct} |")


if __name__ == "__main__":
    main()
