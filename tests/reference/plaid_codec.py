"""PLAID's residual codec as ColBERT v2 / PLAID implement it (colbert/indexing/codecs/residual.py), the baseline
tokenpool's `residual` codec is measured against: nearest centroid + each residual dimension quantized to
`nbits` with cutoffs at the quantiles of all residual values (one set for every dimension), levels at the
quantiles' midpoints, decoded vectors renormalized. Same centroids as the caller's, so the comparison isolates
the residual quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plaid_roundtrip(vectors: torch.Tensor, centroids: torch.Tensor, nbits: int, seed: int = 0) -> torch.Tensor:
    """`vectors` `[n, dim]` float32 encoded and decoded by PLAID's codec with `centroids` `[K, dim]`."""
    cids = (vectors @ centroids.T).argmax(1)
    residuals = vectors - centroids[cids]
    g = torch.Generator().manual_seed(seed)
    flat = residuals.flatten()
    sample = flat[torch.randperm(len(flat), generator=g)[:1 << 20]]
    n = 1 << nbits
    cutoffs = torch.quantile(sample, torch.arange(1, n, dtype=torch.float32) / n)
    weights = torch.quantile(sample, (torch.arange(n, dtype=torch.float32) + 0.5) / n)
    return F.normalize(centroids[cids] + weights[torch.bucketize(residuals, cutoffs)], dim=1)
