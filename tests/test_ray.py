"""tokenpool on Ray: `embed_dataset` (2 replicas) against `LLM.encode` row for row, plain-Arrow Parquet output,
an actor that dies mid-job (the test hook makes a real process exit; Ray restarts it), and
`tokenpool embed-corpus` killed mid-run and re-run giving exactly the output of one clean run.

One small Ray (2 CPUs, no dashboard) is shared by the tests of this module; skipped where Ray is absent."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="pip install 'tokenpool[ray]'")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from tokenpool import LLM  # noqa: E402
from tokenpool.ray import CRASH_ONCE_ENV, embed_dataset  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [f"passage {i}: " + " ".join(["late interaction"] * (1 + i % 9)) + ("!" if i % 4 == 0 else "")
         for i in range(40)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _rows(ids, texts=TEXTS):
    return [{"id": i, "text": t} for i, t in zip(ids, texts)]


def _collect(ds) -> pa.Table:
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _by_id(table: pa.Table, column: str = "embedding") -> dict:
    values = table.column(column).to_pylist()
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(table.column("id").to_pylist(), values)}


def _expected(model, texts, task, **kw):
    return [o.outputs.data for o in LLM(str(model), dtype="float32", **kw).encode(texts, pooling_task=task,
                                                                                   use_tqdm=False)]


@pytest.mark.parametrize("task", ["token_embed", "embed"])
def test_embed_dataset_equals_llm_encode(ray_cluster, minilm_path, task):
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    ds = ray.data.from_items(_rows(ids), override_num_blocks=4)
    out = _collect(embed_dataset(ds, str(minilm_path), task=task, num_replicas=2, num_cpus_per_replica=0.5,
                                 batch_size=7, output_dtype="float32", dtype="float32"))
    assert sorted(out.column("id").to_pylist()) == sorted(ids)  # every id exactly once
    got = _by_id(out)
    for i, want in zip(ids, _expected(minilm_path, TEXTS, task)):
        assert got[i].shape == tuple(want.shape)
        assert np.allclose(got[i], want.numpy(), atol=1e-5)
    rows = dict(zip(out.column("id").to_pylist(), out.column("num_tokens").to_pylist()))
    if task == "token_embed":
        assert all(rows[i] == got[i].shape[0] for i in ids)
        assert out.schema.field("embedding").type == pa.list_(pa.list_(pa.float32(), 384))
    else:
        assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)


def test_bge_m3_all_as_three_columns_written_to_parquet(ray_cluster, tiny_bge_m3, tmp_path):
    """Task "all" gives dense, sparse (token ids + weights) and colbert columns; the Parquet files open with
    pyarrow alone and hold plain Arrow types (float16 by default)."""
    ids = list(range(len(TEXTS)))
    ds = ray.data.from_items(_rows(ids), override_num_blocks=2)
    embed_dataset(ds, str(tiny_bge_m3), task="all", num_replicas=2, num_cpus_per_replica=0.5, batch_size=16,
                  dtype="float32").write_parquet(str(tmp_path / "out"))
    code = ("import pyarrow.parquet as pq, sys; t = pq.read_table(sys.argv[1]); "
            "print(t.num_rows); print(t.schema.field('colbert').type); print(t.schema.field('sparse').type)")
    shown = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert shown[0] == str(len(ids))
    assert shown[1].startswith("list<element: fixed_size_list<element: halffloat>") or "halffloat" in shown[1]
    assert "token_ids: list" in shown[2] and "weights: list" in shown[2]
    table = pq.read_table(tmp_path / "out")
    llm = LLM(str(tiny_bge_m3), dtype="float32")
    want = {i: o for i, o in zip(ids, llm.encode(TEXTS, pooling_task="all", use_tqdm=False))}
    for row in table.to_pylist():
        expected = want[row["id"]]
        dense = np.asarray(row["dense"], dtype=np.float32)
        assert np.allclose(dense, expected.outputs.data["embed"].numpy(), atol=2e-3)  # float16 storage
        colbert = np.asarray(row["colbert"], dtype=np.float32)
        assert colbert.shape == tuple(expected.outputs.data["token_embed"].shape)
        assert colbert.shape[0] == row["num_tokens"]
        assert np.allclose(colbert, expected.outputs.data["token_embed"].numpy(), atol=2e-3)
        weights = dict(zip(row["sparse"]["token_ids"], row["sparse"]["weights"]))
        assert weights.keys() == expected.outputs.lexical_weights.keys()
        assert all(abs(weights[k] - v) < 1e-5 for k, v in expected.outputs.lexical_weights.items())


def test_an_actor_killed_mid_job_loses_and_duplicates_nothing(ray_cluster, minilm_path, tmp_path):
    crash = tmp_path / "crashed"
    ids = list(range(len(TEXTS)))
    ds = ray.data.from_items(_rows(ids), override_num_blocks=8)
    out = _collect(embed_dataset(
        ds, str(minilm_path), num_replicas=2, num_cpus_per_replica=0.5, batch_size=5, output_dtype="float32",
        dtype="float32", ray_remote_args={"runtime_env": {"env_vars": {CRASH_ONCE_ENV: str(crash)}}}))
    assert crash.exists()  # an actor process did die in the middle of a batch
    assert sorted(out.column("id").to_pylist()) == ids
    got = _by_id(out)
    for i, want in zip(ids, _expected(minilm_path, TEXTS, "token_embed")):
        assert np.allclose(got[i], want.numpy(), atol=1e-5)


def test_embed_dataset_refuses_bad_arguments_before_running(ray_cluster, minilm_path):
    ds = ray.data.from_items(_rows(range(3)))
    with pytest.raises(ValueError, match="text_column 'body' is not a column"):
        embed_dataset(ds, str(minilm_path), text_column="body")
    with pytest.raises(ValueError, match="task must be one of"):
        embed_dataset(ds, str(minilm_path), task="classify")
    with pytest.raises(ValueError, match="num_replicas must be"):
        embed_dataset(ds, str(minilm_path), num_replicas=(3, 1))
    with pytest.raises(ValueError, match="output_dtype must be"):
        embed_dataset(ds, str(minilm_path), output_dtype="bfloat16")


# ----- tokenpool embed-corpus -----

def _write_inputs(folder: pathlib.Path, files: int = 6, rows: int = 30) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        part = [{"id": f * 1000 + i, "text": f"file {f} row {i} " + "words " * (i % 11)} for i in range(rows)]
        if f % 2:
            with open(folder / f"part{f}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in part)
        else:
            pq.write_table(pa.Table.from_pylist(part), folder / f"part{f}.parquet")


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-m", "tokenpool", "embed-corpus", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _outputs(folder: pathlib.Path) -> dict:
    tables = {p.name: pq.read_table(p) for p in sorted(folder.glob("*.parquet"))}
    return {name: (t.column("id").to_pylist(), t.column("embedding").to_pylist()) for name, t in tables.items()}


@pytest.mark.parametrize("how", ["SIGKILL of the process group", "SIGINT to the driver"])
def test_embed_corpus_killed_and_rerun_equals_one_clean_run(minilm_path, tmp_path, how):
    _write_inputs(tmp_path / "in")
    common = ["--model", str(minilm_path), "--dtype", "float32", "--output-dtype", "float32", "--no-progress",
              "--cpus-per-replica", "1"]
    clean = _cli(str(tmp_path / "in"), str(tmp_path / "clean"), *common)
    assert clean.wait(timeout=300) == 0, clean.stdout.read()
    expected = _outputs(tmp_path / "clean")
    assert len(expected) == 6 and sum(len(ids) for ids, _ in expected.values()) == 180

    killed = _cli(str(tmp_path / "in"), str(tmp_path / "out"), *common)
    deadline = time.time() + 240
    while not list((tmp_path / "out").glob("*.parquet")) and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    assert killed.poll() is None, "the job ended before it could be interrupted: the test would prove nothing"
    if how.startswith("SIGKILL"):
        os.killpg(killed.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-job
    else:
        os.kill(killed.pid, signal.SIGINT)  # Ctrl-C
    killed.wait(timeout=120)
    assert killed.returncode == (-signal.SIGKILL if how.startswith("SIGKILL") else 130)
    if how.startswith("SIGINT"):  # one line saying what to do, no traceback
        said = killed.stdout.read()
        assert "interrupted; what is in" in said and "Traceback" not in said, said
    if how.startswith("SIGINT"):
        time.sleep(3)  # the local Ray's processes wind down
    done_before = {p.name for p in (tmp_path / "out").glob("*.parquet")}
    assert done_before and len(done_before) < 6, done_before  # interrupted after some files, before all

    theirs = tmp_path / "out" / "notes.tmp-mine.txt"  # a user's file that looks like a temporary
    theirs.write_text("keep")
    again = _cli(str(tmp_path / "in"), str(tmp_path / "out"), *common)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    # (a file in flight when the driver died may still have been finished by its worker before that exited:
    # its rename is atomic, so it is either complete and skipped, or absent and redone)
    import re

    embedded, done = map(int, re.search(r"(\d+) files embedded .*?, (\d+) already done", out).groups())
    assert embedded + done == 6 and done >= len(done_before) and embedded >= 1, out
    got = _outputs(tmp_path / "out")
    assert got.keys() == expected.keys()
    assert list((tmp_path / "out").glob("*.tmp-*")) == [theirs]  # the job's own temporaries gone, not the user's
    for name, (ids, rows) in expected.items():
        assert got[name][0] == ids  # same rows, same order, no duplicates
        for a, b in zip(got[name][1], rows):
            assert np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)

    third = _cli(str(tmp_path / "in"), str(tmp_path / "out"), *common)  # nothing left to do
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0 and "0 files embedded" in out and "6 already done" in out


def test_embed_corpus_errors_are_one_line(minilm_path, tmp_path):
    _write_inputs(tmp_path / "in", files=1, rows=3)
    proc = _cli(str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(minilm_path), "--text-column", "body",
                "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "no column 'body'" in out
    proc = _cli(str(tmp_path / "nothing-here"), str(tmp_path / "out"), "--model", str(minilm_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "No Parquet or JSONL files" in out and "Traceback" not in out
    # checked on the driver, before Ray starts: a missing model, OUTPUT a file
    (tmp_path / "file.txt").write_text("x")
    for args, message in (([str(tmp_path / "in"), str(tmp_path / "o2"), "--model", str(tmp_path / "nowhere")],
                           "does not exist"),
                          ([str(tmp_path / "in"), str(tmp_path / "file.txt"), "--model", str(minilm_path)],
                           "is a file")):
        proc = _cli(*args, "--no-progress")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and message in out and "Traceback" not in out, out


def test_embed_corpus_files_an_empty_jsonl_keeps_others_temporaries_and_skips_its_output(tmp_path):
    """Without Ray (nothing pending): an empty JSONL reads as an empty table; a rerun removes only its own
    temporaries; OUTPUT inside the input folder is not read as input."""
    from tokenpool.ray import corpus

    (tmp_path / "empty.jsonl").write_text("\n")
    table = corpus.read_input(tmp_path / "empty.jsonl", ["id", "text"])
    assert table.num_rows == 0 and table.column_names == ["id", "text"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
    out = tmp_path / "in" / "emb"  # inside the inputs, as a user may put it
    out.mkdir()
    pq.write_table(pa.table({"id": [1]}), out / "a.parquet")  # a.jsonl is done
    mine, theirs = out / f"b.parquet{corpus.TMP_MARK}{'0' * 32}", out / "keep.tmp-notmine.txt"
    mine.write_text("partial")
    theirs.write_text("a user's file")
    summary = corpus.embed_corpus(str(tmp_path / "in"), str(out), None, progress=False)
    assert summary["skipped"] == 1 and summary["files"] == 0
    assert not mine.exists() and theirs.exists()


# ----- vector stores as sinks -----

def _token_dataset(minilm_path, texts, ids):
    ds = ray.data.from_items(_rows(ids, texts), override_num_blocks=2)
    return embed_dataset(ds, str(minilm_path), num_replicas=1, num_cpus_per_replica=0.5, batch_size=16,
                         output_dtype="float32", dtype="float32")


def _maxsim_ranking(query: np.ndarray, docs: dict) -> list:
    from tokenpool.scoring import maxsim

    return sorted(docs, key=lambda i: -maxsim(query, docs[i]))


def test_lancedb_sink_round_trips_and_ranks_by_maxsim(ray_cluster, minilm_path, tmp_path):
    pytest.importorskip("lancedb")
    from tokenpool.ray import write_lancedb

    ids = [f"doc-{i}" for i in range(12)]
    docs = TEXTS[:12]
    table = write_lancedb(_token_dataset(minilm_path, docs, ids), str(tmp_path / "db"), "passages")
    stored = {r["id"]: np.asarray(r["embedding"], np.float32) for r in table.to_arrow().to_pylist()}
    expected = dict(zip(ids, (t.numpy() for t in _expected(minilm_path, docs, "token_embed"))))
    assert stored.keys() == expected.keys()
    for i in ids:
        assert np.allclose(stored[i], expected[i], atol=1e-6)
    query = _expected(minilm_path, ["late interaction passage"], "token_embed")[0].numpy()
    hits = table.search(query.tolist(), vector_column_name="embedding").limit(5).to_arrow()
    assert hits.column("id").to_pylist() == _maxsim_ranking(query, expected)[:5]
    with pytest.raises(ValueError, match="already exists"):
        write_lancedb(_token_dataset(minilm_path, docs[:2], ids[:2]), str(tmp_path / "db"), "passages")


def test_qdrant_sink_round_trips_and_ranks_by_maxsim(ray_cluster, minilm_path, tiny_bge_m3, tmp_path):
    pytest.importorskip("qdrant_client")
    from tokenpool.ray import write_qdrant
    from tokenpool.ray.sinks import point_id

    ids = [f"doc-{i}" for i in range(12)]
    docs = TEXTS[:12]
    url = os.environ.get("QDRANT_URL")
    where = {"url": url} if url else {"path": str(tmp_path / "qdrant")}
    name = f"passages_{os.getpid()}"
    client = write_qdrant(_token_dataset(minilm_path, docs, ids), name, **where)
    expected = dict(zip(ids, (t.numpy() for t in _expected(minilm_path, docs, "token_embed"))))
    points = client.retrieve(name, ids=[point_id(i) for i in ids], with_vectors=True, with_payload=True)
    assert {p.payload["id"] for p in points} == set(ids)
    for p in points:
        assert np.allclose(np.asarray(p.vector["embedding"], np.float32), expected[p.payload["id"]], atol=1e-5)
    query = _expected(minilm_path, ["late interaction passage"], "token_embed")[0].numpy()
    hits = client.query_points(name, query=query.tolist(), using="embedding", limit=5, with_payload=True).points
    from tokenpool.scoring import maxsim

    assert [h.payload["id"] for h in hits] == _maxsim_ranking(query, expected)[:5]
    assert all(abs(h.score - maxsim(query, expected[h.payload["id"]])) < 1e-3 * abs(h.score) for h in hits)
    # BGE-M3's "all": the colbert multivector plus a dense vector in one collection
    all_ds = embed_dataset(ray.data.from_items(_rows(ids, docs)), str(tiny_bge_m3), task="all", num_replicas=1,
                           num_cpus_per_replica=0.5, output_dtype="float32", dtype="float32")
    write_qdrant(all_ds, name + "_m3", client=client)
    info = client.get_collection(name + "_m3").config.params.vectors
    assert set(info) == {"colbert", "dense"} and info["colbert"].multivector_config is not None
    assert info["colbert"].hnsw_config.m == 0
    if url:
        client.delete_collection(name)
        client.delete_collection(name + "_m3")


def test_qdrant_refuses_a_document_over_its_multivector_cap(ray_cluster, tmp_path):
    pytest.importorskip("qdrant_client")
    from tokenpool.ray import write_qdrant

    big = np.zeros((1025, 1024), np.float32)  # 1,049,600 floats > 1,048,576
    big[:, 0] = 1
    table = pa.table({"id": ["huge"], "num_tokens": pa.array([1025], pa.int32()),
                      "embedding": pa.array([big.tolist()], pa.list_(pa.list_(pa.float32(), 1024)))})
    with pytest.raises(ValueError, match="over Qdrant's 1,048,576-float multivector limit"):
        write_qdrant(ray.data.from_arrow(table), "big", path=str(tmp_path / "q"))


def test_embed_corpus_to_a_lance_table(minilm_path, tmp_path):
    lancedb = pytest.importorskip("lancedb")
    _write_inputs(tmp_path / "in", files=3, rows=10)
    common = ["--model", str(minilm_path), "--dtype", "float32", "--output-dtype", "float32", "--no-progress",
              "--cpus-per-replica", "1"]
    proc = _cli(str(tmp_path / "in"), str(tmp_path / "db"), "--format", "lance", "--table", "passages", *common)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    table = lancedb.connect(str(tmp_path / "db")).open_table("passages").to_arrow()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f * 1000 + i for f in range(3) for i in range(10))  # each row once
    assert not (tmp_path / "db" / "_parts").exists()
    texts = {f * 1000 + i: f"file {f} row {i} " + "words " * (i % 11) for f in range(3) for i in range(10)}
    want = _expected(minilm_path, [texts[i] for i in ids], "token_embed")
    for got, w in zip(table.column("embedding").to_pylist(), want):
        assert np.allclose(np.asarray(got, np.float32), w.numpy(), atol=1e-5)
    again = _cli(str(tmp_path / "in"), str(tmp_path / "db"), "--format", "lance", "--table", "passages", *common)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "0 files embedded" in out


def test_serve_app_checks_its_arguments_on_the_driver(minilm_path):
    from tokenpool.ray import serve_app

    app = serve_app(str(minilm_path), num_replicas=(1, 2), dtype="float32")  # autoscaling between 1 and 2
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="num_replicas must be"):
        serve_app(str(minilm_path), num_replicas=0)
    with pytest.raises(TypeError, match="Unknown engine argument"):
        serve_app(str(minilm_path), dtyp="float32")


def test_the_replica_truncates_when_asked(minilm_path):
    """`truncate_prompt_tokens` (embed-corpus --truncate-prompt-tokens, embed_dataset's keyword) reaches the
    engine: a text over the context keeps its last K tokens; without it the text fails, naming the option."""
    from tokenpool.ray import Embedder

    long_text = " ".join(["word"] * 1000)
    table = pa.table({"id": [1], "text": [long_text]})
    cut = Embedder(str(minilm_path), "token_embed", "text", "id", "float32", None, {"dtype": "float32"},
                   truncate_prompt_tokens=7).embed_table(table)
    assert cut.column("num_tokens").to_pylist() == [7]
    whole = Embedder(str(minilm_path), "token_embed", "text", "id", "float32", None, {"dtype": "float32"})
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        whole.embed_table(table)


def test_lance_refuses_inputs_of_different_id_types_before_any_work(tmp_path):
    pytest.importorskip("lancedb")
    from tokenpool.ray import corpus

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "a"}\n')
    (tmp_path / "in" / "s.jsonl").write_text('{"id": "s0", "text": "b"}\n')
    with pytest.raises(ValueError, match="a.jsonl has int ids, s.jsonl has str ids"):
        corpus.embed_corpus(str(tmp_path / "in"), str(tmp_path / "db"), None, format="lance", progress=False)
    assert not (tmp_path / "db" / "_parts").exists()
    with pytest.raises(ValueError, match="--table must be a plain name"):
        corpus.embed_corpus(str(tmp_path / "in"), str(tmp_path / "db"), None, format="lance", table_name="../x")


def test_a_swallowed_ctrl_c_is_still_an_interrupt():
    """A SIGINT whose KeyboardInterrupt never reaches embed-corpus (raised inside a finalizer, or caught by a
    library) must still end the job as interrupted, not as done: the loop's guard remembers the signal."""
    from tokenpool.ray.corpus import _interrupts_recorded

    before = signal.getsignal(signal.SIGINT)
    with _interrupts_recorded() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        except KeyboardInterrupt:
            pass  # what a swallowing library does
        assert interrupted == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
    with _interrupts_recorded() as quiet:
        pass
    assert quiet == []
