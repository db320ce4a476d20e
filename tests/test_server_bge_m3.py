"""`tokenpool serve` on the tiny BGE-M3 checkpoint: the seed's client, every task and encoding, the
one-call BGE-M3 route, late-interaction scoring, and 200 concurrent mixed requests, all checked against
the offline `LLM` on the same folder."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from tests.server_fixtures import REPO_ROOT, serve
from tokenpool import LLM

SERVED_NAME = "BAAI/bge-m3"  # what the seed's client sends by default
SEED_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_bge_m3):
    with serve([str(tiny_bge_m3), "--served-model-name", SERVED_NAME, "--dtype", "float32"]) as s:
        yield s


@pytest.fixture(scope="module")
def llm(tiny_bge_m3):
    return LLM(str(tiny_bge_m3), dtype="float32")


def offline(llm, texts, task):
    return [o.outputs.data for o in llm.encode(texts, pooling_task=task, use_tqdm=False)]


def post(server, path, body, **kwargs):
    response = requests.post(server.url(path), json=body, timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response


# ----- the seed's client -----
def _seed_client_code() -> str | None:
    """The seed's client as printed in shared/seed (lost text restored per its README), if reachable."""
    for root in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared"):
        doc = root / "seed" / "token_embed_examples.md"
        if doc.is_file():
            text = doc.read_text()
            block = text.split("## Multi Vector Retrieval Client")[1]
            lines = [line[4:] if line.startswith("    ") else line for line in block.splitlines()]
            code = "\n".join(lines)
            code = code.replace("headers = \n", 'headers = {"User-Agent": "Test Client"}\n')
            code = code.replace('f"http://:/pooling"', 'f"http://{args.host}:{args.port}/pooling"')
            code = code.replace("prompt = \n", 'prompt = {"model": model_name, "input": prompts}\n')
            return code.replace("vllm", "tokenpool").replace("vLLM", "tokenpool")
    return None


def _code_lines(code: str) -> list[str]:
    return [line.rstrip() for line in code.splitlines() if line.strip() and not line.startswith("# ")
            and not line.startswith("[") and not line.startswith("Source")]


def test_example_is_the_seed_client_verbatim():
    seed = _seed_client_code()
    if seed is None:
        pytest.skip("shared/seed is not beside the repository")
    example = (REPO_ROOT / "examples" / "multi_vector_retrieval_client.py").read_text()
    seed_lines = _code_lines(seed)
    start = seed_lines.index('"""')
    assert _code_lines(example)[_code_lines(example).index('"""'):] == seed_lines[start:]


def test_seed_client_runs_unchanged(server, llm):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "multi_vector_retrieval_client.py"),
         "--host", "127.0.0.1", "--port", str(server.port)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shapes = re.findall(r"torch\.Size\(\[(\d+), (\d+)\]\)", result.stdout)
    expected = offline(llm, SEED_PROMPTS, "token_embed")
    assert [(int(n), int(d)) for n, d in shapes] == [tuple(t.shape) for t in expected]
    # The same request as the client's: the numbers equal LLM.encode.
    body = {"model": SERVED_NAME, "input": SEED_PROMPTS}
    data = post(server, "/pooling", body, headers={"User-Agent": "Test Client"}).json()["data"]
    for item, ref in zip(data, expected):
        torch.testing.assert_close(torch.tensor(item["data"]), ref, atol=ATOL, rtol=0)


# ----- every task, every encoding -----
TEXTS = ["Hello world", "Bonjour le monde, le chat est très rapide!", "dense sparse colbert: retrieval ☃ 42"]


@pytest.mark.parametrize("task", ["embed", "token_embed", "token_classify"])
def test_pooling_float_matches_offline(server, llm, task):
    body = post(server, "/pooling", {"input": TEXTS, "task": task}).json()
    assert body["object"] == "list" and body["model"] == SERVED_NAME and body["id"].startswith("pooling-")
    refs = offline(llm, TEXTS, task)
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    for item, ref in zip(body["data"], refs):
        assert item["object"] == "pooling"
        torch.testing.assert_close(torch.tensor(item["data"]), ref, atol=ATOL, rtol=0)
    n = sum(len(ids) for ids in llm.llm_engine.processor(TEXTS))
    assert body["usage"]["prompt_tokens"] == n and body["usage"]["total_tokens"] == n


def decode(raw: bytes, dtype: str, endianness: str, shape) -> torch.Tensor:
    order = {"little": "<", "big": ">", "native": "="}[endianness]
    np_dtype = {"float32": "f4", "float16": "f2", "bfloat16": "u2"}[dtype]
    array = np.frombuffer(raw, dtype=order + np_dtype).astype("=" + np_dtype).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16).float() if dtype == "bfloat16" else tensor.float()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("endianness", ["native", "little", "big"])
def test_pooling_base64_and_bytes(server, llm, dtype, endianness):
    refs = offline(llm, TEXTS, "token_embed")
    expected = [r.to(getattr(torch, dtype)).float() for r in refs]
    atol = {"float32": ATOL, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    common = {"input": TEXTS, "embed_dtype": dtype, "endianness": endianness}
    data = post(server, "/pooling", {**common, "encoding_format": "base64"}).json()["data"]
    for item, ref in zip(data, expected):
        assert item["shape"] == list(ref.shape)
        got = decode(base64.b64decode(item["data"]), dtype, endianness, item["shape"])
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    response = post(server, "/pooling", {**common, "encoding_format": "bytes"})
    assert response.headers["content-type"] == "application/octet-stream"
    meta = json.loads(response.headers["metadata"])
    assert meta["model"] == SERVED_NAME and meta["usage"]["prompt_tokens"] > 0
    for item, ref in zip(meta["data"], expected):
        assert (item["embed_dtype"], item["endianness"], item["shape"]) == (dtype, endianness, list(ref.shape))
        got = decode(response.content[item["start"]:item["end"]], dtype, endianness, item["shape"])
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_binary_encodings_are_exact_conversions(server):
    """base64 float16/bfloat16 bytes are torch's own conversion of the float32 answer."""
    f32 = post(server, "/pooling", {"input": TEXTS[1], "encoding_format": "base64"}).json()["data"][0]
    full = decode(base64.b64decode(f32["data"]), "float32", "native", f32["shape"])
    for dtype in ("float16", "bfloat16"):
        item = post(server, "/pooling", {"input": TEXTS[1], "encoding_format": "base64",
                                         "embed_dtype": dtype}).json()["data"][0]
        raw = base64.b64decode(item["data"])
        expected = full.to(getattr(torch, dtype)).contiguous().view(torch.int16).numpy().tobytes()
        assert raw == expected


def test_token_ids_input_and_truncation(server, llm):
    ids = llm.llm_engine.processor(TEXTS[:2])
    body = post(server, "/pooling", {"input": ids, "task": "embed"}).json()
    for item, ref in zip(body["data"], offline(llm, TEXTS[:2], "embed")):
        torch.testing.assert_close(torch.tensor(item["data"]), ref, atol=ATOL, rtol=0)
    one = post(server, "/pooling", {"input": ids[1], "truncate_prompt_tokens": 5}).json()
    assert len(one["data"][0]["data"]) == 4  # token_embed drops the first of the 5 kept tokens
    ref = llm.encode([{"prompt_token_ids": ids[1]}], pooling_task="token_embed", truncate_prompt_tokens=5,
                     use_tqdm=False)[0].outputs.data
    torch.testing.assert_close(torch.tensor(one["data"][0]["data"]), ref, atol=ATOL, rtol=0)


# ----- BGE-M3 in one call -----
def test_bge_m3_route_dense_sparse_colbert(server, llm):
    body = post(server, "/v1/bge_m3", {"input": TEXTS}).json()
    dense = offline(llm, TEXTS, "embed")
    colbert = offline(llm, TEXTS, "token_embed")
    sparse = llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for item, d, c, s in zip(body["data"], dense, colbert, sparse):
        torch.testing.assert_close(torch.tensor(item["dense_vecs"]), d, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(item["colbert_vecs"]), c, atol=ATOL, rtol=0)
        assert item["colbert_shape"] == list(c.shape) and item["dense_shape"] == list(d.shape)
        weights = {w["token_id"]: w["weight"] for w in item["lexical_weights"]}
        assert weights.keys() == s.outputs.lexical_weights.keys()
        for token_id, weight in s.outputs.lexical_weights.items():
            assert weights[token_id] == pytest.approx(weight, abs=ATOL)
        for w in item["lexical_weights"]:
            assert w["token"] == tokenizer.convert_ids_to_tokens(w["token_id"])
    only = post(server, "/v1/bge_m3", {"input": TEXTS[0], "return_dense": False, "return_colbert_vecs": False,
                                       "encoding_format": "base64"}).json()["data"][0]
    assert "dense_vecs" not in only and "colbert_vecs" not in only and only["lexical_weights"]
    b64 = post(server, "/v1/bge_m3", {"input": TEXTS[0], "encoding_format": "base64"}).json()["data"][0]
    got = decode(base64.b64decode(b64["colbert_vecs"]), "float32", "native", b64["colbert_shape"])
    torch.testing.assert_close(got, colbert[0], atol=ATOL, rtol=0)


# ----- scoring -----
def test_score_and_rerank_maxsim_and_cosine(server, llm):
    query, docs = "colbert retrieval", ["dense sparse colbert: retrieval", "le chat est rapide", "Hello world"]
    for task in ("token_embed", "embed"):
        ref = [o.outputs.score for o in llm.score(query, docs, pooling_task=task, use_tqdm=False)]
        for path in ("/score", "/v1/score"):
            body = post(server, path, {"text_1": query, "text_2": docs, "task": task}).json()
            assert [d["index"] for d in body["data"]] == [0, 1, 2]
            assert [d["score"] for d in body["data"]] == pytest.approx(ref, abs=1e-4)
        alias = post(server, "/score", {"queries": query, "documents": docs, "task": task}).json()
        assert [d["score"] for d in alias["data"]] == pytest.approx(ref, abs=1e-4)
        for path in ("/rerank", "/v1/rerank"):
            body = post(server, path, {"query": query, "documents": docs, "task": task, "top_n": 2}).json()
            order = sorted(range(3), key=lambda i: -ref[i])[:2]
            assert [r["index"] for r in body["results"]] == order
            assert [r["document"]["text"] for r in body["results"]] == [docs[i] for i in order]
            assert [r["relevance_score"] for r in body["results"]] == pytest.approx([ref[i] for i in order], abs=1e-4)
    # Default: cosine over embed, as LLM.score.
    default = post(server, "/score", {"text_1": query, "text_2": docs}).json()
    ref = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    assert [d["score"] for d in default["data"]] == pytest.approx(ref, abs=1e-4)


def test_tokenize_detokenize(server, llm):
    tokenizer = llm.get_tokenizer()
    body = post(server, "/tokenize", {"prompt": TEXTS[1], "return_token_strs": True}).json()
    ids = tokenizer(TEXTS[1])["input_ids"]
    assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] == 128
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    text = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert text == tokenizer.decode(ids)


# ----- many concurrent clients -----
LENGTHS = [1, 3, 12, 40]  # words per text: 3 .. ~90 tokens


def _mixed_requests(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog retrieval colbert dense sparse hello monde chat".split()
    out = []
    for i in range(n):
        count = rng.choice([1, 1, 2, 4])
        texts = [" ".join(rng.choice(words) for _ in range(rng.choice(LENGTHS))) for _ in range(count)]
        task = rng.choice(["embed", "token_embed", "token_classify"])
        fmt = rng.choice(["float", "base64", "bytes"])
        dtype = rng.choice(["float32", "float16", "bfloat16"]) if fmt != "float" else "float32"
        out.append({"input": texts, "task": task, "encoding_format": fmt, "embed_dtype": dtype,
                    "endianness": rng.choice(["native", "big"])})
    return out


def _answer(server, body) -> list[torch.Tensor]:
    response = requests.post(server.url("/pooling"), json=body, timeout=120)
    assert response.status_code == 200, response.text
    if body["encoding_format"] == "bytes":
        meta = json.loads(response.headers["metadata"])
        return [decode(response.content[m["start"]:m["end"]], m["embed_dtype"], m["endianness"], m["shape"])
                for m in meta["data"]]
    data = response.json()["data"]
    if body["encoding_format"] == "float":
        return [torch.tensor(item["data"], dtype=torch.float32) for item in data]
    return [decode(base64.b64decode(item["data"]), body["embed_dtype"], body["endianness"], item["shape"])
            for item in data]


def test_200_concurrent_mixed_requests(server, llm):
    bodies = _mixed_requests(200)
    with ThreadPoolExecutor(max_workers=200) as pool:
        answers = list(pool.map(lambda b: _answer(server, b), bodies))
    refs: dict[tuple[str, str], torch.Tensor] = {}
    for task in ("embed", "token_embed", "token_classify"):
        texts = sorted({t for b in bodies if b["task"] == task for t in b["input"]})
        refs.update({(task, t): r for t, r in zip(texts, offline(llm, texts, task))})
    for body, got in zip(bodies, answers):
        atol = {"float32": ATOL, "float16": 2e-3, "bfloat16": 2e-2}[body["embed_dtype"]]
        assert len(got) == len(body["input"])
        for text, tensor in zip(body["input"], got):
            torch.testing.assert_close(tensor, refs[(body["task"], text)], atol=atol, rtol=0)
    metrics = requests.get(server.url("/metrics"), timeout=10).text
    # Concurrent clients were batched together: some steps ran more than one prompt.
    steps = float(re.search(r"^tokenpool_batch_size_requests_count (\S+)", metrics, re.M).group(1))
    prompts = float(re.search(r"^tokenpool_batch_size_requests_sum (\S+)", metrics, re.M).group(1))
    assert prompts > steps
    assert 'tokenpool_http_requests_total{method="POST",route="/pooling",status="200"}' in metrics
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
