"""Deterministic synthetic corpora for benchmarks: passages as token-id lists drawn from a model's vocabulary.

Every system under test gets exactly the same token ids (no tokenizer differences, no tokenization cost).
Lengths count the special tokens: a passage of length n is `[CLS] + (n - 2) vocabulary tokens + [SEP]`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """What to generate: `num_passages` passages with lengths uniform in [min_len, max_len], from `seed`."""

    num_passages: int = 2000
    min_len: int = 16
    max_len: int = 256
    seed: int = 0


def regular_token_ids(tokenizer) -> list[int]:
    """The vocabulary's ordinary tokens: no special tokens, no BERT `[unused*]` placeholders."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    return sorted(i for tok, i in vocab.items()
                  if i not in special and not (tok.startswith("[") and tok.endswith("]")))


def make_corpus(tokenizer, spec: CorpusSpec = CorpusSpec()) -> list[list[int]]:
    """`spec.num_passages` token-id lists (with the tokenizer's CLS/SEP, or BOS/EOS, at the ends)."""
    if not 3 <= spec.min_len <= spec.max_len:
        raise ValueError(f"Need 3 <= min_len <= max_len, got {spec.min_len}..{spec.max_len}.")
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if first is None or last is None:
        raise ValueError("The tokenizer has neither CLS/SEP nor BOS/EOS tokens.")
    pool = regular_token_ids(tokenizer)
    rng = random.Random(spec.seed)
    passages = []
    for _ in range(spec.num_passages):
        n = rng.randint(spec.min_len, spec.max_len)
        passages.append([first, *rng.choices(pool, k=n - 2), last])
    return passages
