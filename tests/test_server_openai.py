"""`tokenpool serve` with the default model (all-MiniLM-L6-v2, no MODEL given), driven by the `openai`
package and plain `requests`; numbers checked against the offline `LLM`."""

from __future__ import annotations

import pytest
import requests
import torch

from tests.server_fixtures import serve
from tokenpool import LLM

openai = pytest.importorskip("openai")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Token-level embeddings keep one vector per token.",
         "A third, somewhat longer sentence about late interaction retrieval and MaxSim scores."]
DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(minilm_path):
    with serve(["--dtype", "float32"]) as s:  # no MODEL: the built-in default
        yield s


@pytest.fixture(scope="module")
def llm(minilm_path):
    return LLM(str(minilm_path), dtype="float32")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def test_openai_embeddings_base64_default(client, llm):
    result = client.embeddings.create(model=DEFAULT_NAME, input=TEXTS)  # the client asks for base64
    refs = [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    assert [d.index for d in result.data] == [0, 1, 2]
    for item, ref in zip(result.data, refs):
        torch.testing.assert_close(torch.tensor(item.embedding), torch.tensor(ref), atol=1e-5, rtol=0)
    n = sum(len(ids) for ids in llm.llm_engine.processor(TEXTS))
    assert result.usage.prompt_tokens == n and result.usage.total_tokens == n
    assert result.model == DEFAULT_NAME


def test_openai_embeddings_float_single_and_dimensions(client, llm):
    one = client.embeddings.create(model=DEFAULT_NAME, input=TEXTS[0], encoding_format="float")
    ref = llm.embed([TEXTS[0]], use_tqdm=False)[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), torch.tensor(ref), atol=1e-5, rtol=0)
    small = client.embeddings.create(model=DEFAULT_NAME, input=TEXTS[0], dimensions=64)
    from tokenpool import PoolingParams

    ref = llm.embed([TEXTS[0]], PoolingParams(dimensions=64), use_tqdm=False)[0].outputs.embedding
    assert len(small.data[0].embedding) == 64
    torch.testing.assert_close(torch.tensor(small.data[0].embedding), torch.tensor(ref), atol=1e-5, rtol=0)


def test_openai_errors_and_models(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        client.embeddings.create(model=DEFAULT_NAME, input="word " * 400)
    models = client.models.list()
    assert [m.id for m in models.data] == [DEFAULT_NAME]
    card = requests.get(server.url("/v1/models"), timeout=10).json()["data"][0]
    assert card["max_model_len"] == 256 and card["object"] == "model"


def test_pooling_default_task_is_token_embed(server, llm):
    body = requests.post(server.url("/pooling"), json={"input": TEXTS[:2]}, timeout=30).json()
    refs = llm.encode(TEXTS[:2], pooling_task="token_embed", use_tqdm=False)
    for item, ref in zip(body["data"], refs):
        torch.testing.assert_close(torch.tensor(item["data"]), ref.outputs.data, atol=1e-5, rtol=0)
    raw = requests.post(server.url("/pooling"), json={"input": TEXTS[0], "use_activation": False},
                        timeout=30).json()["data"][0]["data"]
    ref = llm.encode(TEXTS[:1], pooling_task="token_embed", use_tqdm=False,
                     pooling_params=__import__("tokenpool").PoolingParams(use_activation=False))[0].outputs.data
    torch.testing.assert_close(torch.tensor(raw), ref, atol=1e-4, rtol=0)


def test_score_and_rerank_cosine(server, llm):
    query = "fast animals"
    ref = [o.outputs.score for o in llm.score(query, TEXTS, use_tqdm=False)]
    body = requests.post(server.url("/v1/score"), json={"text_1": query, "text_2": TEXTS}, timeout=30).json()
    assert [d["score"] for d in body["data"]] == pytest.approx(ref, abs=1e-5)
    pairs = requests.post(server.url("/score"), json={"data_1": TEXTS, "data_2": TEXTS[::-1]}, timeout=30).json()
    ref_pairs = [o.outputs.score for o in llm.score(TEXTS, TEXTS[::-1], use_tqdm=False)]
    assert [d["score"] for d in pairs["data"]] == pytest.approx(ref_pairs, abs=1e-5)
    rerank = requests.post(server.url("/rerank"), json={"query": query, "documents": TEXTS,
                                                        "return_documents": False}, timeout=30).json()
    assert [r["index"] for r in rerank["results"]] == sorted(range(3), key=lambda i: -ref[i])
    assert all("document" not in r for r in rerank["results"])
    assert rerank["usage"]["total_tokens"] > 0


def test_routes_this_model_cannot_serve(server):
    r = requests.post(server.url("/v1/bge_m3"), json={"input": "hi"}, timeout=10)
    assert r.status_code == 501 and "BGE-M3" in r.json()["error"]["message"]
    r = requests.post(server.url("/pooling"), json={"input": "hi", "task": "token_classify"}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"].endswith("Supported tasks: embed, token_embed.")


def test_version_health_metrics(server):
    assert requests.get(server.url("/version"), timeout=10).json() == {"version": __import__("tokenpool").__version__}
    health = requests.get(server.url("/health"), timeout=10)
    assert health.status_code == 200 and health.content == b""
    metrics = requests.get(server.url("/metrics"), timeout=10)
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("tokenpool_http_requests_total", "tokenpool_http_request_duration_seconds_bucket",
                 "tokenpool_prompt_tokens_total", "tokenpool_queue_depth", "tokenpool_batch_size_requests_bucket",
                 "tokenpool_batch_size_tokens_bucket", "tokenpool_engine_healthy 1.0"):
        assert name in metrics.text
