"""FastPlaid (lightonai/fast-plaid, PLAID in Rust + CUDA) against tokenpool's fused exact MaxSim, one GPU, the
same corpus in the same run.

    pip install fast-plaid==1.7.0.2110   # built for torch 2.11, as on the GPU machine
    python bench/gpu_fastplaid.py [--docs 200000] [--tokens 100] [--dim 128] [--queries 1000]

Corpus: unit token vectors around `--topics` random directions (each document draws 8 topics; a token is its
topic plus noise), float16; queries: 32 noisy tokens of a random document each (a known relevant document).
Reported per system: index build time, bytes per token, QPS with all queries in one call (FastPlaid batches
them itself; tokenpool scores 32 queries per kernel launch) and one query at a time, recall@10 against exact
MaxSim (tokenpool's scores are exact: its recall is 1 by construction, checked against an fp32 reference on a
sample), and how often the source document ranks first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus(docs: int, tokens: int, dim: int, topics: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(topics, dim, device="cuda", generator=g), dim=1)
    doc_topics = torch.randint(0, topics, (docs, 8), device="cuda", generator=g)
    pick = torch.randint(0, 8, (docs, tokens), device="cuda", generator=g)
    flat = centers[doc_topics.gather(1, pick)].view(-1, dim)
    flat = torch.nn.functional.normalize(flat + 0.6 * torch.randn(flat.shape, device="cuda", generator=g) / dim ** 0.5
                                         * 3, dim=1)
    return flat.half()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--topics", type=int, default=4096)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    p.add_argument("--nbits", type=int, default=4)
    args = p.parse_args()
    from tokenpool.index.cuda_maxsim import maxsim_cuda

    torch.manual_seed(0)
    flat = corpus(args.docs, args.tokens, args.dim, args.topics)
    offsets = torch.arange(args.docs + 1, device="cuda", dtype=torch.int64) * args.tokens
    src = torch.randint(0, args.docs, (args.queries,), device="cuda")
    rows = src[:, None] * args.tokens + torch.randint(0, args.tokens, (args.queries, 32), device="cuda")
    queries = torch.nn.functional.normalize(flat[rows].float() + 0.1 * torch.randn(args.queries, 32, args.dim,
                                                                                     device="cuda") / args.dim ** 0.5,
                                            dim=2)
    print(f"{args.docs:,} docs x {args.tokens} tokens x {args.dim} dims ({flat.numel() * 2 / 1e9:.1f} GB fp16), "
          f"{args.queries} queries of 32 rows; {torch.cuda.get_device_name()}, torch {torch.__version__}")

    # tokenpool: exact, fused, 32 queries per launch
    q_off = torch.arange(33, dtype=torch.int64) * 32

    def ours(batch: torch.Tensor) -> torch.Tensor:
        n = len(batch)
        scores = maxsim_cuda(batch.reshape(-1, args.dim), q_off[:n + 1], flat, offsets)
        return scores.topk(10, dim=1).indices

    ours(queries[:32])
    torch.cuda.synchronize()
    t = time.perf_counter()
    exact = torch.cat([ours(queries[i:i + 32]) for i in range(0, args.queries, 32)])
    torch.cuda.synchronize()
    ours_batched = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(args.single):
        ours(queries[i:i + 1])
    torch.cuda.synchronize()
    ours_single = (time.perf_counter() - t) / args.single
    # fp32 reference on a sample of queries: chunked products
    ref_ok = 0
    for i in range(8):
        s = torch.cat([(queries[i] @ flat[j:j + 4_000_000].float().T) for j in range(0, len(flat), 4_000_000)], 1)
        ref = s.view(32, args.docs, args.tokens).amax(2).sum(0).topk(10).indices
        ref_ok += int(set(ref.tolist()) == set(exact[i].tolist()))
    top1 = (exact[:, 0] == src).float().mean().item()

    # FastPlaid
    from fast_plaid import search as fp_search

    with tempfile.TemporaryDirectory() as tmp:
        index = fp_search.FastPlaid(index=str(Path(tmp) / "fp"), device="cuda")
        docs_list = list(flat.cpu().float().view(args.docs, args.tokens, args.dim).unbind(0))  # host: GPU room
        t = time.perf_counter()
        index.create(documents_embeddings=docs_list, nbits=args.nbits)
        build = time.perf_counter() - t
        del docs_list
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        index.search(queries_embeddings=queries[:32], top_k=10, show_progress=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        found = index.search(queries_embeddings=queries, top_k=10, show_progress=False)
        torch.cuda.synchronize()
        fp_batched = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.single):
            index.search(queries_embeddings=queries[i:i + 1], top_k=10, show_progress=False)
        torch.cuda.synchronize()
        fp_single = (time.perf_counter() - t) / args.single
    fp_ids = [[d for d, _ in hits] for hits in found]
    recall = sum(len(set(a) & set(b.tolist())) for a, b in zip(fp_ids, exact)) / (10 * args.queries)
    fp_top1 = sum(int(a[0] == s) for a, s in zip(fp_ids, src.tolist())) / args.queries
    tokens = args.docs * args.tokens
    print(f"tokenpool exact top-10 = fp32 reference top-10 on {ref_ok}/8 sampled queries")
    print("| system | build s | bytes per token | QPS, all queries per call | ms, one query | recall@10 vs exact | "
          "source doc first |")
    print("|---|---|---|---|---|---|---|")
    print(f"| tokenpool exact fp16, fused kernel | 0 (copy) | {args.dim * 2} | {args.queries / ours_batched:,.0f} | "
          f"{ours_single * 1000:.2f} | 1.000 | {top1:.3f} |")
    print(f"| FastPlaid nbits={args.nbits} (defaults: 8 probes, 4,096 full scores) | {build:.1f} | "
          f"{disk / tokens:.1f} (on disk) | {args.queries / fp_batched:,.0f} | {fp_single * 1000:.2f} | {recall:.3f} | "
          f"{fp_top1:.3f} |")
    print(f"tokenpool / FastPlaid QPS: {fp_batched / ours_batched:.2f}x batched, {fp_single / ours_single:.2f}x single")


if __name__ == "__main__":
    main()
