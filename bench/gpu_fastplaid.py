"""FastPlaid (lightonai/fast-plaid, PLAID in Rust + CUDA) against tokenpool's fused exact MaxSim and its residual
codec (`--tp-nbits`, built and searched on the GPU), one GPU, the same corpus in the same run.

    pip install fast-plaid==1.7.0.2110   # built for torch 2.11, as on the GPU machine
    python bench/gpu_fastplaid.py [--docs 200000] [--tokens 100] [--dim 128] [--queries 1000]

Corpus: unit token vectors around `--topics` random directions (each document draws 8 topics; a token is its
topic plus noise of norm `--noise`), float16; queries: 32 noisy tokens of a random document each (a known relevant document).
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


def corpus(docs: int, tokens: int, dim: int, topics: int, noise: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(topics, dim, device="cuda", generator=g), dim=1)
    doc_topics = torch.randint(0, topics, (docs, 8), device="cuda", generator=g)
    pick = torch.randint(0, 8, (docs, tokens), device="cuda", generator=g)
    flat = centers[doc_topics.gather(1, pick)].view(-1, dim)
    flat = torch.nn.functional.normalize(flat + noise * torch.randn(flat.shape, device="cuda", generator=g) / dim ** 0.5,
                                         dim=1)
    return flat.half()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--topics", type=int, default=4096)
    p.add_argument("--noise", type=float, default=1.8, help="norm of a token's noise (its topic has norm 1)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--profile", action="store_true", help="profile 20 single tokenpool residual queries")
    p.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    p.add_argument("--nbits", type=int, default=4, help="FastPlaid's nbits")
    p.add_argument("--tp-nbits", default="2,4", help="tokenpool residual codec nbits to build (comma-separated)")
    p.add_argument("--tp-paths", default="dense",
                   help="tokenpool's candidate stages on the GPU: dense (fixed shapes, one host sync, a one-query "
                        "search replayed as a CUDA graph; the default path) and/or pairs (the pair lists, a sync per "
                        "stage; the path of queries over 128 rows), comma-separated")
    p.add_argument("--tp-candidates", default="", help="also time tokenpool with these `candidates` (comma-separated)")
    p.add_argument("--tp-segments", default="1",
                   help="tokenpool residual indexes built in this many equal adds, merging off (one segment each; "
                        "comma-separated: e.g. 1,8 shows what a search pays for an index left in segments)")
    args = p.parse_args()
    from tokenpool.index.cuda_maxsim import maxsim_cuda

    torch.manual_seed(0)
    flat = corpus(args.docs, args.tokens, args.dim, args.topics, args.noise)
    offsets = torch.arange(args.docs + 1, device="cuda", dtype=torch.int64) * args.tokens
    src = torch.randint(0, args.docs, (args.queries,), device="cuda")
    rows = src[:, None] * args.tokens + torch.randint(0, args.tokens, (args.queries, 32), device="cuda")
    queries = torch.nn.functional.normalize(flat[rows].float() + 0.1 * torch.randn(args.queries, 32, args.dim,
                                                                                     device="cuda") / args.dim ** 0.5,
                                            dim=2)
    print(f"noise {args.noise}: {args.docs:,} docs x {args.tokens} tokens x {args.dim} dims ({flat.numel() * 2 / 1e9:.1f} GB fp16), "
          f"{args.queries} queries of 32 rows; {torch.cuda.get_device_name()}, torch {torch.__version__}")

    # tokenpool: exact, fused, 32 queries per launch
    q_off = torch.arange(33, dtype=torch.int64) * 32

    def ours(batch: torch.Tensor) -> torch.Tensor:
        n = len(batch)
        scores = maxsim_cuda(batch.reshape(-1, args.dim), q_off[:n + 1], flat, offsets)
        return scores.topk(10, dim=1).indices

    ours(queries[:32])
    ours(queries[:1])  # the one-query blocking is compiled too, before the clock
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
    # tokenpool's residual codec: the index built on the GPU (k-means and encoding there), searched there
    from tokenpool.index import MultiVectorIndex, multivector

    dense_ok = multivector.dense_kernels_ok
    host = flat.cpu().float().numpy().reshape(args.docs, args.tokens, args.dim)
    q_host = [q.cpu().numpy() for q in queries]
    tp_rows = []
    for nbits, n_seg in [(int(b), int(n)) for b in args.tp_nbits.split(",") if b
                         for n in args.tp_segments.split(",") if n]:
        with tempfile.TemporaryDirectory() as tmp:
            index = MultiVectorIndex.create(Path(tmp) / "tp", args.dim, codec="residual", nbits=nbits, device="cuda")
            index.auto_compact = False
            torch.cuda.synchronize()
            t = time.perf_counter()
            cuts = [args.docs * i // n_seg for i in range(n_seg + 1)]
            for a, b in zip(cuts, cuts[1:]):  # the first add trains the codec on a sample of its own documents
                index.add(list(range(a, b)), list(host[a:b]))
            build_tp = time.perf_counter() - t
            stats = {**index.stats(), "segments": n_seg}
            for cand, path in [(c, pth) for c in [None] + [int(c) for c in args.tp_candidates.split(",") if c]
                               for pth in args.tp_paths.split(",")]:
                multivector.dense_kernels_ok = dense_ok if path == "dense" else (lambda *a: False)
                index.search(q_host[:8], k=10, candidates=cand)  # warm: copies to the GPU, kernels
                index.search(q_host[:1], k=10, candidates=cand)
                torch.cuda.synchronize()
                t = time.perf_counter()  # a shape's second search captures its CUDA graph (dense path)
                index.search(q_host[:1], k=10, candidates=cand)
                capture = time.perf_counter() - t
                torch.cuda.synchronize()
                t = time.perf_counter()
                hits = index.search(q_host, k=10, candidates=cand)
                torch.cuda.synchronize()
                batched = time.perf_counter() - t
                t = time.perf_counter()
                one_by_one = [index.search(q_host[i:i + 1], k=10, candidates=cand)[0] for i in range(args.single)]
                torch.cuda.synchronize()
                single = (time.perf_counter() - t) / args.single
                same = sum(a == b for a, b in zip(one_by_one, hits))  # one at a time (a graph's replays) = batched
                name = f"tokenpool residual nbits={nbits} segments={n_seg}"
                print(f"{name} {path}: one-query results equal the batched search's on {same}/{args.single} queries")
                print(f"{name} {path}: the second one-query search (graph capture on the dense path) "
                      f"{capture * 1000:.1f} ms; CUDA graphs held: "
                      f"{len(index._graphs.entries) if index._graphs else 0}")
                ids = [[d for d, _ in h] for h in hits]
                rec = sum(len(set(a) & set(b.tolist())) for a, b in zip(ids, exact)) / (10 * args.queries)
                if cand is None and path == args.tp_paths.split(",")[0]:  # the codec's own ceiling: every decoded document scored
                    scan = index.search(q_host[:100], k=10, exact=True)
                    print(f"{name}: recall@10 of exact=True vs fp16 exact (100 queries) "
                          f"{sum(len({d for d, _ in a} & set(b.tolist())) for a, b in zip(scan, exact)) / 1000:.3f}, "
                          f"default vs exact=True "
                          f"{sum(len({d for d, _ in a} & {d for d, _ in b}) for a, b in zip(hits, scan)) / 1000:.3f}")
                    if args.profile:
                        from torch.profiler import ProfilerActivity, profile

                        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                            for i in range(20):
                                index.search(q_host[i:i + 1], k=10)
                            torch.cuda.synchronize()
                        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
                        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14))
                first = sum(int(a[0] == s) for a, s in zip(ids, src.tolist())) / args.queries
                tp_rows.append((nbits, cand, path, build_tp, stats, batched, single, rec, first))
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
    for nbits, cand, path, build_tp, stats, batched, single, rec, first in tp_rows:
        print(f"| tokenpool residual nbits={nbits} ({stats['centroids']:,} centroids, {stats['segments']} segment(s), "
              f"candidates {cand or 'default'}, {path}) | {build_tp:.1f} | {stats['bytes_per_token']} | "
              f"{args.queries / batched:,.0f} | {single * 1000:.2f} | {rec:.3f} | {first:.3f} |")
    print(f"tokenpool exact / FastPlaid QPS: {fp_batched / ours_batched:.2f}x batched, "
          f"{fp_single / ours_single:.2f}x single")
    for nbits, cand, path, _, stats, batched, single, *_ in tp_rows:
        print(f"tokenpool residual nbits={nbits} segments={stats['segments']} candidates {cand or 'default'} {path} / "
              f"FastPlaid QPS: {fp_batched / batched:.2f}x batched, {fp_single / single:.2f}x single")


if __name__ == "__main__":
    main()
