"""`tokenpool serve` on a tiny PyLate ColBERT folder: `input_type` on /pooling and /tokenize, /score and
/rerank encoding queries and documents in their modes, all equal to the offline `LLM` on the same folder."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from tests.fixtures.colbert import QUERY_LENGTH, SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_tiny_colbert
from tests.server_fixtures import serve
from tokenpool import LLM, PoolingParams


@pytest.fixture(scope="module")
def folder(tmp_path_factory, minilm_path):
    return build_tiny_colbert(tmp_path_factory.mktemp("colbert") / "pylate", minilm_path, "pylate")


@pytest.fixture(scope="module")
def server(folder):
    with serve([str(folder), "--dtype", "float32"]) as s:
        yield s


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32")


def post(server, path, body):
    response = requests.post(server.url(path), json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def offline(llm, texts, input_type=None):
    params = PoolingParams(input_type=input_type)
    return [o.outputs.data for o in llm.encode(texts, params, pooling_task="token_embed", use_tqdm=False)]


@pytest.mark.parametrize("input_type", [None, "query", "document"])
def test_pooling_with_input_type_equals_offline(server, llm, input_type):
    body = {"input": SAMPLE_QUERIES, "task": "token_embed"}
    if input_type:
        body["input_type"] = input_type
    data = post(server, "/pooling", body)["data"]
    for item, expected in zip(data, offline(llm, SAMPLE_QUERIES, input_type)):
        assert torch.allclose(torch.tensor(item["data"]), expected, atol=1e-5)


def test_score_and_rerank_encode_queries_and_documents(server, llm):
    query = offline(llm, SAMPLE_QUERIES[:1], "query")[0]
    expected = [float((query @ d.T).max(dim=1).values.sum()) for d in offline(llm, SAMPLE_DOCUMENTS, "document")]
    scores = [d["score"] for d in post(server, "/score", {"text_1": SAMPLE_QUERIES[0], "text_2": SAMPLE_DOCUMENTS,
                                                           "task": "token_embed"})["data"]]
    assert np.allclose(scores, expected, rtol=1e-5)
    offline_scores = [s.outputs.score for s in llm.score(SAMPLE_QUERIES[0], SAMPLE_DOCUMENTS, pooling_task="token_embed")]
    assert np.allclose(scores, offline_scores, rtol=1e-5)
    results = post(server, "/rerank", {"query": SAMPLE_QUERIES[0], "documents": SAMPLE_DOCUMENTS})["results"]
    assert [r["index"] for r in results] == list(np.argsort(-np.array(expected), kind="stable"))


def test_tokenize_shows_the_ids_of_each_mode(server, folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    query = post(server, "/tokenize", {"prompt": "colbert", "input_type": "query"})["tokens"]
    document = post(server, "/tokenize", {"prompt": "colbert"})["tokens"]
    q_marker, d_marker = tok.convert_tokens_to_ids("[Q] "), tok.convert_tokens_to_ids("[D] ")
    text = tok("colbert", add_special_tokens=False)["input_ids"]
    assert document == [tok.cls_token_id, d_marker, *text, tok.sep_token_id]
    assert query == [tok.cls_token_id, q_marker, *text, tok.sep_token_id] + [tok.mask_token_id] * (
        QUERY_LENGTH - len(text) - 3)


def test_bad_input_type_is_a_400(server):
    response = requests.post(server.url("/pooling"), json={"input": "x", "input_type": "passage"}, timeout=60)
    assert response.status_code == 400 and "input_type" in response.text


def test_a_document_with_no_rows_left_is_answered_in_every_encoding(server):
    """A document of skiplist tokens only (a comma) keeps no rows in document mode: an empty matrix in every
    encoding, its shape [0, dim] where the encoding carries one (base64 and bytes asked a 500 before)."""
    for encoding in ("float", "base64"):
        answer = requests.post(server.url("/pooling"), json={"input": [[1010]], "encoding_format": encoding},
                               timeout=60)
        assert answer.status_code == 200, answer.text
        item = answer.json()["data"][0]
        assert item["data"] in ([], "") and (encoding == "float" or item["shape"][0] == 0)
