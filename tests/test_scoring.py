"""Scores: cosine and MaxSim against plain torch, batched MaxSim, and each distinct prompt encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenpool import LLM, TokensPrompt
from tokenpool.scoring import colbert_score, cosine, maxsim, maxsim_many, pair_inputs, score_pairs


def _maxsim_torch(q: torch.Tensor, d: torch.Tensor) -> float:
    return (q.double() @ d.double().T).max(dim=1).values.sum().item()


def test_cosine_and_maxsim_match_torch():
    torch.manual_seed(0)
    a, b = torch.randn(64), torch.randn(64)
    assert cosine(a, b) == pytest.approx(F.cosine_similarity(a.double(), b.double(), dim=0).item(), abs=1e-12)
    q = F.normalize(torch.randn(7, 32), dim=-1)
    docs = [F.normalize(torch.randn(n, 32), dim=-1) for n in (1, 5, 0, 40, 3)]
    expected = [_maxsim_torch(q, d) if len(d) else 0.0 for d in docs]
    assert maxsim_many(q, docs) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert [maxsim(q, d) for d in docs] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert maxsim(q[:0], docs[0]) == 0.0
    assert colbert_score(q, docs[3]) == pytest.approx(expected[3] / 7, rel=1e-6)
    assert maxsim(q.numpy(), np.asarray(docs[1])) == pytest.approx(expected[1], rel=1e-6)


def test_score_pairs_groups_by_query():
    torch.manual_seed(1)
    vectors = {k: torch.randn(n, 16) for k, n in zip("abcd", (3, 4, 5, 6))}
    pairs = [("a", "b"), ("a", "c"), ("d", "b"), ("a", "d")]
    assert score_pairs(pairs, vectors, "maxsim") == pytest.approx(
        [_maxsim_torch(vectors[x], vectors[y]) for x, y in pairs], rel=1e-6)
    with pytest.raises(ValueError, match="cosine or maxsim"):
        score_pairs(pairs, vectors, "dot")
    with pytest.raises(ValueError, match="1 x N"):
        pair_inputs([1, 2], [1, 2, 3])


def test_llm_score_encodes_each_distinct_prompt_once(minilm_path, monkeypatch):
    llm = LLM(str(minilm_path), dtype="float32", device="cpu")
    seen: list[int] = []
    original = llm.encode

    def counting_encode(prompts, *args, **kwargs):
        seen.append(len(prompts))
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(llm, "encode", counting_encode)
    query, docs = "what is late interaction?", ["one vector per token", "a pooled vector", "one vector per token"]
    scores = [o.outputs.score for o in llm.score(query, docs, pooling_task="token_embed", use_tqdm=False)]
    assert seen == [3]  # the query once, the repeated document once
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)
    # the same numbers as encoding every pair side separately
    mats = {t: o.outputs.data for t, o in zip([query, *docs], original([query, *docs], pooling_task="token_embed",
                                                                          use_tqdm=False))}
    assert scores == pytest.approx([_maxsim_torch(mats[query], mats[d]) for d in docs], rel=1e-5)
    # token prompts with the same ids are the same prompt too
    ids = llm.get_tokenizer()(query)["input_ids"]
    seen.clear()
    llm.score([TokensPrompt(prompt_token_ids=ids)] * 2, [TokensPrompt(prompt_token_ids=ids), "x"], use_tqdm=False)
    assert seen == [2]
