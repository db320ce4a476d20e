"""Scores between embeddings: cosine for pooled vectors, MaxSim (late interaction) for token matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two `[dim]` vectors."""
    return F.cosine_similarity(a.float(), b.float(), dim=0).item()


def maxsim(query: torch.Tensor, doc: torch.Tensor) -> float:
    """Late interaction: sum over query tokens of the best dot product with any document token.

    query `[m, dim]`, doc `[n, dim]` (rows already normalized for ColBERT-style models). This is vLLM's
    and PyLate's MaxSim score.
    """
    return (query.float() @ doc.float().T).max(dim=1).values.sum().item()


def colbert_score(query: torch.Tensor, doc: torch.Tensor) -> float:
    """BGE-M3's own colbert score (FlagEmbedding): MaxSim divided by the number of query tokens."""
    return maxsim(query, doc) / query.shape[0]


def pair_inputs(left: list, right: list) -> list[tuple]:
    """Score pairs from 1 x N, N x 1 or N x N (pairwise) inputs, as vLLM's score API pairs them."""
    if len(left) == 1 and len(right) > 1:
        left = left * len(right)
    elif len(right) == 1 and len(left) > 1:
        right = right * len(left)
    if len(left) != len(right):
        raise ValueError(f"Scoring needs 1 x N, N x 1 or N x N inputs; got {len(left)} and {len(right)}.")
    return list(zip(left, right))
