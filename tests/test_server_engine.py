"""The async engine and the app in-process: continuous batching of concurrent callers, cancelled and
disconnected callers' queued work dropped, one bad prompt failing alone, a dead engine turning /health
into 503; and the numpy wire conversions against torch's."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
import requests
import torch

from tests.server_fixtures import InProcessServer
from tokenpool import EngineArgs, PoolingParams
from tokenpool.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tokenpool.engine.engine import LLMEngine
from tokenpool.entrypoints.server import ServerConfig, build_app
from tokenpool.entrypoints.server.encoding import bfloat16_bits, to_array

PARAMS = PoolingParams()


@pytest.fixture
def make_engine(tiny_bge_m3):
    engines: list[AsyncLLMEngine] = []

    def make(step_delay: float = 0.0, **kwargs) -> AsyncLLMEngine:
        engine = AsyncLLMEngine(lambda: LLMEngine(EngineArgs(model=str(tiny_bge_m3), dtype="float32")), **kwargs).start()
        if step_delay:
            slow_down(engine, step_delay)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def slow_down(engine: AsyncLLMEngine, delay: float) -> None:
    core = engine.engine
    step = core.step

    def slow_step():
        time.sleep(delay)
        return step()

    core.step = slow_step


def count_added(engine: AsyncLLMEngine) -> list[str]:
    core = engine.engine
    added: list[str] = []
    add = core.add_request

    def counting_add(request_id, *args):
        added.append(request_id)
        return add(request_id, *args)

    core.add_request = counting_add
    return added


def test_engine_is_built_and_run_on_its_own_thread(tiny_bge_m3):
    threads = []

    def build():
        threads.append(threading.current_thread().name)
        return LLMEngine(EngineArgs(model=str(tiny_bge_m3), dtype="float32"))

    engine = AsyncLLMEngine(build).start()
    try:
        assert threads == ["tokenpool-engine"]
        assert engine.is_healthy and set(engine.output_shapes) == {"embed", "token_embed", "token_classify", "all"}
        ids = engine.engine.inputs(["hello world"])[0]
        out = asyncio.run(engine.encode([ids, ids], ["embed", "token_embed"], PARAMS))
        assert out[0].outputs.data.shape == (64,) and out[1].outputs.data.shape == (len(ids) - 1, 64)
    finally:
        engine.shutdown()
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.encode([ids], "embed", PARAMS))


def test_concurrent_callers_share_batches(make_engine):
    engine = make_engine(step_delay=0.05)
    steps = []
    engine.on_step = steps.append
    ids = engine.engine.inputs(["one", "two two", "three three three"])

    async def main():
        return await asyncio.gather(*[engine.encode([ids[i % 3]], "token_embed", PARAMS) for i in range(24)])

    outputs = asyncio.run(main())
    assert [len(o) for o in outputs] == [1] * 24
    assert sum(s.num_requests for s in steps) == 24
    assert len(steps) < 12 and max(s.num_requests for s in steps) > 1
    alone = asyncio.run(engine.encode([ids[2]], "token_embed", PARAMS))[0].outputs.data
    torch.testing.assert_close(outputs[2][0].outputs.data, alone, atol=1e-5, rtol=0)


def test_cancelled_caller_queued_work_is_dropped(make_engine):
    engine = make_engine(step_delay=0.3)
    added = count_added(engine)
    ids = engine.engine.inputs(["gate"])[0]

    async def main():
        gate = asyncio.ensure_future(engine.encode([ids], "embed", PARAMS))
        while not added:  # the gate's step is running now
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(engine.encode([ids] * 5, "token_embed", PARAMS))
        await asyncio.sleep(0.02)
        queued.cancel()
        result = await gate
        with pytest.raises(asyncio.CancelledError):
            await queued
        await asyncio.sleep(0.1)
        return result

    assert len(asyncio.run(main())) == 1
    assert engine.counters.aborted == 5 and len(added) == 1  # the five never reached the core
    assert engine.num_waiting == 0 and engine.is_healthy


def test_a_failing_prompt_fails_its_caller_only(make_engine):
    engine = make_engine()
    core = engine.engine
    poison = 7
    step = core.step
    first = threading.Event()

    def flaky_step():
        if not first.is_set():  # hold the first batch so the next callers queue up and share one batch
            first.set()
            time.sleep(0.2)
        if any(poison in r.prompt_token_ids for r in core.scheduler.waiting):
            raise RuntimeError("boom")
        return step()

    core.step = flaky_step
    good = [[0, 100, 2], [0, 101, 102, 2], [0, 103, 2]]

    async def main():
        gate = asyncio.ensure_future(engine.encode([good[0]], "embed", PARAMS))
        while not first.is_set():
            await asyncio.sleep(0.005)
        calls = [engine.encode([good[1]], "embed", PARAMS), engine.encode([[0, poison, 2]], "embed", PARAMS),
                 engine.encode([good[2], good[0]], "token_embed", PARAMS)]
        return await gate, await asyncio.gather(*calls, return_exceptions=True)

    _, (ok1, bad, ok2) = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)
    assert ok1[0].outputs.data.shape == (64,) and [o.outputs.data.shape[0] for o in ok2] == [2, 2]
    assert engine.counters.failed == 1 and engine.is_healthy


def test_dead_engine_turns_health_to_503(make_engine):
    engine = make_engine(max_consecutive_failures=2)
    app = build_app(engine, ServerConfig())

    def broken_step():
        raise RuntimeError("device lost")

    with InProcessServer(app) as server:
        assert requests.get(server.url("/health"), timeout=10).status_code == 200
        engine.engine.step = broken_step
        for _ in range(2):
            response = requests.post(server.url("/pooling"), json={"input": "hi"}, timeout=30)
            assert response.status_code == 500 and "device lost" in response.json()["error"]["message"]
        health = requests.get(server.url("/health"), timeout=10)
        assert health.status_code == 503 and "dead" in health.json()["error"]["message"]
        response = requests.post(server.url("/pooling"), json={"input": "hi"}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["type"] == "ServiceUnavailableError"
        metrics = requests.get(server.url("/metrics"), timeout=10).text
        assert "tokenpool_engine_healthy 0.0" in metrics


def test_client_disconnect_drops_its_queued_prompts(make_engine):
    engine = make_engine(step_delay=0.4)
    added = count_added(engine)
    app = build_app(engine, ServerConfig())
    with InProcessServer(app) as server:
        gate = threading.Thread(target=requests.post, args=(server.url("/pooling"),),
                                kwargs={"json": {"input": "gate"}, "timeout": 30})
        gate.start()
        while not added:  # the gate's step is running
            time.sleep(0.005)
        body = b'{"input": ["a", "b", "c", "d", "e"]}'
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /pooling HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
        gate.join()
        deadline = time.monotonic() + 5
        while engine.counters.aborted < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.counters.aborted == 5 and len(added) == 1
        metrics = requests.get(server.url("/metrics"), timeout=10).text
        assert "tokenpool_aborted_prompts 5.0" in metrics


def test_numpy_wire_conversions_equal_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(4096).astype(np.float32),
        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, -1e-45, np.inf, -np.inf],
                 dtype=np.float32),
        (rng.standard_normal(512) * 1e5).astype(np.float32),
    ])
    tensor = torch.from_numpy(values.copy())
    torch_bf16 = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_bits(values), torch_bf16)
    torch_f16 = tensor.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_array(tensor, "float16").view(np.uint16), torch_f16)
    nan = bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()
    swapped = to_array(tensor[:4], "float32", "big")
    assert swapped.tobytes() == values[:4].astype(">f4").tobytes()


def test_bge_m3_route_uses_the_combined_task_when_the_core_has_it(tiny_bge_m3):
    from tokenpool import LLM

    holder = []

    def build():
        holder.append(LLMEngine(EngineArgs(model=str(tiny_bge_m3), dtype="float32")))
        real_add = holder[0].add_request
        holder[0].submitted = []

        def add_request(request_id, prompt_token_ids, task, params):
            holder[0].submitted.append(task)
            return real_add(request_id, prompt_token_ids, task, params)

        holder[0].add_request = add_request
        return holder[0]

    engine = AsyncLLMEngine(build)
    app = build_app(engine, ServerConfig())
    assert app.state.serving.has_combined_task and "all" not in app.state.serving.tasks
    texts = ["Hello world", "dense sparse colbert: retrieval ☃ 42"]
    with InProcessServer(app) as server:
        holder[0].submitted.clear()
        body = requests.post(server.url("/v1/bge_m3"), json={"input": texts}, timeout=30).json()
    assert holder[0].submitted == ["all", "all"]  # one request per input
    llm = LLM(str(tiny_bge_m3), dtype="float32")
    for item, text in zip(body["data"], texts):
        dense, colbert, sparse = (llm.encode([text], pooling_task=t, use_tqdm=False)[0]
                                  for t in ("embed", "token_embed", "token_classify"))
        torch.testing.assert_close(torch.tensor(item["dense_vecs"]), dense.outputs.data, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(item["colbert_vecs"]), colbert.outputs.data, atol=1e-5, rtol=0)
        assert {w["token_id"]: w["weight"] for w in item["lexical_weights"]} == pytest.approx(
            sparse.outputs.lexical_weights, abs=1e-5)


def test_two_batches_ahead_as_on_cuda(make_engine):
    """On CUDA the engine thread keeps a second batch waiting in the core (for its launch/finish overlap)."""
    engine = make_engine(step_delay=0.02)
    engine._batches_ahead = 2
    core = engine.engine
    core.scheduler.max_num_seqs = 3  # small batches, so that many are queued at once
    ids = core.inputs([f"prompt number {i} " * (1 + i % 3) for i in range(30)])
    refs = [asyncio.run(engine.encode([i], "token_embed", PARAMS))[0].outputs.data for i in ids]

    async def main():
        gate = asyncio.ensure_future(engine.encode([ids[0]], "embed", PARAMS))
        await asyncio.sleep(0.005)
        calls = [engine.encode([i], "token_embed", PARAMS) for i in ids]
        dropped = asyncio.ensure_future(engine.encode(ids[:6], "token_embed", PARAMS))
        await asyncio.sleep(0)
        dropped.cancel()
        return await gate, await asyncio.gather(*calls)

    _, outputs = asyncio.run(main())
    for out, ref in zip(outputs, refs):
        torch.testing.assert_close(out[0].outputs.data, ref, atol=1e-5, rtol=0)
    assert engine.num_waiting == 0 and engine.is_healthy


def test_load_hint_counts_requests_not_yet_queued(make_engine):
    """The server tells the engine how many model requests are still being read or tokenized (so a step can
    wait a moment for them); the counts go back to zero once the answers are sent."""
    engine = make_engine(step_delay=0.05)
    app = build_app(engine, ServerConfig())
    load = app.state.serving.load
    seen = []
    step = engine.engine.step

    def observing_step():
        seen.append((load.active, load.submitted))
        return step()

    engine.engine.step = observing_step
    with InProcessServer(app) as server:
        def one(i):
            body = {"input": f"text number {i}", "task": "embed"}
            return requests.post(server.url("/pooling"), json=body, timeout=30).status_code

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(16))) == [200] * 16
        assert load.active == 0 and load.submitted == 0 and load.expected() == 0
    assert max(submitted for _, submitted in seen) >= 1
    assert all(active >= submitted for active, submitted in seen)


def test_tiny_tokenizer_calls_run_inline_only_when_the_tokenizer_is_free(make_engine):
    engine = make_engine()
    where = lambda: threading.current_thread().name  # noqa: E731

    async def run():
        inline = await engine.run_in_tokenizer_thread(where, inline=True)
        queued = await engine.run_in_tokenizer_thread(where)
        with engine._tokenizer_lock:  # the tokenizer thread is busy: the tiny call queues behind it
            busy = asyncio.ensure_future(engine.run_in_tokenizer_thread(where, inline=True))
            await asyncio.sleep(0.05)
            assert not busy.done()
        return inline, queued, await busy

    inline, queued, busy = asyncio.run(run())
    assert inline == threading.current_thread().name
    assert queued.startswith("tokenpool-tokenizer") and busy.startswith("tokenpool-tokenizer")
