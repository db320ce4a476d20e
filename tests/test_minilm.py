"""all-MiniLM-L6-v2 (real weights) against sentence-transformers on the same folder."""

import pytest
import torch
import torch.nn.functional as F

from tests.settings import ATOL, COS_MIN, DEVICE, DTYPE
from tests.toolkit import assert_batch_invariant

REL = 1e-4 if DTYPE == "float32" else 2e-2
from tokenpool import LLM, PoolingParams, TokensPrompt

TEXTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
    "A much longer passage about retrieval: late interaction models keep one vector per token, "
    "and score a query against a document by summing, over query tokens, the best match in the document.",
    "x",
]


@pytest.fixture(scope="module")
def llm(minilm_path):
    return LLM(str(minilm_path), dtype=DTYPE, device=DEVICE)


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


def test_embed_matches_sentence_transformers(llm, st_model):
    ref = st_model.encode(TEXTS, convert_to_tensor=True).float()
    outs = llm.embed(TEXTS, use_tqdm=False)
    ours = torch.tensor([o.outputs.embedding for o in outs])
    assert ours.shape == (len(TEXTS), 384)
    cos = F.cosine_similarity(ours, ref, dim=1)
    assert cos.min().item() >= COS_MIN, cos
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def test_token_embed_matches_sentence_transformers(llm, st_model):
    ref = st_model.encode(TEXTS, output_value="token_embeddings")
    outs = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    tokenizer = st_model.tokenizer
    for text, r, o in zip(TEXTS, ref, outs):
        assert o.prompt_token_ids == tokenizer(text)["input_ids"]
        assert o.outputs.data.shape == r.shape
        cos = F.cosine_similarity(o.outputs.data, F.normalize(r.float(), dim=-1), dim=1)
        assert cos.min().item() >= COS_MIN
        assert torch.allclose(o.outputs.data.norm(dim=1), torch.ones(len(r)), atol=1e-4)


def test_token_embed_raw_hidden_states(llm, st_model):
    ref = st_model.encode(TEXTS[:2], output_value="token_embeddings")
    outs = llm.encode(TEXTS[:2], PoolingParams(use_activation=False), pooling_task="token_embed", use_tqdm=False)
    for r, o in zip(ref, outs):
        cos = F.cosine_similarity(o.outputs.data, r.float(), dim=1)
        assert cos.min().item() >= COS_MIN
        rel = (o.outputs.data - r.float()).norm() / r.float().norm()
        assert rel.item() < (1e-4 if DTYPE == "float32" else 2e-2)


def test_tokens_prompt_equals_text(llm):
    ids = llm.get_tokenizer()(TEXTS[1])["input_ids"]
    a = llm.encode([TEXTS[1]], pooling_task="token_embed", use_tqdm=False)[0]
    b = llm.encode([TokensPrompt(prompt_token_ids=ids)], pooling_task="token_embed", use_tqdm=False)[0]
    assert a.prompt_token_ids == b.prompt_token_ids == ids
    assert_batch_invariant(a.outputs.data, b.outputs.data)


def test_matryoshka_dimensions_and_normalize_alias(llm):
    full = llm.embed(TEXTS[:2], use_tqdm=False)
    cut = llm.embed(TEXTS[:2], PoolingParams(dimensions=128), use_tqdm=False)
    raw = llm.embed(TEXTS[:2], PoolingParams(normalize=False), use_tqdm=False)
    for f, c, r in zip(full, cut, raw):
        c_vec, r_vec = torch.tensor(c.outputs.embedding), torch.tensor(r.outputs.embedding)
        assert c_vec.shape == (128,) and abs(c_vec.norm().item() - 1) < 1e-5
        # Truncation happens before normalization: the cut vector is the normalized prefix of the raw one.
        assert torch.allclose(c_vec, F.normalize(r_vec[:128], dim=0), atol=1e-5)
        assert torch.allclose(torch.tensor(f.outputs.embedding), F.normalize(r_vec, dim=0), atol=1e-5)
        assert abs(r_vec.norm().item() - 1) > 1e-3  # mean pooling without Normalize is not unit length


def test_score_cosine_and_maxsim(llm):
    query, docs = "What is the capital of France?", ["Paris is the capital of France.", "Bananas are yellow."]
    cos = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    emb = llm.embed([query, *docs], use_tqdm=False)
    vecs = [torch.tensor(e.outputs.embedding) for e in emb]
    assert cos == pytest.approx([F.cosine_similarity(vecs[0], v, dim=0).item() for v in vecs[1:]], abs=ATOL)
    assert cos[0] > cos[1]
    maxsim = [o.outputs.score for o in llm.score(query, docs, pooling_task="token_embed", use_tqdm=False)]
    mats = [o.outputs.data for o in llm.encode([query, *docs], pooling_task="token_embed", use_tqdm=False)]
    expected = [(mats[0] @ m.T).max(dim=1).values.sum().item() for m in mats[1:]]
    assert maxsim == pytest.approx(expected, rel=REL)
    assert maxsim[0] > maxsim[1]


def test_cpu_bf16_mixed_precision_close_to_reference(minilm_path, st_model):
    """bf16 on the CPU (oneDNN GEMMs in bf16, fp32 residual stream): cosine >= 0.999 per token."""
    bf16 = LLM(str(minilm_path), dtype="bfloat16", device="cpu")
    ref = st_model.encode(TEXTS, output_value="token_embeddings")
    for r, o in zip(ref, bf16.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)):
        assert F.cosine_similarity(o.outputs.data, r.float(), dim=1).min().item() >= 0.999


def test_combined_task_of_a_model_with_two_heads(llm):
    """Any model with several heads offers "all": each head's output from one forward pass."""
    assert "all" in llm.supported_tasks
    combined = llm.encode(TEXTS, pooling_task="all", use_tqdm=False)
    embed = llm.encode(TEXTS, pooling_task="embed", use_tqdm=False)
    tokens = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    for c, e, t in zip(combined, embed, tokens):
        assert set(c.outputs.data) == {"embed", "token_embed"} and c.outputs.lexical_weights is None
        assert_batch_invariant(e.outputs.data, c.outputs.data["embed"])
        assert_batch_invariant(t.outputs.data, c.outputs.data["token_embed"])
