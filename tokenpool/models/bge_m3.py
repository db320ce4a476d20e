"""BGE-M3's heads (FlagEmbedding's `BGEM3FlagModel`), detected from `colbert_linear.pt` / `sparse_linear.pt`.

dense  = CLS hidden state, L2-normalized                         (`embed`)
colbert = colbert_linear(h) for every token but the first, L2-normalized per token  (`token_embed`)
sparse = relu(sparse_linear(h)) for every token but the first and last (`token_classify`), also keyed by
         token id with special tokens dropped and the max over repeated ids (FlagEmbedding's lexical weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenpool.layers.pooler import embed_pooler, token_pooler
from tokenpool.loader.weights import load_torch_file

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"


def has_bge_m3_heads(model_dir: Path) -> bool:
    return (model_dir / COLBERT_FILE).is_file() and (model_dir / SPARSE_FILE).is_file()


def _linear_from_file(path: Path) -> nn.Linear:
    state = load_torch_file(path)
    weight = state["weight"]  # [out, in]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    linear.load_state_dict(state)
    return linear


def build_bge_m3_poolers(model_dir: Path) -> dict[str, nn.Module]:
    colbert = _linear_from_file(model_dir / COLBERT_FILE)
    sparse = _linear_from_file(model_dir / SPARSE_FILE)
    if sparse.out_features != 1:
        raise ValueError(f"{model_dir / SPARSE_FILE}: expected a Linear(hidden, 1), got out_features={sparse.out_features}.")
    return {
        "embed": embed_pooler(["cls"], normalize=True),
        "token_embed": token_pooler("token_embed", colbert, "normalize", skip_first=1),
        "token_classify": token_pooler("token_classify", sparse, "relu", skip_first=1, skip_last=1, squeeze=True),
    }


def lexical_weights(token_ids: list[int], weights: torch.Tensor, skip_ids: frozenset[int]) -> dict[int, float]:
    """FlagEmbedding's `_process_token_weights`: max weight per token id, special ids and zeros dropped."""
    result: dict[int, float] = {}
    for token_id, weight in zip(token_ids, weights.tolist()):
        if token_id in skip_ids or weight <= 0:
            continue
        if weight > result.get(token_id, 0.0):
            result[token_id] = weight
    return result
