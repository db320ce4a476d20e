"""Bad requests get the right 4xx with a clear message in vLLM's error body, and the server stays healthy.

One server with every guard on: an API key, a concurrency limit, a small body limit and a media allow-list.
"""

from __future__ import annotations

import json
import pathlib
import threading

import pytest
import requests

from tests.server_fixtures import serve
from tokenpool.entrypoints.server.errors import APIError
from tokenpool.entrypoints.server.media import MediaPolicy

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
MAX_CONCURRENT = 4


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "ok.png").write_bytes(b"not really a png")
    return folder


@pytest.fixture(scope="module")
def server(minilm_path, media_dir):
    args = [str(minilm_path), "--api-key", KEY, "--max-concurrent-requests", str(MAX_CONCURRENT),
            "--max-request-body-bytes", "64k", "--allowed-media-domains", "images.example.com",
            "--allowed-local-media-path", str(media_dir)]
    with serve(args) as s:
        yield s


def call(server, body, path="/pooling", headers=AUTH, **kwargs):
    if isinstance(body, (bytes, str)):
        return requests.post(server.url(path), data=body, headers={"Content-Type": "application/json", **headers},
                             timeout=60, **kwargs)
    return requests.post(server.url(path), json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response, status, *fragments, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                             413: "RequestEntityTooLargeError", 429: "TooManyRequestsError"}[status]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(autouse=True)
def still_healthy(server):
    yield
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
    ok = call(server, {"input": "still fine", "task": "embed"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["data"]) == 384


def test_api_key(server):
    for path, method in (("/pooling", "post"), ("/v1/models", "get"), ("/metrics", "get"), ("/version", "get")):
        response = getattr(requests, method)(server.url(path), json={"input": "x"}, timeout=10)
        assert_error(response, 401, "API key")
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = getattr(requests, method)(server.url(path), json={"input": "x"}, timeout=10,
                                          headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401)
    assert requests.get(server.url("/health"), timeout=10).status_code == 200  # exempt
    assert requests.get(server.url("/v1/models"), headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize("raw, fragment", [
    (b'{"input": "x"', "Malformed JSON"),
    (b'{"input": }', "Malformed JSON"),
    (b"\xff\xfe\x00", "Malformed JSON"),
    (b"", "body is empty"),
    (b"[1, 2, 3]", "must be a JSON object"),
    (b'"just a string"', "must be a JSON object"),
])
def test_malformed_json_is_400(server, raw, fragment):
    for path in ("/pooling", "/v1/embeddings", "/score", "/rerank", "/tokenize"):
        assert_error(call(server, raw, path), 400, fragment)


def test_form_body_is_400(server):
    response = requests.post(server.url("/pooling"), data={"input": "x"}, headers=AUTH, timeout=10)
    assert_error(response, 400, "application/json")


@pytest.mark.parametrize("body", [{"input": []}, {"input": ""}, {"input": [""]}, {"input": [[]]}, {"input": [[], [1]]},
                                  {}, {"messages": []}, {"input": "x", "messages": [{"role": "user", "content": "x"}]}])
def test_empty_or_missing_input(server, body):
    error = assert_error(call(server, body), 400)
    assert "input" in error["message"] or "messages" in error["message"]


@pytest.mark.parametrize("body, fragment, param", [
    ({"input": 5}, "`input` must be", "input"),
    ({"input": [1.5]}, "`input` must be", "input"),
    ({"input": {"a": 1}}, "got an object", "input"),
    ({"input": [-1]}, "`input` must be", "input"),
    ({"input": [10**9]}, "out of the vocabulary", "input"),
    ({"input": "x", "encoding_format": "xml"}, "encoding_format", "encoding_format"),
    ({"input": "x", "embed_dtype": "int8"}, "embed_dtype", "embed_dtype"),
    ({"input": "x", "endianness": "middle"}, "endianness", "endianness"),
    ({"input": "x", "truncate_prompt_tokens": "many"}, "truncate_prompt_tokens", "truncate_prompt_tokens"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1 or a positive integer", None),
    ({"input": "x", "truncate_prompt_tokens": 10000}, "greater than max_model_len", None),
    ({"input": "x", "task": 7}, "task", "task"),
    ({"input": "x", "task": "generate"}, "task", "task"),
    ({"input": "x", "dimensions": 8}, "'embed' task only", "dimensions"),
    ({"input": "x", "task": "embed", "dimensions": 1000}, "larger than the embedding size (384)", "dimensions"),
    ({"input": "x", "priority": 1}, "priority", "priority"),
    ({"input": "x", "use_activation": True, "normalize": False}, "alias", None),
])
def test_wrong_types_and_values(server, body, fragment, param):
    assert_error(call(server, body), 400, fragment, param=param)


def test_other_routes_validate(server):
    assert_error(call(server, {"text_1": "a"}, "/score"), 400, "text_2")
    assert_error(call(server, {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "/score"), 400, "1 x N")
    assert_error(call(server, {"query": "a", "documents": []}, "/rerank"), 400, "documents")
    assert_error(call(server, {"query": "a", "documents": ["b"], "top_n": -1}, "/rerank"), 400, "top_n")
    assert_error(call(server, {"tokens": [10**9]}, "/detokenize"), 400, "out of the vocabulary")
    assert_error(call(server, {"prompt": 3}, "/tokenize"), 400, "prompt")


def test_unknown_model_is_404(server):
    for path, body in (("/pooling", {"input": "x"}), ("/v1/embeddings", {"input": "x"}),
                       ("/score", {"text_1": "a", "text_2": "b"}), ("/rerank", {"query": "a", "documents": ["b"]}),
                       ("/tokenize", {"prompt": "a"})):
        assert_error(call(server, {**body, "model": "gpt-17"}, path), 404, "The model `gpt-17` does not exist.",
                     param="model")


def test_unsupported_task_is_400(server):
    assert_error(call(server, {"input": "x", "task": "token_classify"}), 400,
                 "Task 'token_classify' is not supported", "Supported tasks: embed, token_embed.")
    assert_error(call(server, {"text_1": "a", "text_2": "b", "task": "classify"}, "/score"), 400,
                 "task: Input should be 'embed' or 'token_embed'", param="task")


def test_prompt_too_long_is_400_with_vllms_message(server):
    assert_error(call(server, {"input": ["short", "word " * 300]}), 400,
                 "This model's maximum context length is 256 tokens. However, your request has 302 input tokens.")
    ok = call(server, {"input": "word " * 300, "truncate_prompt_tokens": -1})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["data"]) == 256


def test_body_too_big_is_413(server):
    big = json.dumps({"input": "x" * (MAX_BODY + 10)}).encode()
    assert_error(call(server, big), 413, "at most 65536 bytes")

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"input": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}'

    response = requests.post(server.url("/pooling"), data=chunks(), timeout=30,
                             headers={"Content-Type": "application/json", **AUTH})
    assert_error(response, 413, "Request body too large")


def test_too_many_concurrent_requests_is_429(server):
    body = {"input": [" ".join(["retrieval"] * 120)] * 8, "task": "token_embed"}
    barrier = threading.Barrier(16)
    results: list[requests.Response] = []

    def one():
        barrier.wait()
        results.append(call(server, body))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= MAX_CONCURRENT
    rejected = next(r for r in results if r.status_code == 429)
    assert_error(rejected, 429, f"at most {MAX_CONCURRENT} at once")
    assert rejected.headers["retry-after"] == "1"


def _image_message(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("url, fragment", [
    ("https://evil.example.org/cat.png", "host 'evil.example.org' is not in --allowed-media-domains"),
    ("http://images.example.com.evil.org/cat.png", "is not in --allowed-media-domains"),
    ("file:///etc/passwd", "outside --allowed-local-media-path"),
    ("ftp://images.example.com/cat.png", "unsupported scheme"),
    ("data:text/plain;base64,aGk=", "Invalid image data URL"),
])
def test_disallowed_image_url_is_400(server, url, fragment):
    assert_error(call(server, _image_message(url)), 400, fragment, param="messages")


def test_allowed_image_on_text_model_is_400(server, media_dir):
    for url in ("https://images.example.com/cat.png", f"file://{media_dir / 'ok.png'}",
                "data:image/png;base64,iVBORw0KGgo="):
        assert_error(call(server, _image_message(url)), 400, "accepts text only")


def test_text_messages_work(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}], "task": "embed"}
    response = call(server, body)
    assert response.status_code == 200 and len(response.json()["data"]) == 1


def test_unknown_route_and_method(server):
    assert_error(requests.get(server.url("/nope"), headers=AUTH, timeout=10), 404, "Not Found")
    response = requests.get(server.url("/pooling"), headers=AUTH, timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == 405


def test_media_policy_unit(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    outside = tmp_path.parent / "outside.png"
    policy = MediaPolicy.create(str(tmp_path), ["img.example.com", "*.cdn.example.net"])
    for url in ("https://img.example.com/a.png", "http://IMG.example.com./a.png", "https://x.cdn.example.net/a",
                f"file://{tmp_path / 'a.png'}", "data:image/jpeg;base64,AAAA"):
        policy.check_url(url)
    for url in ("https://example.com/a.png", "https://cdn.example.net.evil/a", f"file://{outside}",
                f"file://{tmp_path}/../outside.png", "gopher://img.example.com/", "data:image/png,raw"):
        with pytest.raises(APIError):
            policy.check_url(url)
    closed = MediaPolicy.create(None, None)
    for url in ("https://img.example.com/a.png", f"file://{tmp_path / 'a.png'}"):
        with pytest.raises(APIError):
            closed.check_url(url)
