"""HTTP server benchmark (CPU, MiniLM by default), against the offline `LLM.encode` in the same run.

    python bench/bench_server.py [--model PATH] [--clients 16] [--docs 192]

Measures, and prints as one table:
  1. cold start: from launching `tokenpool serve` to the first 200 answer of /pooling;
  2. latency of one short /pooling request (token_embed, float), one client, keep-alive: p50 / p99;
  3. throughput of /pooling token_embed with `--clients` concurrent clients (one document per request) for
     encoding_format float, base64 and bytes, each against `LLM.encode` over the same documents (all at
     once) measured in this process just before it, while the server idles.
Clients read every answer in full but decode only the first of each run (checked for shape): decoding JSON
floats in Python would measure the client, and the clients share the machine with the server.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import platform
import queue
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

SHORT = "What is late interaction?"
WORDS = ("retrieval token embedding vector query document passage model server batch dense sparse late "
         "interaction score cosine similarity search index ranking engine pooling attention layer the a of "
         "to and in is for on with as by from that this are be at it an").split()


def make_docs(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request("POST", "/pooling", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read(), response


def start_server(model: str | None, port: int, extra: list[str]) -> tuple[subprocess.Popen, float, str]:
    """Launch the server; return it, the seconds from launch to the first 200 of /pooling, and its log path."""
    log_path = f"/tmp/tokenpool-bench-server-{port}.log"
    cmd = [sys.executable, "-m", "tokenpool", "serve", *([model] if model else []), "--host", "127.0.0.1",
           "--port", str(port), *extra]
    body = json.dumps({"input": SHORT}).encode()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            status, _, _ = post(conn, body)
            conn.close()
            if status == 200:
                return proc, time.perf_counter() - t0, log_path
        except OSError:
            pass
        if time.perf_counter() - t0 > 120:
            proc.kill()
            raise RuntimeError(f"server did not answer in 120 s: see {log_path}")
        time.sleep(0.005)


def latency(port: int, n: int, rounds: int) -> tuple[float, float]:
    """p50 and p99 (ms) of one short request at a time, keep-alive; the round with the best p50 is kept
    (on a shared machine, other tenants' bursts only ever add time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"input": SHORT}).encode()
    for _ in range(20):
        post(conn, body)
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            status, _, _ = post(conn, body)
            times.append(time.perf_counter() - t)
            assert status == 200
        times.sort()
        result = (statistics.median(times) * 1e3, times[min(n - 1, int(round(0.99 * n)) - 1)] * 1e3)
        best = min(best, result)
    conn.close()
    return best


def check_first(fmt: str, payload: bytes, response: http.client.HTTPResponse, width: int) -> None:
    if fmt == "bytes":
        meta = json.loads(response.getheader("metadata"))
        shape = meta["data"][0]["shape"]
        assert len(payload) == shape[0] * shape[1] * 4 and shape[1] == width, shape
    else:
        item = json.loads(payload)["data"][0]
        if fmt == "base64":
            assert len(base64.b64decode(item["data"])) == item["shape"][0] * width * 4
        else:
            assert len(item["data"][0]) == width


def throughput(port: int, docs: list[str], clients: int, fmt: str, width: int) -> float:
    """Documents per second over HTTP: `clients` threads, one document per request, keep-alive."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for doc in docs:
        work.put(json.dumps({"input": doc, "task": "token_embed", "encoding_format": fmt}).encode())
    errors: list[str] = []
    first = threading.Lock()
    checked = [False]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                break
            status, payload, response = post(conn, body)
            if status != 200:
                errors.append(payload[:200].decode(errors="replace"))
            elif not checked[0]:
                with first:
                    if not checked[0]:
                        check_first(fmt, payload, response, width)
                        checked[0] = True
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return len(docs) / elapsed


def offline_llm(model: str | None, dtype: str, docs: list[str]):
    from tokenpool import LLM

    llm = LLM(model, dtype=dtype)
    llm.encode(docs[:16], pooling_task="token_embed", use_tqdm=False)  # warm up
    return llm


def offline(llm, docs: list[str], repeats: int) -> tuple[float, int]:
    """Documents per second of `LLM.encode` over all the documents at once (best of `repeats`)."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outputs = llm.encode(docs, pooling_task="token_embed", use_tqdm=False)
        best = max(best, len(docs) / (time.perf_counter() - t0))
    return best, sum(len(o.prompt_token_ids) for o in outputs)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def batch_stats(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("tokenpool_batch_size_requests_sum", "tokenpool_batch_size_requests_count",
                     "tokenpool_batch_size_tokens_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    steps = values.get("tokenpool_batch_size_requests_count", 0) or 1
    return (f"{values.get('tokenpool_batch_size_requests_sum', 0) / steps:.1f} prompts, "
            f"{values.get('tokenpool_batch_size_tokens_sum', 0) / steps:.0f} tokens per engine step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the built-in all-MiniLM-L6-v2).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--docs", type=int, default=192, help="Documents per throughput run.")
    parser.add_argument("--min-words", type=int, default=16)
    parser.add_argument("--max-words", type=int, default=160)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="Latency rounds and throughput runs per mode "
                                                                    "(the best is kept).")
    parser.add_argument("--dtype", default="auto", help="Engine dtype, for the server and the offline baseline.")
    parser.add_argument("--server-args", default="--disable-uvicorn-access-log",
                        help="Extra `tokenpool serve` arguments.")
    args = parser.parse_args()

    docs = make_docs(args.docs, args.min_words, args.max_words)
    port = free_port()
    proc, cold, log_path = start_server(args.model, port, ["--dtype", args.dtype, *args.server_args.split()])
    try:
        p50, p99 = latency(port, args.latency_requests, args.repeats)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        _, payload, _ = post(conn, json.dumps({"input": SHORT, "task": "embed"}).encode())
        width = len(json.loads(payload)["data"][0]["data"])
        # The offline baseline runs right before each served mode (the server idle meanwhile), so that
        # each pair is measured under the same conditions on a machine other work may share.
        llm = offline_llm(args.model, args.dtype, docs)
        rows: dict[str, tuple[float, float]] = {}
        for fmt in ("float", "base64", "bytes"):
            base, tokens = offline(llm, docs, args.repeats)
            throughput(port, docs[:32], args.clients, fmt, width)  # warm up
            served = max(throughput(port, docs, args.clients, fmt, width) for _ in range(args.repeats))
            rows[fmt] = (base, served)
        batches = batch_stats(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tokens_per_doc = tokens / len(docs)

    print(f"\ntokenpool server benchmark  {datetime.date.today()}  {cpu_name()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {__import__('torch').__version__}")
    print(f"model: {args.model or 'all-MiniLM-L6-v2 (built-in default)'}, dtype {args.dtype}; {len(docs)} documents, "
          f"{tokens_per_doc:.0f} tokens each on average; {args.clients} clients, 1 document per request; "
          f"server args: {args.server_args or '(none)'}")
    print(f"{'measure':<46} {'value':>14} {'goal':>12}")
    print("-" * 92)
    print(f"{'cold start: launch -> first 200 of /pooling':<46} {cold:>12.2f} s {'<= 5 s':>12}")
    print(f"{'short /pooling request, p50':<46} {p50:>11.2f} ms {'<= 4 ms':>12}")
    print(f"{'short /pooling request, p99':<46} {p99:>11.2f} ms {'':>12}")
    for fmt, (base, served) in rows.items():
        goal = ">= 80%" if fmt != "float" else ""
        label = f"HTTP /pooling token_embed, {fmt}"
        print(f"{label:<46} {served:>8.1f} doc/s {goal:>12}  {100 * served / base:5.1f}% of offline "
              f"LLM.encode measured just before ({base:.1f} doc/s)")
    print(f"(server: {batches}; offline {tokens_per_doc * rows['bytes'][0]:.0f} tokens/s)")


if __name__ == "__main__":
    main()
