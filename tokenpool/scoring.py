"""Scores between embeddings, in one place for `LLM.score` and the server's /score and /rerank: cosine for
pooled vectors, MaxSim (late interaction) for token matrices, and the pairing rule of score inputs.

numpy, not torch: on the server's event loop thread a torch matmul would start an OpenMP worker team beside
the engine thread's (`tokenpool serve` caps numpy's BLAS at one thread).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_EPS = 1e-8  # as torch.nn.functional.cosine_similarity


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Cosine similarity of two `[dim]` vectors (accumulated in float64)."""
    x, y = _np(a).astype(np.float64), _np(b).astype(np.float64)
    return float(np.dot(x, y) / max(np.sqrt(np.dot(x, x) * np.dot(y, y)), _EPS))


def maxsim(query: torch.Tensor | np.ndarray, doc: torch.Tensor | np.ndarray) -> float:
    """Late interaction: the sum over query tokens of the best dot product with any document token.

    query `[m, dim]`, doc `[n, dim]` (rows already normalized for ColBERT-style models): vLLM's and PyLate's
    MaxSim. An empty query or document scores 0.
    """
    return maxsim_many(query, [doc])[0]


def maxsim_many(query: torch.Tensor | np.ndarray, docs: Sequence[torch.Tensor | np.ndarray]) -> list[float]:
    """MaxSim of one query against many documents with one matrix product: `query @ concat(docs).T`, then
    the maximum over each document's columns and the sum over the query's rows."""
    q = _np(query)
    mats = [_np(d) for d in docs]
    lengths = np.array([m.shape[0] for m in mats])
    scores = [0.0] * len(mats)
    keep = np.flatnonzero(lengths > 0)
    if q.shape[0] == 0 or len(keep) == 0:
        return scores
    flat = np.concatenate([mats[i] for i in keep]) if len(keep) > 1 else mats[keep[0]]
    sims = q @ flat.T  # [m, sum of n]
    starts = np.concatenate([[0], np.cumsum(lengths[keep])[:-1]])
    best = np.maximum.reduceat(sims, starts, axis=1)  # [m, documents]: each document's best match per row
    for i, total in zip(keep, best.sum(axis=0, dtype=np.float64)):
        scores[i] = float(total)
    return scores


def colbert_score(query: torch.Tensor | np.ndarray, doc: torch.Tensor | np.ndarray) -> float:
    """BGE-M3's own colbert score (FlagEmbedding): MaxSim divided by the number of query tokens."""
    return maxsim(query, doc) / _np(query).shape[0]


def pair_inputs(left: list, right: list) -> list[tuple]:
    """Score pairs from 1 x N, N x 1 or N x N (pairwise) inputs, as vLLM's score API pairs them."""
    if len(left) == 1 and len(right) > 1:
        left = left * len(right)
    elif len(right) == 1 and len(left) > 1:
        right = right * len(left)
    if len(left) != len(right):
        raise ValueError(f"Scoring needs 1 x N, N x 1 or N x N inputs; got {len(left)} and {len(right)}.")
    return list(zip(left, right))


def score_pairs(pairs: Sequence[tuple], vectors: dict, kind: str) -> list[float]:
    """The score of each (a, b) pair of keys into `vectors`: "cosine" or "maxsim"; MaxSim runs batched per
    distinct left side (a 1 x N query: one matrix product)."""
    if kind == "cosine":
        return [cosine(vectors[a], vectors[b]) for a, b in pairs]
    if kind != "maxsim":
        raise ValueError(f"Unknown score {kind!r}; use cosine or maxsim.")
    by_left: dict = {}
    for i, (a, b) in enumerate(pairs):
        by_left.setdefault(a, []).append((i, b))
    scores = [0.0] * len(pairs)
    for a, items in by_left.items():
        for (i, _), score in zip(items, maxsim_many(vectors[a], [vectors[b] for _, b in items])):
            scores[i] = score
    return scores
