"""Cosine and MaxSim in numpy, for the event loop thread (same functions as `tokenpool.scoring`).

(torch matmuls here would start an OpenMP worker team beside the engine thread's; see encoding.py.)
"""

from __future__ import annotations

import numpy as np
import torch

_EPS = 1e-8  # as torch.nn.functional.cosine_similarity


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two `[dim]` vectors."""
    x, y = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    return float(np.dot(x, y) / max(np.sqrt(np.dot(x, x) * np.dot(y, y)), _EPS))


def maxsim(query: torch.Tensor, doc: torch.Tensor) -> float:
    """Late interaction: the sum over query tokens of the best dot product with any document token."""
    q, d = query.numpy(), doc.numpy()
    if q.shape[0] == 0 or d.shape[0] == 0:
        return 0.0
    return float((q @ d.T).max(axis=1).sum(dtype=np.float64))
