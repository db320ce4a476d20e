"""BGE-M3 (tiny random checkpoint in the real folder layout) against FlagEmbedding's algorithm."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference.bge_m3_reference import bge_m3_reference, colbert_score
from tests.settings import ATOL, COS_MIN, DEVICE, DTYPE
from tests.toolkit import assert_batch_invariant, run_mixed
from tokenpool import LLM
from tokenpool.scoring import colbert_score as our_colbert_score

TEXTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
    "the the the cat cat sat on the mat with the other cat",
    "Une phrase en français avec des mots répétés, des mots et encore des mots",
]


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def llm(request, tiny_bge_m3, tiny_bge_m3_bin):
    path = tiny_bge_m3 if request.param == "safetensors" else tiny_bge_m3_bin
    return LLM(str(path), dtype=DTYPE, device=DEVICE)


@pytest.fixture(scope="module")
def reference(tiny_bge_m3):
    return bge_m3_reference(tiny_bge_m3, TEXTS)


def test_heads_detected_from_folder(llm):
    assert set(llm.supported_tasks) == {"embed", "token_embed", "token_classify", "all"}


def test_dense(llm, reference):
    outs = llm.embed(TEXTS, use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert out.prompt_token_ids == ref["input_ids"]
        ours = torch.tensor(out.outputs.embedding)
        assert F.cosine_similarity(ours, torch.from_numpy(ref["dense"]).float(), dim=0).item() >= COS_MIN


def test_colbert_vectors_drop_first_token(llm, reference):
    outs = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    for out, ref in zip(outs, reference):
        colbert = torch.from_numpy(ref["colbert"]).float()
        assert out.outputs.data.shape == (len(ref["input_ids"]) - 1, colbert.shape[1])
        assert F.cosine_similarity(out.outputs.data, colbert, dim=1).min().item() >= COS_MIN


def test_sparse_weights_per_token_and_by_token_id(llm, reference):
    outs = llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    nonzero = 0
    for out, ref in zip(outs, reference):
        per_token = torch.from_numpy(ref["sparse_per_token"]).float()
        # vLLM's token_classify drops the first (CLS) and last (EOS) token.
        assert out.outputs.data.shape == (len(ref["input_ids"]) - 2,)
        assert torch.allclose(out.outputs.data, per_token[1:-1], atol=ATOL, rtol=1e-2 if DTYPE != "float32" else 1e-5)
        expected = {int(k): v for k, v in ref["lexical_weights"].items()}
        got = out.outputs.lexical_weights
        if DTYPE == "float32":
            assert got.keys() == expected.keys()
        for token_id in got.keys() & expected.keys():
            assert got[token_id] == pytest.approx(expected[token_id], abs=ATOL, rel=1e-2 if DTYPE != "float32" else 1e-5)
        nonzero += len(expected)
    assert nonzero > 10  # the fixture's sparse head is not all-zero


def test_colbert_score_matches_flagembedding(llm, reference):
    outs = llm.encode(TEXTS[:3], pooling_task="token_embed", use_tqdm=False)
    q, p = outs[0].outputs.data, outs[1].outputs.data
    expected = colbert_score(reference[0]["colbert"], reference[1]["colbert"])
    assert our_colbert_score(q, p) == pytest.approx(float(expected), abs=1e-2 if DTYPE != "float32" else 1e-5)


def test_one_model_all_tasks_one_batch(llm):
    """Requests of all three tasks, queued together, share batches and equal the single-task runs."""
    ids = llm.llm_engine.processor(TEXTS)
    tasks = ["embed", "token_embed", "token_classify"]
    results = run_mixed(llm.llm_engine, [(f"mix-{i}", tokens, tasks[i % 3]) for i, tokens in enumerate(ids)])
    for i, text in enumerate(TEXTS):
        alone = llm.encode([text], pooling_task=tasks[i % 3], use_tqdm=False)[0]
        assert_batch_invariant(alone.outputs.data, results[f"mix-{i}"])
    assert np.isfinite(np.concatenate([r.numpy().ravel() for r in results.values()])).all()


def test_all_task_is_one_forward_pass_with_three_outputs(llm):
    """task "all": dense + colbert + sparse (+ lexical weights) for each prompt from one forward pass."""
    calls = []
    backbone_forward = llm.llm_engine.model.backbone.forward

    def counting_forward(*args):
        calls.append(1)
        return backbone_forward(*args)

    llm.llm_engine.model.backbone.forward = counting_forward
    try:
        combined = llm.encode(TEXTS, pooling_task="all", use_tqdm=False)
    finally:
        llm.llm_engine.model.backbone.forward = backbone_forward
    assert len(calls) == 1
    for task in ("embed", "token_embed", "token_classify"):
        alone = llm.encode(TEXTS, pooling_task=task, use_tqdm=False)
        for c, a in zip(combined, alone):
            assert_batch_invariant(a.outputs.data, c.outputs.data[task])
            if task == "token_classify":
                assert c.outputs.lexical_weights.keys() == a.outputs.lexical_weights.keys()
