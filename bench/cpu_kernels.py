"""CPU kernel variants, timed on this machine: what each CPU class's path is chosen from.

    python bench/cpu_kernels.py                      # MiniLM shapes (hidden 384, 12 heads of 32), 2 threads
    python bench/cpu_kernels.py --shape bge-m3       # XLM-R large shapes (hidden 1024, 16 heads of 64)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/cpu_kernels.py

Prints, per dtype the class runs natively (fp32 always; bf16 on AVX512-BF16 / AMX):
- GEMM rate of the layer's four GEMMs at a 4k-token batch: `F.linear` vs oneDNN with the weight pre-packed,
  and the cost of a batch whose row count oneDNN has not seen yet (a new kernel per shape) vs rows rounded
  up to a bucket.
- Attention over a packed batch of sequences of 16..256 tokens: per sequence fp32-scores `bmm` (the old
  CPU path), `scaled_dot_product_attention`, PyTorch's flash-attention CPU kernel, and our C kernel (all
  sequences in one call); time per token and the worst cosine to an fp64 reference.
- With `--e2e MODEL`: tokenpool's token_embed end to end with each attention kernel.
"""

from __future__ import annotations

import argparse
import os
import itertools
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenpool.kernels import buildable_variants  # noqa: E402
from tokenpool.kernels import varlen_attention as fused_attention  # noqa: E402
from tokenpool.platforms.cpu import ATTENTION_ENV, cpu_info  # noqa: E402

SHAPES = {"minilm": (384, 12, 1536), "bge-m3": (1024, 16, 4096)}


def timed(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_table(hidden: int, inter: int, dtype: torch.dtype, rows: int, repeat: int) -> None:
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, inter), (inter, hidden)]
    flops = sum(2 * rows * k * n for k, n in shapes)
    ws = [(torch.randn(n, k).div(k ** 0.5).to(dtype), torch.randn(n).to(dtype)) for k, n in shapes]
    xs = [torch.randn(rows + 256, k).to(dtype) for k, _ in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w, _ in ws]

    def run_flinear(m=rows):
        for x, (w, b) in zip(xs, ws):
            F.linear(x[:m], w, b)

    def run_onednn(m=rows):
        for x, p, (_, b) in zip(xs, packed, ws):
            torch.ops.mkldnn._linear_pointwise(x[:m], p, b, "none", [], "")

    rng = random.Random(0)
    fresh = iter(rng.sample(range(rows - 255, rows), 255))

    def run_onednn_new_rows():  # a row count not seen before: oneDNN builds (JITs) a kernel first
        run_onednn(next(fresh))

    bucket = 64
    fresh_b = iter(rng.sample(range(rows - 255, rows), 255))

    def run_onednn_bucketed():  # the same new row counts, rounded up to a multiple of `bucket`
        m = next(fresh_b)
        run_onednn(-(-m // bucket) * bucket)

    name = str(dtype).removeprefix("torch.")
    print(f"\n### GEMMs, {name}, {rows} rows x the layer's 4 shapes ({flops / 1e9:.1f} GFLOP)\n")
    print("| variant | ms | GFLOP/s |")
    print("|---|---:|---:|")
    for label, fn in [("F.linear", run_flinear), ("oneDNN, pre-packed weight", run_onednn),
                      ("oneDNN, a new row count each call", run_onednn_new_rows),
                      (f"oneDNN, new row counts rounded up to {bucket}", run_onednn_bucketed)]:
        t = timed(fn, repeat if "new" not in label else min(repeat, 20))
        print(f"| {label} | {t * 1e3:.2f} | {flops / t / 1e9:.0f} |")


def attention_table(hidden: int, heads: int, dtype: torch.dtype, tokens: int, repeat: int) -> None:
    head_dim = hidden // heads
    rng = random.Random(0)
    lens = []
    while sum(lens) < tokens:
        lens.append(rng.randint(16, 256))
    total = sum(lens)
    q, k, v = (torch.randn(total, heads, head_dim).to(dtype) for _ in range(3))
    scale = head_dim ** -0.5

    def spans():
        start = 0
        for n in lens:
            yield start, start + n
            start += n

    def bmm():
        out = torch.empty_like(q)
        heads_view = out.transpose(0, 1)
        for s, e in spans():
            qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))
            scores = torch.bmm(qs, ks.transpose(1, 2)).mul_(scale)
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            heads_view[:, s:e].copy_(torch.bmm(scores, vs))
        return out

    def sdpa():
        out = torch.empty_like(q)
        for s, e in spans():
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
        return out

    def flash():
        out = torch.empty_like(q)
        for s, e in spans():
            qs, ks, vs = (t[s:e].unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # [1, H, L, D] views
            out[s:e] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs)[0][0].transpose(0, 1)
        return out

    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)

    def fused(variant):
        return lambda: fused_attention.varlen_attention(q, k, v, cu, (-1, -1), variant)

    qf, kf, vf = q.float(), k.float(), v.float()
    reference = torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1).double() for t in (qf, kf, vf)))
                           .transpose(0, 1).float() for s, e in spans()])
    name = str(dtype).removeprefix("torch.")
    print(f"\n### attention, {name}, {len(lens)} sequences of 16..256 tokens ({total} tokens), {heads} heads of {head_dim}\n")
    print("| variant | us/token | min cos vs fp64 |")
    print("|---|---:|---:|")
    variants = [("bmm, fp32 scores", bmm), ("scaled_dot_product_attention", sdpa), ("flash kernel", flash)]
    for variant in buildable_variants()[:-1]:  # the generic build is for CPUs without AVX2
        if fused_attention.available(variant) and fused_attention.supports(q, k, v, variant):
            variants.append((f"fused C kernel ({variant} build)", fused(variant)))
    for label, fn in variants:
        t = timed(fn, repeat)
        out = fn().float().reshape(total, -1)
        cos = F.cosine_similarity(out, reference.reshape(total, -1), dim=1).min().item()
        print(f"| {label} | {t / total * 1e6:.2f} | {cos:.6f} |")


def e2e_table(model: str, dtype: torch.dtype, passages: int, repeat: int) -> None:
    """tokenpool's token_embed over `passages` passages, once per attention kernel (same engine)."""
    from corpus import CorpusSpec, make_corpus
    from transformers import AutoTokenizer

    from tokenpool import LLM, TokensPrompt

    llm = LLM(model, dtype=str(dtype).removeprefix("torch."), device="cpu")
    ids = make_corpus(AutoTokenizer.from_pretrained(llm.llm_engine.model_dir), CorpusSpec(num_passages=passages))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    tokens = sum(map(len, ids))
    name = str(dtype).removeprefix("torch.")
    print(f"\n### tokenpool end to end, {name}, {passages} passages ({tokens} tokens)\n")
    print("| attention | tokens/s |")
    print("|---|---:|")
    for kernel in ("fused", "flash", "bmm"):
        os.environ[ATTENTION_ENV] = kernel
        t = timed(lambda: llm.encode(prompts, pooling_task="token_embed", use_tqdm=False), repeat)
        print(f"| {kernel} | {tokens / t:,.0f} |")
    os.environ.pop(ATTENTION_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--dtypes", default="auto", help="comma list (float32,bfloat16); auto: fp32 + native bf16")
    parser.add_argument("--skip-gemm", action="store_true", help="leave out the GEMM tables")
    parser.add_argument("--e2e", metavar="MODEL", default=None,
                        help="also time tokenpool end to end on this model folder, per attention kernel")
    parser.add_argument("--passages", type=int, default=500, help="passages of the --e2e corpus")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    hidden, heads, inter = SHAPES[args.shape]
    print(f"## CPU kernels: {info.describe()}; torch {torch.__version__}, {args.threads} threads, shape {args.shape}")
    if args.dtypes == "auto":
        dtypes = [torch.float32] + ([torch.bfloat16] if info.native_bf16 else [])
    else:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    for dtype in dtypes:
        if not args.skip_gemm:
            gemm_table(hidden, inter, dtype, args.rows, args.repeat)
        attention_table(hidden, heads, dtype, args.rows, args.repeat)
    for dtype in dtypes if args.e2e else []:
        e2e_table(args.e2e, dtype, args.passages, max(1, args.repeat // 3))


if __name__ == "__main__":
    main()
