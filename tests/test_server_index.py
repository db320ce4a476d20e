"""`tokenpool serve MODEL --index DIR` on a tiny ColBERT checkpoint: documents in, search out equal to
`LLM.search` offline, deletes all or nothing, the index survives a restart, concurrent adds and searches
(a search sees each add entirely or not at all), and a server without an index says so."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_tiny_colbert
from tests.server_fixtures import serve
from tokenpool import LLM
from tokenpool.index import RESIDUAL_TRAIN_TOKENS, MultiVectorIndex

IDS = [f"doc-{i}" for i in range(len(SAMPLE_DOCUMENTS))]


@pytest.fixture(scope="module")
def colbert(tmp_path_factory, minilm_path):
    return build_tiny_colbert(tmp_path_factory.mktemp("cb") / "m", minilm_path, "pylate")


def _post(server, path, body):
    return requests.post(server.url(path), json=body, timeout=60)


def test_add_search_delete_and_restart(colbert, tmp_path):
    args = [str(colbert), "--dtype", "float32", "--index", str(tmp_path / "ix"), "--index-codec", "float32"]
    with serve(args) as server:
        added = _post(server, "/v1/index/documents",
                      {"ids": IDS, "input": SAMPLE_DOCUMENTS, "metadata": [{"n": i} for i in range(len(IDS))]})
        assert added.status_code == 200, added.text
        assert added.json()["added"] == len(IDS) and added.json()["usage"]["prompt_tokens"] > 0
        found = _post(server, "/v1/search", {"query": SAMPLE_QUERIES, "k": 3}).json()
        stats = requests.get(server.url("/v1/index"), timeout=10).json()
        assert stats["documents"] == len(IDS) and stats["codec"] == "float32"
        missing = _post(server, "/v1/index/delete", {"ids": ["doc-0", "nope"]})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
        assert requests.get(server.url("/v1/index"), timeout=10).json()["documents"] == len(IDS)
        assert _post(server, "/v1/index/delete", {"ids": ["doc-0"]}).json()["documents"] == len(IDS) - 1
        bad = _post(server, "/v1/index/documents", {"ids": ["a", "b"], "input": ["only one"]})
        assert bad.status_code == 400 and "2 ids but 1 inputs" in bad.json()["error"]["message"]
        # refused, changing nothing: another model's name, an empty text, an id past 64 bits; an empty query
        for path, body in (("/v1/index/documents", {"ids": ["x"], "input": ["text"], "model": "nope"}),
                           ("/v1/index/delete", {"ids": ["doc-1"], "model": "nope"}),
                           ("/v1/index/documents", {"ids": ["x"], "input": [""]}),
                           ("/v1/index/documents", {"ids": [1 << 64], "input": ["text"]}),
                           ("/v1/search", {"query": ""}), ("/v1/search", {"query": "a", "candidates": 0})):
            answer = _post(server, path, body)
            assert answer.status_code in (400, 404) and answer.json()["error"]["message"], (path, body)
        assert requests.get(server.url("/v1/index"), timeout=10).json()["documents"] == len(IDS) - 1
        twice = _post(server, "/v1/index/delete", {"ids": ["doc-1", "doc-1"]}).json()
        assert twice["deleted"] == 1 and twice["documents"] == len(IDS) - 2
        scan = _post(server, "/v1/search", {"query": SAMPLE_QUERIES[0], "k": 2, "exact": True}).json()
        assert len(scan["data"][0]["results"]) == 2
        assert _post(server, "/v1/index/documents", {"ids": ["doc-1"], "input": [SAMPLE_DOCUMENTS[1]],
                                                     "metadata": [{"n": 1}]}).status_code == 200
    # offline, the same model and the same documents: the same ranking and scores
    llm = LLM(str(colbert), dtype="float32")
    offline = MultiVectorIndex.create(tmp_path / "offline", llm.llm_engine.info.output_dims["token_embed"],
                                      codec="float32")
    llm.add_to_index(offline, IDS, SAMPLE_DOCUMENTS, use_tqdm=False)
    for item, want in zip(found["data"], llm.search(SAMPLE_QUERIES, offline, k=3)):
        assert [r["id"] for r in item["results"]] == [w[0] for w in want]
        assert np.allclose([r["score"] for r in item["results"]], [w[1] for w in want], rtol=1e-5)
        assert all(r["metadata"] == {"n": IDS.index(r["id"])} for r in item["results"])
    with serve(args) as server:  # restarted on the same folder: the index is still there, minus doc-0
        stats = requests.get(server.url("/v1/index"), timeout=10).json()
        assert stats["documents"] == len(IDS) - 1
        hits = _post(server, "/v1/search", {"query": SAMPLE_DOCUMENTS[0], "k": 10}).json()["data"][0]["results"]
        assert "doc-0" not in [h["id"] for h in hits]


def test_concurrent_adds_and_searches_see_whole_adds(colbert, tmp_path):
    """Each add puts 8 copies of one text under 8 ids; a search for that text with a large k finds all 8 of a
    batch (equal scores) or none of them, never part of one."""
    with serve([str(colbert), "--dtype", "float32", "--index", str(tmp_path / "ix")]) as server:
        text = "late interaction for every token"

        def add(batch: int) -> int:
            ids = [f"b{batch}-{i}" for i in range(8)]
            return _post(server, "/v1/index/documents", {"ids": ids, "input": [text] * 8}).status_code

        def search(_: int) -> list[str]:
            body = _post(server, "/v1/search", {"query": text, "k": 1000}).json()
            return [r["id"] for r in body["data"][0]["results"]]

        with ThreadPoolExecutor(8) as pool:
            adds = [pool.submit(add, b) for b in range(12)]
            searches = [pool.submit(search, i) for i in range(24)]
            assert all(f.result() == 200 for f in adds)
            for f in searches:
                batches: dict[str, int] = {}
                for doc_id in f.result():
                    batches[doc_id.split("-")[0]] = batches.get(doc_id.split("-")[0], 0) + 1
                assert all(n == 8 for n in batches.values()), batches
        assert requests.get(server.url("/v1/index"), timeout=10).json()["documents"] == 96


def test_a_server_without_an_index_says_how_to_get_one(colbert):
    with serve([str(colbert), "--dtype", "float32"]) as server:
        answer = _post(server, "/v1/search", {"query": "x"})
        assert answer.status_code == 404 and "--index DIR" in answer.json()["error"]["message"]
        assert requests.get(server.url("/v1/index"), timeout=10).status_code == 404


def test_an_index_of_another_width_is_refused_in_one_line(colbert, tmp_path):
    import subprocess
    import sys

    MultiVectorIndex.create(tmp_path / "ix", 7)
    proc = subprocess.run([sys.executable, "-m", "tokenpool", "serve", str(colbert), "--dtype", "float32",
                           "--index", str(tmp_path / "ix"), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("tokenpool serve: --index")
    assert "holds 7-dim vectors" in proc.stderr and "Traceback" not in proc.stderr
    # the same for an index of another codec than --index-codec names, a file as --index, a --task the model lacks
    dim = LLM(str(colbert), dtype="float32").llm_engine.info.output_dims["token_embed"]
    MultiVectorIndex.create(tmp_path / "f16", dim)
    (tmp_path / "file").write_text("x")
    for extra, message in ((["--index", str(tmp_path / "f16"), "--index-codec", "residual"],
                            "holds a float16 index; --index-codec residual applies to a new index only"),
                           (["--index", str(tmp_path / "file")], "is a file"),
                           (["--task", "token_classify"], "--task 'token_classify' is not supported")):
        proc = subprocess.run([sys.executable, "-m", "tokenpool", "serve", str(colbert), "--dtype", "float32",
                               "--port", "0", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


def test_a_residual_index_over_http_equals_the_offline_one(colbert, tmp_path):
    """--index-codec residual --index-nbits 4: the codec is trained on the first add, which must hold a training
    sample (a smaller first request is a 400 and adds nothing); search results equal the same documents added
    offline to a residual index of the same settings (the same training: deterministic)."""
    args = [str(colbert), "--dtype", "float32", "--index", str(tmp_path / "ix"), "--index-codec", "residual",
            "--index-nbits", "4"]
    words = " ".join(SAMPLE_DOCUMENTS).split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 30)) for _ in range(1000)]  # ~20k tokens (documents cut at 24)
    ids = [f"t{i}" for i in range(len(texts))]
    with serve(args) as server:
        small = _post(server, "/v1/index/documents", {"ids": IDS, "input": SAMPLE_DOCUMENTS})
        assert small.status_code == 400 and f"{RESIDUAL_TRAIN_TOKENS:,} tokens" in small.json()["error"]["message"]
        assert requests.get(server.url("/v1/index"), timeout=10).json()["documents"] == 0
        assert _post(server, "/v1/index/documents", {"ids": ids, "input": texts}).status_code == 200
        found = _post(server, "/v1/search", {"query": SAMPLE_QUERIES, "k": 3}).json()
        stats = requests.get(server.url("/v1/index"), timeout=10).json()
    assert stats["codec"] == "residual" and stats["nbits"] == 4 and stats["centroids"] > 1
    llm = LLM(str(colbert), dtype="float32")
    offline = MultiVectorIndex.create(tmp_path / "offline", llm.llm_engine.info.output_dims["token_embed"],
                                      codec="residual", nbits=4)
    llm.add_to_index(offline, ids, texts, use_tqdm=False)
    for item, want in zip(found["data"], llm.search(SAMPLE_QUERIES, offline, k=3)):
        assert [r["id"] for r in item["results"]] == [w[0] for w in want]
        assert np.allclose([r["score"] for r in item["results"]], [w[1] for w in want], rtol=1e-4)
