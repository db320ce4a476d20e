"""`MultiVectorIndex` with the exact codecs against brute-force MaxSim, upsert / delete semantics, and
durability: an index killed (SIGKILL) in the middle of an `add` reopens holding all or none of it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tokenpool.index import MultiVectorIndex, multivector
from tokenpool.index.residual import default_num_centroids
from tokenpool.scoring import maxsim

DIM = 128  # ColBERT checkpoints: 96-128


_TOPICS = np.random.default_rng(123).standard_normal((24, DIM))


def _docs(n: int, seed: int = 0) -> list[np.ndarray]:
    """Normalized token matrices of 1..39 rows shaped like a ColBERT model's: rows near a few shared "topic"
    directions, so that query and document rows have the high cosines (~0.6-0.9) real token embeddings have."""
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(n):
        rows = int(rng.integers(1, 40))
        m = _TOPICS[rng.integers(0, len(_TOPICS), rows)] + 0.6 * rng.standard_normal((rows, DIM))
        mats.append((m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32))
    return mats


def _brute(query: np.ndarray, docs: dict, k: int) -> list[tuple]:
    scores = {i: maxsim(query, m) for i, m in docs.items()}
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_exact_codecs_return_the_brute_force_top_k(tmp_path, codec):
    docs = _docs(120)
    ids = [f"d{i}" if i % 2 else i for i in range(len(docs))]  # str and int ids side by side
    index = MultiVectorIndex.create(tmp_path / "ix", DIM, codec=codec)
    index.add(ids[:70], docs[:70])
    index.add(ids[70:], [torch.from_numpy(m) for m in docs[70:]])  # torch tensors too
    queries = [m for m in _docs(5, seed=1)]
    stored = {i: index.get(i) for i in ids}  # what the codec keeps
    original = dict(zip(ids, docs))
    for query, hits in zip(queries, index.search(queries, k=10)):
        want = _brute(query, stored, 10)
        assert [h[0] for h in hits] == [w[0] for w in want]
        assert np.allclose([h[1] for h in hits], [w[1] for w in want], rtol=1e-5)
        exact = [maxsim(query, original[h[0]]) for h in hits]
        assert np.allclose([h[1] for h in hits], exact, rtol=1e-6 if codec == "float32" else 1e-3)
    stats = index.stats()
    assert stats["documents"] == 120 and stats["codec"] == codec
    assert stats["tokens"] == sum(m.shape[0] for m in docs)
    assert stats["bytes_per_token"] == {"float32": 512, "float16": 256, "int8": 132}[codec]


def test_upsert_delete_get_and_reopen(tmp_path):
    docs = _docs(10)
    index = MultiVectorIndex.create(tmp_path / "ix", DIM, codec="float32")
    index.add(list(range(10)), docs, metadata=[{"n": i} for i in range(10)])
    replacement = _docs(1, seed=9)[0]
    index.add([3, "new"], [replacement, docs[0]], metadata=[{"n": "three"}, None])  # 3 is replaced
    assert len(index) == 11 and 3 in index and "new" in index and "3" not in index
    assert np.array_equal(index.get(3), replacement) and index.metadata(3) == {"n": "three"}
    with pytest.raises(ValueError, match="Unknown id"):
        index.delete([4, "missing"])
    assert 4 in index  # nothing of that call applied
    assert index.delete([4, "new", 4]) == 2  # an id given twice counts once
    assert len(index) == 9 and 4 not in index
    hits = index.search([replacement], k=20)[0]
    assert [h[0] for h in hits].count(3) == 1 and 4 not in [h[0] for h in hits]
    again = MultiVectorIndex.open(tmp_path / "ix")
    assert len(again) == 9 and sorted(again._where, key=str) == sorted(index._where, key=str)
    assert again.search([replacement], k=3) == index.search([replacement], k=3)
    assert isinstance(again.search([docs[5]], k=1)[0][0][0], int)  # ids keep their type
    with pytest.raises(KeyError):
        again.get(4)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    index = MultiVectorIndex.create(tmp_path / "ix", DIM)
    with pytest.raises(ValueError, match="expected \\[n, 128\\]"):
        index.add([1], [np.zeros((3, 8))])
    with pytest.raises(ValueError, match="ids repeat"):
        index.add([1, 1], _docs(2))
    with pytest.raises(ValueError, match="must be an int or a str"):
        index.add([1.5], _docs(1))
    with pytest.raises(ValueError, match="no rows"):
        index.add([1], [np.zeros((0, DIM))])
    with pytest.raises(ValueError, match="already holds an index"):
        MultiVectorIndex.create(tmp_path / "ix", DIM)
    with pytest.raises(ValueError, match="holds no index"):
        MultiVectorIndex.open(tmp_path / "nothing")
    # ids: ints in a signed 64-bit range (HTTP's and JSON's), non-empty strs; a bare str is not a list of ids
    for ids, match in (([1 << 64], "must be in 0..2\\*\\*63 - 1"), ([-5], "must be in 0"), ([""], "empty string"),
                       ("ab", "ids must be a list of ids")):
        with pytest.raises(ValueError, match=match):
            index.add(ids, _docs(len(ids)))
    with pytest.raises(ValueError, match="no NaN"):
        index.add([1], _docs(1), metadata=[{"x": float("nan")}])
    with pytest.raises(ValueError, match="list of \\[n, 128\\] matrices, one per document"):
        index.add([1], _docs(1)[0])
    with pytest.raises(ValueError, match="list of \\[n, 128\\] matrices, one per query"):
        index.search(_docs(1)[0])
    with pytest.raises(ValueError, match="queries\\[0\\] has no rows: a query needs"):
        index.search([np.zeros((0, DIM))])
    (tmp_path / "file").write_text("x")
    for make in (MultiVectorIndex.open, lambda p: MultiVectorIndex.create(p, DIM)):
        with pytest.raises(ValueError, match="is a file"):
            make(tmp_path / "file")
    assert index.search(_docs(1), k=3) == [[]]  # an empty index answers with no hits
    assert len(index) == 0 and [f.name for f in (tmp_path / "ix").iterdir()] == ["manifest.json"]


_WRITER = """
import sys, numpy as np
from tokenpool.index import MultiVectorIndex
from tokenpool.index.residual import default_num_centroids
index = MultiVectorIndex.open(sys.argv[1])
rng = np.random.default_rng(0)
for call in range(10_000):
    ids = [call * 100 + i for i in range(100)]
    index.add(ids, [np.full((30, 128), call, np.float32) + rng.standard_normal((30, 128)).astype(np.float32)
                    for _ in ids])
    print(call, flush=True)
"""


def test_a_kill_in_the_middle_of_add_leaves_all_or_none_of_it(tmp_path):
    MultiVectorIndex.create(tmp_path / "ix", DIM, codec="float16")
    for delay in (0.8, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "ix")], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        proc.stdout.readline()  # at least one add is done
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        index = MultiVectorIndex.open(tmp_path / "ix")
        assert len(index) % 100 == 0 and len(index) >= 100  # whole add calls only
        calls = {i // 100 for i in index._where}
        for call in calls:
            block = index.get(call * 100 + 99)  # the last document of each call that is there
            assert block.shape == (30, 128) and abs(float(block.mean()) - call) < 0.5
        manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
        referenced = {f"{s['name']}.{x}" for s in manifest["segments"] for x in ("codes.npy", "docs.json")}
        referenced |= {s["deleted"] for s in manifest["segments"] if s["deleted"]}  # the second run upserts
        assert {f.name for f in (tmp_path / "ix").iterdir()} == referenced | {"manifest.json"}  # debris removed


def test_llm_add_to_index_and_search_in_document_and_query_modes(tmp_path, minilm_path):
    """On a ColBERT checkpoint: documents go in in document mode, queries in query mode, and the results equal
    LLM.score's MaxSim ranking, which encodes the two sides the same way."""
    from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_tiny_colbert
    from tokenpool import LLM

    llm = LLM(str(build_tiny_colbert(tmp_path / "cb", minilm_path, "pylate")), dtype="float32")
    dim = llm.llm_engine.info.output_dims["token_embed"]
    index = MultiVectorIndex.create(tmp_path / "ix", dim, codec="float32")
    ids = [f"doc-{i}" for i in range(len(SAMPLE_DOCUMENTS))]
    llm.add_to_index(index, ids, SAMPLE_DOCUMENTS, use_tqdm=False)
    for query, hits in zip(SAMPLE_QUERIES, llm.search(SAMPLE_QUERIES, index, k=len(ids))):
        scores = [s.outputs.score for s in llm.score(query, SAMPLE_DOCUMENTS, pooling_task="token_embed",
                                                     use_tqdm=False)]
        want = sorted(zip(ids, scores), key=lambda kv: -kv[1])
        assert [h[0] for h in hits] == [w[0] for w in want]
        assert np.allclose([h[1] for h in hits], [w[1] for w in want], rtol=1e-5)
    wrong = MultiVectorIndex.create(tmp_path / "wrong", dim + 1)
    with pytest.raises(ValueError, match=f"holds {dim + 1}-dim vectors"):
        llm.search("a query", wrong)
    for ids in ("ab", {"p", "q"}):  # a str's characters, a set's arbitrary order: refused before the work
        with pytest.raises(ValueError, match="ids must be a"):
            llm.add_to_index(wrong, ids, ["x", "y"])


def test_cli_build_from_texts_and_from_embed_corpus_parquet_then_search(tmp_path, minilm_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenpool import LLM

    texts = [f"passage {i} about late interaction and token vectors number {i}" for i in range(30)]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts[:20]))
    pq.write_table(pa.table({"id": list(range(20, 30)), "text": texts[20:]}), tmp_path / "in" / "b.parquet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "tokenpool", "index"]
    model = ["--model", str(minilm_path), "--dtype", "float32"]
    built = subprocess.run([*run, "build", str(tmp_path / "ix"), "--input", str(tmp_path / "in"), "--codec",
                            "float32", "--no-progress", *model], capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "30 documents added; the index holds 30 documents" in built.stdout
    found = subprocess.run([*run, "search", str(tmp_path / "ix"), texts[7], "-k", "3", *model], capture_output=True,
                           text=True, env=env, timeout=300)
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0] == f"# {texts[7]}" and lines[1].split("\t")[2] == "7"  # the passage itself ranks first
    # embed-corpus's output (id + token matrices) is added without re-embedding
    llm = LLM(str(minilm_path), dtype="float32")
    mats = [o.outputs.data.numpy() for o in llm.encode(texts[:5], pooling_task="token_embed", use_tqdm=False)]
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(5)], "num_tokens": [m.shape[0] for m in mats],
                             "embedding": pa.array([m.tolist() for m in mats], pa.list_(pa.list_(pa.float32(), 384)))}),
                   tmp_path / "emb.parquet")
    again = subprocess.run([*run, "build", str(tmp_path / "ix"), "--input", str(tmp_path / "emb.parquet"),
                            "--no-progress", *model], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "the index holds 35 documents" in again.stdout, again.stderr
    assert np.allclose(MultiVectorIndex.open(tmp_path / "ix").get("e3"), mats[3])
    bad = subprocess.run([*run, "build", str(tmp_path / "ix"), "--input", str(tmp_path / "in"), "--text-column",
                          "body", "--no-progress", *model], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "body" in bad.stderr
    # a compressed index: the residual codec, trained on the first documents
    small = subprocess.run([*run, "build", str(tmp_path / "rx"), "--input", str(tmp_path / "in"), "--codec",
                            "residual", "--nbits", "4", "--no-progress", *model], capture_output=True, text=True,
                           env=env, timeout=300)
    assert small.returncode == 0 and "(residual, 194 bytes per token)" in small.stdout, small.stderr
    found = subprocess.run([*run, "search", str(tmp_path / "rx"), texts[7], "-k", "3", *model], capture_output=True,
                           text=True, env=env, timeout=300)
    assert found.returncode == 0 and found.stdout.splitlines()[1].split("\t")[2] == "7", found.stderr
    # compaction from the command line: one segment, the same answers; a folder without an index is one line
    compacted = subprocess.run([*run, "compact", str(tmp_path / "ix")], capture_output=True, text=True, env=env,
                               timeout=300)
    assert compacted.returncode == 0 and "3 segments -> 1; 35 documents" in compacted.stdout, compacted.stderr
    found = subprocess.run([*run, "search", str(tmp_path / "ix"), texts[7], "-k", "3", *model], capture_output=True,
                           text=True, env=env, timeout=300)
    assert found.returncode == 0 and found.stdout.splitlines()[1].split("\t")[2] == "7", found.stderr
    missing = subprocess.run([*run, "compact", str(tmp_path / "none")], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "holds no index" in missing.stderr


def test_cli_build_trains_a_residual_codec_on_more_than_one_chunk(tmp_path, monkeypatch):
    """`index build` holds chunks back for a new residual index's first add (its codec's training sample), then
    adds chunk by chunk; an id repeated across held chunks ends the held add early instead of failing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenpool.index import cli

    monkeypatch.setattr(cli, "CHUNK_ROWS", 4)
    monkeypatch.setattr(cli, "TRAIN_ROWS", 12)
    monkeypatch.setattr(multivector, "_MERGE_FACTOR", 100)  # the segments as the chunks made them
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((int(rng.integers(3, 9)), 64)).astype(np.float32) for _ in range(22)]
    ids = [f"d{i}" for i in range(20)] + ["d1", "d21"]  # d1 again, in the last chunk
    pq.write_table(pa.table({"id": ids, "embedding": pa.array([m.tolist() for m in mats],
                                                               pa.list_(pa.list_(pa.float32(), 64)))}),
                   tmp_path / "emb.parquet")
    stats = cli.build(str(tmp_path / "ix"), None, [str(tmp_path / "emb.parquet")], codec="residual", progress=False)
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert [seg["docs"] for seg in manifest["segments"]] == [12, 4, 4, 2]
    assert stats["documents"] == 21 and stats["centroids"] == default_num_centroids(sum(len(m) for m in mats[:12]))
    index = MultiVectorIndex.open(tmp_path / "ix")
    assert index.search([mats[20][:2]], k=1, exact=True)[0][0][0] == "d1"  # the later d1 replaced the first
    early = ids[:5] + ["d0"] + ids[6:]  # d0 again while the first chunks are held: they are added before it
    pq.write_table(pa.table({"id": early, "embedding": pa.array([m.tolist() for m in mats],
                                                                 pa.list_(pa.list_(pa.float32(), 64)))}),
                   tmp_path / "early.parquet")
    cli.build(str(tmp_path / "ix2"), None, [str(tmp_path / "early.parquet")], codec="residual", progress=False)
    manifest = json.loads((tmp_path / "ix2" / "manifest.json").read_text())
    assert [seg["docs"] for seg in manifest["segments"]] == [4, 4, 4, 4, 4, 2]


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_exact_codecs_on_real_minilm_token_embeddings(tmp_path, minilm_path, codec):
    import sys as _sys

    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    from corpus import CorpusSpec, make_text_corpus
    from transformers import AutoTokenizer

    from tokenpool import LLM

    texts, _ = make_text_corpus(AutoTokenizer.from_pretrained(str(minilm_path)),
                                CorpusSpec(num_passages=300, min_len=8, max_len=64))
    llm = LLM(str(minilm_path), dtype="float32")
    mats = [o.outputs.data.numpy() for o in llm.encode(texts, pooling_task="token_embed", use_tqdm=False)]
    index = MultiVectorIndex.create(tmp_path / "ix", 384, codec=codec)
    index.add(list(range(len(mats))), mats)
    queries = [o.outputs.data.numpy() for o in llm.encode(["a short query about the corpus", texts[5][:40]],
                                                         pooling_task="token_embed", use_tqdm=False)]
    stored = {i: index.get(i) for i in range(len(mats))}
    for query, hits in zip(queries, index.search(queries, k=10)):
        want = _brute(query, stored, 10)
        assert [h[0] for h in hits] == [w[0] for w in want]
        exact = [maxsim(query, mats[h[0]]) for h in hits]
        assert np.allclose([h[1] for h in hits], exact, rtol=1e-3)


def test_nan_and_bad_k_are_refused_and_change_nothing(tmp_path):
    index = MultiVectorIndex.create(tmp_path / "ix", DIM)
    index.add(["a"], _docs(1))
    bad = _docs(1)[0].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(["b"], [bad])
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(_docs(1), k=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search([bad])
    assert len(index) == 1 and "b" not in index


def _files(path) -> set[str]:
    return {f.name for f in path.iterdir()}


@pytest.mark.parametrize("codec", ["float16", "int8", "residual"])
def test_small_adds_are_merged_and_search_is_unchanged(tmp_path, monkeypatch, codec):
    """Many small adds, upserts and deletes: the index merges trailing same-tier segments as it goes (at most
    _MERGE_FACTOR - 1 per tier, plus one), and every read equals an index that never merged."""
    monkeypatch.setattr(multivector, "_MERGE_MIN_TOKENS", 64)
    docs = _docs(160, seed=3)
    ids = [f"d{i}" if i % 3 else i for i in range(len(docs))]
    merged = MultiVectorIndex.create(tmp_path / "merged", DIM, codec=codec, num_centroids=64)
    plain = MultiVectorIndex.create(tmp_path / "plain", DIM, codec=codec, num_centroids=64)
    plain.auto_compact = False
    merged.add(ids[:60], docs[:60], metadata=[{"i": i} for i in range(60)])  # the residual codec's sample
    plain.add(ids[:60], docs[:60], metadata=[{"i": i} for i in range(60)])
    rng = np.random.default_rng(0)
    for start in range(60, 160, 4):
        batch = list(range(start, start + 4))
        for index in (merged, plain):
            index.add([ids[i] for i in batch], [docs[i] for i in batch])  # no metadata on these
        if start % 12 == 0:  # upsert one earlier document, delete another
            j, gone = int(rng.integers(0, start)), ids[int(rng.integers(0, start))]
            for index in (merged, plain):
                index.add([ids[j]], [docs[(j + 7) % 160]])
                if gone in index and gone != ids[j]:
                    index.delete([gone])
    tiers = [merged._tier(seg) for seg in merged._segments]
    assert len(merged._segments) < len(plain._segments) / 3
    assert all(tiers.count(t) < multivector._MERGE_FACTOR for t in set(tiers))
    assert len(merged) == len(plain) and set(merged._where) == set(plain._where)
    for doc_id in plain._where:
        assert np.array_equal(merged.get(doc_id), plain.get(doc_id))
        assert merged.metadata(doc_id) == plain.metadata(doc_id)
    queries = _docs(6, seed=11)
    assert merged.search(queries, k=10) == plain.search(queries, k=10)
    assert merged.search(queries, k=10, exact=True) == plain.search(queries, k=10, exact=True)
    reopened = MultiVectorIndex.open(tmp_path / "merged")
    assert reopened.search(queries, k=10) == merged.search(queries, k=10)
    assert set(reopened._where) == set(plain._where)  # ids keep their type (int or str) through merges
    assert {type(i) for i in reopened._where} == {int, str}
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert len(manifest["segments"]) == len(merged._segments)
    names = {seg["name"] for seg in manifest["segments"]}
    assert {f.split(".")[0] for f in _files(tmp_path / "merged") if f.startswith("seg-")} == names


def test_compact_drops_deleted_tokens_and_keeps_every_read(tmp_path):
    docs = _docs(90, seed=5)
    index = MultiVectorIndex.create(tmp_path / "ix", DIM, codec="float16")
    index.auto_compact = False
    for start in range(0, 90, 30):
        index.add(list(range(start, start + 30)), docs[start:start + 30], metadata=[str(i) for i in range(start, start + 30)])
    index.delete(list(range(0, 90, 3)))
    index.add([1], [docs[50]])  # an upsert: the old rows of 1 are dead too
    queries = _docs(4, seed=8)
    before = index.search(queries, k=15)
    size_before = index.stats()["bytes_on_disk"]
    live = {i: index.get(i) for i in index._where}
    copied = []
    stats = index.compact(progress=copied.append)
    assert sum(copied) == stats["tokens"]  # every live row reported once
    if index._bf16_prefilter(None):  # the bf16 scan's row-norm bound: known without a pass over the merged rows
        (seg,) = index._segments
        true_max = max(float(np.linalg.norm(index.get(i), axis=1).max()) for i in index._where)
        assert seg.cache["max_norm"] >= true_max - 1e-6
    assert stats["segments"] == 1 and stats["documents"] == 60 and stats["stored_tokens"] == stats["tokens"]
    assert stats["tokens"] == sum(m.shape[0] for m in live.values())
    assert stats["bytes_on_disk"] < size_before
    assert index.search(queries, k=15) == before
    assert all(np.array_equal(index.get(i), m) for i, m in live.items())
    assert index.metadata(1) is None and index.metadata(2) == "2"
    assert not any(".del-" in f for f in _files(tmp_path / "ix"))
    assert MultiVectorIndex.open(tmp_path / "ix").search(queries, k=15) == before
    index.delete(list(index._where))
    assert index.compact()["segments"] == 0 and _files(tmp_path / "ix") == {"manifest.json"}
    assert index.search(queries, k=3) == [[], [], [], []]


def test_a_merge_that_never_commits_leaves_the_old_segments(tmp_path, monkeypatch):
    """A crash between writing the merged segment and committing the manifest: the next open sees the old
    segments and removes the merged segment's files."""
    docs = _docs(40, seed=6)
    index = MultiVectorIndex.create(tmp_path / "ix", DIM, codec="int8")
    index.auto_compact = False
    for start in range(0, 40, 10):
        index.add(list(range(start, start + 10)), docs[start:start + 10])
    queries = _docs(3, seed=2)
    before, files = index.search(queries, k=5), _files(tmp_path / "ix")

    def crash(manifest):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(index, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        index.compact()
    assert _files(tmp_path / "ix") > files  # the merged segment was written
    again = MultiVectorIndex.open(tmp_path / "ix")
    assert _files(tmp_path / "ix") == files and len(again._segments) == 4
    assert again.search(queries, k=5) == before


def test_reads_during_merges_see_one_version(tmp_path, monkeypatch):
    """A reader thread's get() / metadata() while adds merge segments (documents move between segments) always
    returns the document asked for."""
    import threading

    monkeypatch.setattr(multivector, "_MERGE_MIN_TOKENS", 16)
    docs = _docs(240, seed=12)
    index = MultiVectorIndex.create(tmp_path / "ix", DIM, codec="float32")
    index.add([0], [docs[0]], metadata=[0])
    stop, errors = threading.Event(), []

    def read():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            i = int(rng.integers(0, len(index)))  # ids 0..len-1 are all there
            try:
                if not np.array_equal(index.get(i), docs[i]) or index.metadata(i) != i:
                    errors.append(i)
            except KeyError:
                errors.append(("missing", i))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, len(docs)):
            index.add([i], [docs[i]], metadata=[i])
    finally:
        stop.set()
        reader.join()
    assert not errors and len(index._segments) < 12


def test_cli_build_input_rules(tmp_path, minilm_path):
    """A later row of an id replaces an earlier one within a chunk too; a bad row is a ValueError naming the file
    and the id, and a build that fails before its first add leaves no index; an existing index's codec is kept
    (naming another is an error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenpool.index import cli

    rng = np.random.default_rng(5)
    mats = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(3)]
    pq.write_table(pa.table({"id": ["a", "b", "a"], "embedding": pa.array([m.tolist() for m in mats],
                                                                          pa.list_(pa.list_(pa.float32(), 16)))}),
                   tmp_path / "dup.parquet")
    stats = cli.build(str(tmp_path / "ix"), None, [str(tmp_path / "dup.parquet")], progress=False)
    assert stats["documents"] == 2 and stats["codec"] == "float16"
    assert np.allclose(MultiVectorIndex.open(tmp_path / "ix").get("a"), mats[2], atol=1e-2)  # the last row
    with pytest.raises(ValueError, match="holds a float16 index; --codec residual applies to a new index only"):
        cli.build(str(tmp_path / "ix"), None, [str(tmp_path / "dup.parquet")], codec="residual", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "text": "fine"}\n{"id": "e", "text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: the row of id 'e' has int 5 as its 'text'"):
        cli.build(str(tmp_path / "new"), str(minilm_path), [str(tmp_path / "bad.jsonl")], progress=False,
                  engine_kwargs={"dtype": "float32"})
    assert not (tmp_path / "new" / "manifest.json").exists()


def test_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    (tmp_path / "file.txt").write_text("not an index")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("[1, 2]")
    for args, message in ((["index", "compact", str(tmp_path / "file.txt")], "is a file, not an index"),
                          (["index", "compact", str(tmp_path / "broken")], "is not a tokenpool multi-vector index"),
                          (["index", "search", str(tmp_path), "q", "-k", "abc"], "expected a positive integer"),
                          (["serve", "--port", "99999"], "expected a port in 0..65535"),
                          (["demo", "--model", str(tmp_path / "nowhere")], "tokenpool demo: "),
                          (["serve", str(tmp_path / "nowhere"), "--ray-replicas", "1"], "does not exist"),
                          (["serve", "--ray-gpus-per-replica", "-1"], "expected a number >= 0")):
        if args[0] == "serve" and "--ray-replicas" in args and importlib.util.find_spec("fastapi") is None:
            message = "needs the 'server' extra"  # an environment without it (the GPU machine's): also one line
        done = subprocess.run([sys.executable, "-m", "tokenpool", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr and message in done.stderr, \
            (args, done.stderr)
