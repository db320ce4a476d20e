"""Reference BGE-M3 outputs (dense / sparse / ColBERT) for parity tests, fp32 on CPU.

Two implementations of the same thing:

* :func:`bge_m3_reference_manual` — always available: ``transformers.AutoModel``
  plus the two heads from ``colbert_linear.pt`` / ``sparse_linear.pt``, written
  line by line after FlagEmbedding 1.4.2's source (functions cited inline).
* :func:`bge_m3_reference_flagembedding` — FlagEmbedding's own ``BGEM3FlagModel``,
  when that package can be imported.

:func:`bge_m3_reference` uses FlagEmbedding when it is importable and the manual
one otherwise, so there is always a reference; ``tests/test_reference_selfcheck.py``
checks that the two agree.

Each text gives a dict::

    input_ids         list[int]                n tokens, <s> ... </s>, truncated to max_length
    dense             np.ndarray [H]           L2-normalized CLS hidden state
    colbert           np.ndarray [n-1, H]      colbert_linear(h[1:]), L2-normalized per row
    sparse_per_token  np.ndarray [n]           relu(sparse_linear(h)) for every token (CLS/EOS included)
    lexical_weights   dict[str, float]         str(token_id) -> max weight; no cls/eos/pad/unk, only > 0
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib
import sys
import types
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PathLike = str | os.PathLike[str]
Reference = dict[str, Any]


# --------------------------------------------------------------------------
# Hand-built reference (transformers + the two heads)
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_manual(model_dir: str) -> tuple[Any, torch.nn.Module, torch.nn.Linear, torch.nn.Linear]:
    """(tokenizer, encoder, colbert_linear, sparse_linear) in fp32, eval mode.

    Follows ``EncoderOnlyEmbedderM3Runner.get_model``
    (FlagEmbedding/finetune/embedder/encoder_only/m3/runner.py): AutoModel, then
    Linear(H, H) and Linear(H, 1) loaded from the .pt state dicts.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden = model.config.hidden_size
    colbert = torch.nn.Linear(hidden, hidden)
    colbert.load_state_dict(torch.load(pathlib.Path(model_dir) / "colbert_linear.pt", map_location="cpu", weights_only=True))
    sparse = torch.nn.Linear(hidden, 1)
    sparse.load_state_dict(torch.load(pathlib.Path(model_dir) / "sparse_linear.pt", map_location="cpu", weights_only=True))
    return tokenizer, model, colbert.eval(), sparse.eval()


def _unused_token_ids(tokenizer: Any) -> set[int]:
    """cls/eos/pad/unk ids, looked up as in M3Embedder.encode_single_device._process_token_weights."""
    unused: set[int] = set()
    for name in ("cls_token", "eos_token", "pad_token", "unk_token"):
        if name in tokenizer.special_tokens_map:
            unused.add(tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name]))
    return unused


def lexical_weights_from_tokens(token_weights: np.ndarray, input_ids: list[int], unused: set[int]) -> dict[str, float]:
    """FlagEmbedding's ``_process_token_weights`` (inference/embedder/encoder_only/m3.py).

    Drop unused ids, keep weight > 0, max over repeated ids; keys are str(token_id).
    """
    result: dict[str, float] = defaultdict(int)
    for w, idx in zip(token_weights, input_ids):
        if idx not in unused and w > 0:
            key = str(idx)
            if w > result[key]:
                result[key] = float(w)
    return dict(result)


@torch.no_grad()
def bge_m3_reference_manual(model_dir: PathLike, texts: list[str], max_length: int = 128) -> list[Reference]:
    """BGE-M3 outputs from transformers + the .pt heads, one unpadded forward per text.

    Mirrors, for fp32/CPU and ``normalize_embeddings=True``:
      * tokenization: ``M3Embedder.encode_single_device`` (truncation=True, max_length);
      * ``EncoderOnlyEmbedderM3ModelForInference.forward`` with
        ``_dense_embedding`` ("cls": h[:, 0]), ``_sparse_embedding``
        (relu(sparse_linear(h)), return_embedding=False) and ``_colbert_embedding``
        (colbert_linear(h[:, 1:]) * mask[:, 1:]), then F.normalize on dense and colbert;
      * ``_process_colbert_vecs`` (keep tokens_num - 1 rows) and ``_process_token_weights``.
    FlagEmbedding pads a length-sorted batch instead; valid-token results agree to ~1e-7.
    """
    tokenizer, model, colbert_linear, sparse_linear = _load_manual(str(model_dir))
    unused = _unused_token_ids(tokenizer)
    out: list[Reference] = []
    for text in texts:
        input_ids: list[int] = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        ids = torch.tensor([input_ids])  # [1, n]
        mask = torch.ones_like(ids)  # [1, n]
        h = model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state  # [1, n, H]
        dense = F.normalize(h[:, 0], dim=-1)  # [1, H]
        sparse = torch.relu(sparse_linear(h)).squeeze(-1)  # [1, n]
        colbert = colbert_linear(h[:, 1:]) * mask[:, 1:][:, :, None].float()  # [1, n-1, H]
        colbert = F.normalize(colbert, dim=-1)
        token_weights = sparse[0].numpy()
        out.append(
            {
                "input_ids": list(input_ids),
                "dense": dense[0].numpy(),
                "colbert": colbert[0, : len(input_ids) - 1].numpy(),
                "sparse_per_token": token_weights,
                "lexical_weights": lexical_weights_from_tokens(token_weights, input_ids, unused),
            }
        )
    return out


# --------------------------------------------------------------------------
# FlagEmbedding's own BGEM3FlagModel
# --------------------------------------------------------------------------


def _import_m3_bypassing_package_init() -> type:
    """Import M3Embedder (= BGEM3FlagModel) without running FlagEmbedding/__init__.py.

    FlagEmbedding 1.4.2's package __init__ imports every reranker; its MiniCPM/Gemma
    rerankers import ``transformers.modeling_attn_mask_utils``, which transformers 5
    removed, so ``from FlagEmbedding import BGEM3FlagModel`` fails although the M3
    code itself works. Placeholder package modules (with the real ``__path__``) for
    ``FlagEmbedding`` and ``FlagEmbedding.inference`` let the M3 module load alone.
    """
    spec = importlib.util.find_spec("FlagEmbedding")
    assert spec is not None and spec.submodule_search_locations
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    for name in ("FlagEmbedding", "FlagEmbedding.inference"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    module = importlib.import_module("FlagEmbedding.inference.embedder.encoder_only.m3")
    return module.M3Embedder


@functools.lru_cache(maxsize=1)
def load_bge_m3_flag_model() -> tuple[type | None, str]:
    """(BGEM3FlagModel class or None, a sentence saying how it was imported or why not)."""
    if importlib.util.find_spec("FlagEmbedding") is None:
        return None, "FlagEmbedding is not installed"
    try:
        from FlagEmbedding import BGEM3FlagModel

        return BGEM3FlagModel, "from FlagEmbedding import BGEM3FlagModel"
    except Exception as exc:  # noqa: BLE001 - any import-time breakage: try the narrow import
        first_error = f"{type(exc).__name__}: {exc}"
    try:
        return _import_m3_bypassing_package_init(), f"M3 module imported directly ({first_error})"
    except Exception as exc:  # noqa: BLE001
        return None, f"FlagEmbedding is installed but does not import: {first_error}; {type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=4)
def _load_flag_model(model_dir: str, max_length: int) -> Any:
    cls, reason = load_bge_m3_flag_model()
    if cls is None:
        raise ImportError(reason)
    return cls(model_dir, use_fp16=False, devices="cpu", passage_max_length=max_length, query_max_length=max_length)


@torch.no_grad()
def bge_m3_reference_flagembedding(model_dir: PathLike, texts: list[str], max_length: int = 128) -> list[Reference]:
    """The same dicts, from ``BGEM3FlagModel.encode(return_dense, return_sparse, return_colbert_vecs)``.

    ``encode`` gives neither input ids nor per-token sparse weights: those come from
    the model's tokenizer and from its inner ``EncoderOnlyEmbedderM3ModelForInference``
    (``return_sparse=True, return_sparse_embedding=False`` -> relu(sparse_linear(h))).
    Raises ImportError when FlagEmbedding cannot be imported.
    """
    flag = _load_flag_model(str(model_dir), max_length)
    enc = flag.encode(
        texts, max_length=max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    out: list[Reference] = []
    for i, text in enumerate(texts):
        inputs = flag.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        per_token = flag.model(inputs, return_dense=False, return_sparse=True)["sparse_vecs"]  # [1, n, 1]
        out.append(
            {
                "input_ids": inputs["input_ids"][0].tolist(),
                "dense": np.asarray(enc["dense_vecs"][i]),
                "colbert": np.asarray(enc["colbert_vecs"][i]),
                "sparse_per_token": per_token[0, :, 0].numpy(),
                "lexical_weights": {k: float(v) for k, v in enc["lexical_weights"][i].items()},
            }
        )
    return out


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def bge_m3_reference(model_dir: PathLike, texts: list[str], max_length: int = 128) -> list[Reference]:
    """Reference outputs for ``texts``: FlagEmbedding when importable, else the manual build."""
    if load_bge_m3_flag_model()[0] is not None:
        return bge_m3_reference_flagembedding(model_dir, texts, max_length)
    return bge_m3_reference_manual(model_dir, texts, max_length)


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """Late-interaction score, as ``M3Embedder.colbert_score`` computes it.

    q: [nq, H], p: [np, H] (normalized ColBERT rows) -> sum_i max_j <q_i, p_j> / nq.
    """
    q_reps, p_reps = torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(p))
    token_scores = torch.einsum("in,jn->ij", q_reps, p_reps)  # [nq, np]
    scores, _ = token_scores.max(-1)  # [nq]
    return float(torch.sum(scores) / q_reps.size(0))
