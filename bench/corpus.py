"""Deterministic synthetic corpora for benchmarks: passages as token-id lists drawn from a model's vocabulary.

Every system under test gets exactly the same token ids (no tokenizer differences, no tokenization cost).
Lengths count the special tokens: a passage of length n is `[CLS] + (n - 2) vocabulary tokens + [SEP]`.
"""

from __future__ import annotations

import itertools
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


def vocabulary_words(tokenizer) -> list[str]:
    """Whole lower-case ASCII words of the vocabulary (each one token alone), in vocabulary order: for BERT
    vocabularies roughly by frequency ("the", "of", "and", ...)."""
    vocab = tokenizer.get_vocab()
    words = sorted((i, tok) for tok, i in vocab.items()
                   if tok.isascii() and tok.isalpha() and tok.islower() and len(tok) >= 2)
    return [tok for _, tok in words]


def _passage_text(rng: random.Random, words: list[str], cum_weights: list[float], k: int) -> str:
    """Natural-looking text of `k` pieces (words and punctuation marks, one token each under a BERT
    tokenizer): sentences of 6..24 words, capitalized, commas now and then, ending with a full stop."""
    out: list[str] = []
    pieces, sentence_len = 0, 0
    target_len = rng.randint(6, 24)
    while pieces < k:
        left = k - pieces
        if left == 1 or sentence_len >= target_len:  # end the sentence (always end the passage with ".")
            if out:
                out[-1] += "."
                pieces, sentence_len, target_len = pieces + 1, 0, rng.randint(6, 24)
                continue
        if sentence_len >= 3 and left > 2 and out[-1][-1].isalpha() and rng.random() < 0.08:
            out[-1] += ","
            pieces += 1
            continue
        word = rng.choices(words, cum_weights=cum_weights)[0]
        out.append(word.capitalize() if sentence_len == 0 else word)
        pieces, sentence_len = pieces + 1, sentence_len + 1
    return " ".join(out)


def make_text_corpus(tokenizer, spec: CorpusSpec = CorpusSpec()) -> tuple[list[str], list[list[int]]]:
    """Raw-text passages and their token ids under `tokenizer` (special tokens included).

    Passage i has exactly as many tokens as passage i of `make_corpus(tokenizer, spec)` (the same length
    distribution), made of real vocabulary words drawn with Zipf-like frequencies (1 / (rank + 10)) and
    punctuation. The counts are what the tokenizer gives: a passage whose count came out different (a
    tokenizer that splits the words) is trimmed or extended word by word until it matches, within 8 tries.
    """
    lengths = [len(p) for p in make_corpus(tokenizer, spec)]
    words = vocabulary_words(tokenizer)
    if not words:
        raise ValueError("The tokenizer's vocabulary has no whole lower-case words to build text from.")
    cum_weights = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(words))))
    rng = random.Random(spec.seed + 1)
    texts = [_passage_text(rng, words, cum_weights, n - 2) for n in lengths]
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    for i, n in enumerate(lengths):
        k = n - 2
        for _ in range(8):
            if len(ids[i]) == n:
                break
            k += n - len(ids[i])
            texts[i] = _passage_text(random.Random(spec.seed * 1_000_003 + i), words, cum_weights, max(k, 1))
            ids[i] = list(tokenizer(texts[i], add_special_tokens=True)["input_ids"])
    return texts, ids
