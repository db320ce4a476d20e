"""GPU benchmark: exact MaxSim over a token-matrix corpus, the fused Triton kernel vs chunked torch, same data.

    python bench/gpu_maxsim.py                       # 1M docs x 128 tokens x 128 dims fp16 (32.8 GB), 1 and 32 queries
    python bench/gpu_maxsim.py --var-len             # document lengths uniform in 16..240 (mean 128): the tile table
    python bench/gpu_maxsim.py --docs 200000 --dim 384 --queries 1,8 --sweep

Corpus: random unit vectors in float16 (`--docs`, `--tokens` rows each, `--dim`), made on the GPU; queries:
`--queries` counts of `--query-len` unit rows each. Measured in the same run, as ceilings:
- HBM bandwidth: a device-to-device copy of 4 GiB (read + write bytes / time);
- bf16 matmul rate: 8192^3 `torch.mm`.
For each query count: the torch baseline (per chunk of documents `q @ d.T` in float16, a max per document, a sum
per query) and `maxsim_cuda` (the whole call: query padding, the tile plan, the kernel): ms per call, codes bytes
/ time and its fraction of the copy bandwidth, queries/s, TFLOP/s (2 x query rows x tokens x dim) and its
fraction of the bf16 matmul rate. Correctness: the kernel's scores against the baseline's (all documents) and
against the float32 reference `maxsim_torch` (the first `--check-docs` documents), max abs diff printed.
`--sweep` also times a few blockings of the kernel alone per query count (the heuristic's choice marked *;
"T": the transposed product S^T = D Q^T). "kernel alone": the launch without the host-side preparation (query
padding, the tile plan, their host syncs) that "triton maxsim_cuda" includes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenpool.index import cuda_maxsim  # noqa: E402
from tokenpool.index.cuda_maxsim import Config, maxsim_cuda, maxsim_torch  # noqa: E402


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of fn(), CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def iters_for(seconds_per_call: float, budget: float = 1.5, lo: int = 3, hi: int = 30) -> int:
    return int(min(max(budget / max(seconds_per_call, 1e-6), lo), hi))


def copy_bandwidth() -> float:
    n = 4 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), iters=10, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / t


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, iters=20, warmup=5)
    return 2 * 8192**3 / t


def make_corpus(docs: int, tokens: int, dim: int, var_len: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if var_len:
        lo = max(1, tokens // 8)
        lens = torch.randint(lo, 2 * tokens - lo + 1, (docs,), device="cuda", generator=g)
    else:
        lens = torch.full((docs,), tokens, device="cuda")
    offsets = torch.zeros(docs + 1, dtype=torch.int64, device="cuda")
    torch.cumsum(lens, 0, out=offsets[1:])
    total = int(offsets[-1])
    codes = torch.empty(total, dim, dtype=torch.float16, device="cuda")
    step = max(1, (1 << 28) // dim)  # 1 GiB of float32 at a time
    for start in range(0, total, step):
        block = torch.randn(min(step, total - start), dim, device="cuda", generator=g)
        codes[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=-1)
    return codes, offsets, (None if var_len else tokens)


def torch_baseline(q16: torch.Tensor, n_queries: int, qlen: int, codes: torch.Tensor, offsets: torch.Tensor,
                   doc_len: int | None, budget: int = 1 << 28) -> torch.Tensor:
    """What one writes in torch: per chunk of whole documents, the float16 [rows, tokens] score block (at most
    `budget` elements), a max per document, a sum per query."""
    rows = q16.shape[0]
    docs = offsets.numel() - 1
    out = torch.empty(n_queries, docs, dtype=torch.float32, device=codes.device)
    if doc_len is not None:
        per_chunk = max(1, budget // (rows * doc_len))
        for d0 in range(0, docs, per_chunk):
            d1 = min(docs, d0 + per_chunk)
            s = q16 @ codes[d0 * doc_len:d1 * doc_len].T
            best = s.view(rows, d1 - d0, doc_len).amax(dim=2)
            out[:, d0:d1] = best.view(n_queries, qlen, d1 - d0).float().sum(dim=1)
        return out
    offs = offsets.cpu()
    d0 = 0
    while d0 < docs:
        d1 = int(torch.searchsorted(offs, offs[d0] + budget // rows, right=True)) - 1
        d1 = min(max(d1, d0 + 1), docs)
        t0, t1 = int(offs[d0]), int(offs[d1])
        s = codes[t0:t1] @ q16.T  # [tokens, rows]
        best = torch.segment_reduce(s, "max", lengths=offsets[d0 + 1:d1 + 1] - offsets[d0:d1], axis=0)
        out[:, d0:d1] = best.view(d1 - d0, n_queries, qlen).float().sum(dim=2).T
        d0 = d1
    return out


def sweep_configs(rows: int, dim: int, docs: int) -> list[Config]:
    heuristic = cuda_maxsim.choose_config(rows, dim, torch.float16, docs, torch.device("cuda"))
    small = heuristic.bq <= 64
    bq = heuristic.bq
    dpp = heuristic.dpp
    C = Config
    if small:
        cands = [C(bq, 128, dpp, 4, 3), C(bq, 64, dpp, 4, 4), C(bq, 128, dpp, 4, 2), C(bq, 128, dpp, 8, 3),
                 C(bq, 256, dpp, 8, 2), C(bq, 64, dpp, 4, 3), C(max(bq, 64), 128, dpp, 4, 3),
                 C(bq, 128, max(1, dpp // 4), 4, 3), C(bq, 128, dpp, 4, 3, True), C(bq, 64, dpp, 4, 4, True),
                 C(bq, 128, dpp, 8, 3, True)]
    else:
        cands = [C(128, 64, dpp, 4, 3), C(128, 128, dpp, 8, 3), C(128, 64, dpp, 8, 3), C(128, 64, dpp, 4, 4),
                 C(64, 128, dpp, 4, 3), C(256, 64, dpp, 8, 3), C(256, 32, dpp, 8, 4), C(128, 128, dpp, 8, 2),
                 C(128, 64, max(1, dpp // 4), 4, 3), C(128, 64, dpp, 4, 3, True), C(128, 128, dpp, 8, 3, True),
                 C(256, 64, dpp, 8, 3, True), C(128, 64, dpp, 4, 4, True)]
    out = [heuristic]
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--tokens", type=int, default=128, help="rows per document (the mean with --var-len)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", default="1,32", help="query counts, comma-separated")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--var-len", action="store_true", help="document lengths uniform in tokens/8..2*tokens-tokens/8")
    p.add_argument("--check-docs", type=int, default=20_000, help="documents checked against float32 maxsim_torch")
    p.add_argument("--sweep", action="store_true", help="also time a few kernel blockings per query count")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available() and cuda_maxsim.available(), "needs a CUDA GPU and Triton"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    import triton

    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth()
    peak = matmul_rate()
    print(f"ceilings: device copy {bw / 1e12:.2f} TB/s (read + write), bf16 mm 8192^3 {peak / 1e12:.0f} TFLOP/s")

    codes, offsets, doc_len = make_corpus(args.docs, args.tokens, args.dim, args.var_len)
    tokens = codes.shape[0]
    nbytes = codes.numel() * codes.element_size()
    torch.cuda.synchronize()
    print(f"corpus: {args.docs:,} docs, {tokens:,} tokens ({'variable' if doc_len is None else doc_len} per doc), "
          f"dim {args.dim}, float16: {nbytes / 1e9:.1f} GB (made in {time.time() - t_start:.0f} s)")
    counts = [int(x) for x in args.queries.split(",")]
    g = torch.Generator(device="cuda").manual_seed(1)
    q_all = torch.nn.functional.normalize(
        torch.randn(max(counts) * args.query_len, args.dim, device="cuda", generator=g), dim=-1)
    if doc_len is None:
        t_plan = cuda_time(lambda: cuda_maxsim._plan(offsets, 64), iters=5, warmup=1)
        print(f"tile table for variable lengths (bt=64): {t_plan * 1e3:.2f} ms per call (included in the kernel's)")

    results = []
    header = (f"{'queries':>7} {'method':<26} {'ms':>9} {'GB/s':>7} {'of copy':>8} {'QPS':>9} {'TFLOP/s':>8} "
              f"{'of bf16':>8}")
    lines = []
    check_lines = []
    for n in counts:
        rows = n * args.query_len
        q = q_all[:rows]
        q_offsets = torch.arange(0, rows + 1, args.query_len)
        flops = 2 * rows * tokens * args.dim
        q16 = q.half()

        def add(method, t):
            rec = dict(queries=n, method=method, ms=t * 1e3, gbps=nbytes / t / 1e9, of_copy=nbytes / t / bw,
                       qps=n / t, tflops=flops / t / 1e12, of_bf16=flops / t / peak)
            results.append(rec)
            lines.append(f"{n:>7} {method:<26} {rec['ms']:>9.2f} {rec['gbps']:>7.0f} {rec['of_copy']:>8.1%} "
                         f"{rec['qps']:>9.1f} {rec['tflops']:>8.1f} {rec['of_bf16']:>8.1%}")
            print(lines[-1], flush=True)

        if not lines:
            print(header)
        base = torch_baseline(q16, n, args.query_len, codes, offsets, doc_len)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        base = torch_baseline(q16, n, args.query_len, codes, offsets, doc_len)
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        add("torch chunked fp16", cuda_time(lambda: torch_baseline(q16, n, args.query_len, codes, offsets, doc_len),
                                            iters=iters_for(est, lo=3, hi=10), warmup=0))

        config = cuda_maxsim.choose_config(n * cuda_maxsim._next_pow2(args.query_len), args.dim, codes.dtype,
                                           args.docs, codes.device)
        t0 = time.perf_counter()
        got = maxsim_cuda(q, q_offsets, codes, offsets)  # compiles
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = maxsim_cuda(q, q_offsets, codes, offsets)
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        add("triton maxsim_cuda", cuda_time(lambda: maxsim_cuda(q, q_offsets, codes, offsets), iters=iters_for(est)))
        launch = cuda_maxsim._prepare(q, q_offsets, codes, offsets)
        add("  kernel alone", cuda_time(launch, iters=iters_for(est)))

        c = min(args.check_docs, args.docs)
        end = int(offsets[c])
        ref = maxsim_torch(q, q_offsets, codes[:end], offsets[:c + 1])
        d_base = (got - base).abs().max().item()
        d_ref = (got[:, :c] - ref).abs().max().item()
        scale = ref.abs().max().item()
        check_lines.append(f"{n:>3} queries: config {config} (first call {compile_s:.1f} s incl. compile); "
                           f"max |triton - torch fp16| = {d_base:.2e} over all docs; max |triton - fp32 reference| = "
                           f"{d_ref:.2e} over {c:,} docs (max |score| {scale:.2f}, rel {d_ref / scale:.1e})")
        results.append(dict(queries=n, config=str(config), diff_vs_baseline=d_base, diff_vs_fp32=d_ref, scale=scale))
        del base, ref, got, launch

        if args.sweep:
            for cfg in sweep_configs(n * cuda_maxsim._next_pow2(args.query_len), args.dim, args.docs):
                name = f"bq{cfg.bq} bt{cfg.bt} w{cfg.num_warps} s{cfg.num_stages} d{cfg.dpp}{' T' if cfg.trans else ''}"
                try:
                    run = cuda_maxsim._prepare(q, q_offsets, codes, offsets, config=cfg)
                    run()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    est = time.perf_counter() - t0
                    add(("*" if cfg == config else " ") + name, cuda_time(run, iters=iters_for(est, 0.5, 3, 10)))
                except Exception as e:  # noqa: BLE001 (a blocking that does not fit: out of shared memory)
                    print(f"{n:>7}  {name:<25} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")

    print()
    print(header)
    print("\n".join(lines))
    print("\n".join(check_lines))
    print(f"total {time.time() - t_start:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(device=props.name, copy_bytes_per_s=bw, bf16_flops=peak,
                                                       docs=args.docs, tokens=tokens, dim=args.dim,
                                                       var_len=args.var_len, results=results), indent=1))


if __name__ == "__main__":
    main()
