"""`tokenpool serve MODEL --ray-replicas 2` (Ray Serve, `tokenpool.ray.serve_app`) answers like `tokenpool serve
MODEL`: the seed's /pooling client, the openai client, and bad requests, byte for byte where the body does not
hold request ids or times. Both run as real processes on the tiny BGE-M3; skipped where Ray is absent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
import torch

pytest.importorskip("ray", reason="pip install 'tokenpool[ray]'")
pytest.importorskip("ray.serve")

from tests.server_fixtures import REPO_ROOT, free_port, serve  # noqa: E402

SERVED_NAME = "BAAI/bge-m3"
TEXTS = ["Hello world", "Bonjour le monde, le chat est très rapide!", "dense sparse colbert: retrieval ☃ 42"]


@pytest.fixture(scope="module")
def servers(tiny_bge_m3):
    args = [str(tiny_bge_m3), "--served-model-name", SERVED_NAME, "--dtype", "float32"]
    metrics_port = free_port()
    with serve(args) as plain, serve([*args, "--ray-replicas", "2", "--ray-cpus-per-replica", "0.5",
                                      "--ray-metrics-port", str(metrics_port)]) as on_ray:
        on_ray.metrics_port = metrics_port
        yield plain, on_ray


def _post(server, path, body):
    return requests.post(server.url(path), json=body, timeout=60)


def test_seed_client_gives_the_same_output(servers):
    outputs = []
    for server in servers:
        result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "multi_vector_retrieval_client.py"),
                                 "--host", "127.0.0.1", "--port", str(server.port)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].count("torch.Size") == 4


@pytest.mark.parametrize("task", ["token_embed", "embed", "token_classify"])
def test_pooling_equals_plain_serve(servers, task):
    plain, on_ray = (_post(s, "/pooling", {"input": TEXTS, "task": task}).json() for s in servers)
    assert plain["model"] == on_ray["model"] == SERVED_NAME and plain["usage"] == on_ray["usage"]
    for a, b in zip(plain["data"], on_ray["data"], strict=True):
        torch.testing.assert_close(torch.tensor(a["data"]), torch.tensor(b["data"]), atol=1e-5, rtol=0)


def test_openai_client(servers):
    import openai

    results = [openai.OpenAI(base_url=s.url("/v1"), api_key="unused").embeddings.create(model=SERVED_NAME, input=TEXTS)
               for s in servers]
    for a, b in zip(results[0].data, results[1].data, strict=True):
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path, body", [
    ("/pooling", {"inputx": ["a"]}),
    ("/pooling", {"input": ["a"], "task": "no-such-task"}),
    ("/v1/embeddings", {"model": "another-model", "input": "a"}),
    ("/score", {"text_1": "a"}),
])
def test_bad_requests_are_answered_the_same(servers, path, body):
    plain, on_ray = (_post(s, path, body) for s in servers)
    assert 400 <= plain.status_code < 500
    assert (on_ray.status_code, on_ray.json()) == (plain.status_code, plain.json())


def test_health_and_metrics_with_vllm_gauges(servers):
    for server in servers:
        assert requests.get(server.url("/health"), timeout=10).status_code == 200
        metrics = requests.get(server.url("/metrics"), timeout=10).text
        assert f'vllm:num_requests_running{{model_name="{SERVED_NAME}"}}' in metrics
        assert f'vllm:num_requests_waiting{{model_name="{SERVED_NAME}"}}' in metrics
        assert "tokenpool_http_requests_total" in metrics


def test_per_replica_series_in_rays_metrics_export(servers):
    """Through the proxy /metrics is one replica's; Ray's export has one series per replica, and 16 concurrent
    requests are spread over both replicas (each ran engine steps)."""
    import re
    import time
    from concurrent.futures import ThreadPoolExecutor

    _, on_ray = servers
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: _post(on_ray, "/pooling", {"input": TEXTS, "task": "embed"}).status_code,
                              range(16)))
    assert codes == [200] * 16
    deadline, seen = time.time() + 90, {}
    while time.time() < deadline:
        try:
            text = requests.get(f"http://127.0.0.1:{on_ray.metrics_port}/metrics", timeout=5).text
        except requests.RequestException:
            text = ""
        seen = {name: set(re.findall(rf'^ray_{name}(?:_total)?{{[^}}]*replica="([^"]+)"', text, re.M))
                for name in ("tokenpool_num_requests_running", "tokenpool_engine_healthy", "tokenpool_engine_steps")}
        if len(seen["tokenpool_num_requests_running"]) == 2 and len(seen["tokenpool_engine_steps"]) == 2:
            break
        time.sleep(2)
    assert len(seen["tokenpool_num_requests_running"]) == 2, seen  # one series per replica
    assert seen["tokenpool_engine_healthy"] == seen["tokenpool_num_requests_running"]
    assert seen["tokenpool_engine_steps"] == seen["tokenpool_num_requests_running"]  # both replicas served
