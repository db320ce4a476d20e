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


class GatedEngine(LLMEngine):
    """The engine with test controls on its public `step`: `hold()` makes the next step wait (signalling
    `stepping`) until `release()`; `poison` makes a step whose batch holds that token id fail in the model
    runner; `steps` records the request ids each step finished."""

    def __init__(self, args: EngineArgs):
        super().__init__(args)
        self.stepping = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.steps: list[list[str]] = []
        self.poison: int | None = None
        launch = self.runner.launch

        def launch_or_fail(batch):
            if self.poison is not None and any(self.poison in r.prompt_token_ids for r in batch.requests):
                raise RuntimeError("boom")
            return launch(batch)

        self.runner.launch = launch_or_fail

    def hold(self) -> None:
        self.stepping.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def step(self):
        self.stepping.set()
        self._open.wait()
        outputs = super().step()
        if outputs:
            self.steps.append([o.request_id for o in outputs])
        return outputs


@pytest.fixture
def make_engine(tiny_bge_m3):
    engines: list[AsyncLLMEngine] = []

    def make(**kwargs) -> AsyncLLMEngine:
        engine_kwargs = {k: kwargs.pop(k) for k in ("max_num_seqs",) if k in kwargs}
        args = EngineArgs(model=str(tiny_bge_m3), dtype="float32", **engine_kwargs)
        engine = AsyncLLMEngine(lambda: GatedEngine(args), **kwargs).start()
        engine.engine.steps.clear()  # the warm-up's steps
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def until(condition, timeout: float = 30.0) -> None:
    """Wait for a condition another thread makes true (polled; fails the test after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


async def until_async(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_engine_is_built_and_run_on_its_own_thread(tiny_bge_m3):
    threads = []

    def build():
        threads.append(threading.current_thread().name)
        return LLMEngine(EngineArgs(model=str(tiny_bge_m3), dtype="float32"))

    engine = AsyncLLMEngine(build).start()
    try:
        assert threads == ["tokenpool-engine"]
        assert engine.is_healthy and set(engine.output_shapes) == {"embed", "token_embed", "token_classify", "all"}
        ids = engine.engine.processor(["hello world"])[0]
        out = asyncio.run(engine.encode([ids, ids], ["embed", "token_embed"], PARAMS))
        assert out[0].outputs.data.shape == (64,) and out[1].outputs.data.shape == (len(ids) - 1, 64)
    finally:
        engine.shutdown()
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.encode([ids], "embed", PARAMS))


def test_concurrent_callers_share_batches(make_engine):
    """Callers that arrive while a batch runs are packed together into the next one."""
    engine = make_engine()
    core: GatedEngine = engine.engine
    ids = core.processor(["one", "two two", "three three three"])

    async def main():
        core.hold()
        gate = asyncio.ensure_future(engine.encode([ids[0]], "embed", PARAMS))
        await until_async(core.stepping.is_set)  # the gate's step is waiting to run
        calls = [asyncio.ensure_future(engine.encode([ids[i % 3]], "token_embed", PARAMS)) for i in range(24)]
        await until_async(lambda: engine.num_waiting == 25)
        core.release()
        return await gate, await asyncio.gather(*calls)

    _, outputs = asyncio.run(main())
    assert [len(o) for o in outputs] == [1] * 24
    assert [len(s) for s in core.steps] == [1, 24]  # the gate alone, then everyone who arrived meanwhile
    alone = asyncio.run(engine.encode([ids[2]], "token_embed", PARAMS))[0].outputs.data
    torch.testing.assert_close(outputs[2][0].outputs.data, alone, atol=1e-5, rtol=0)


def test_cancelled_caller_queued_work_is_dropped(make_engine):
    engine = make_engine()
    core: GatedEngine = engine.engine
    ids = core.processor(["gate"])[0]

    async def main():
        core.hold()
        gate = asyncio.ensure_future(engine.encode([ids], "embed", PARAMS))
        await until_async(core.stepping.is_set)
        queued = asyncio.ensure_future(engine.encode([ids] * 5, "token_embed", PARAMS))
        await until_async(lambda: engine.num_waiting == 6)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        core.release()
        return await gate

    assert len(asyncio.run(main())) == 1
    until(lambda: engine.num_waiting == 0)
    assert engine.counters.aborted == 5  # dropped before they ran
    assert sum(len(s) for s in core.steps) == 1 and engine.is_healthy


def test_a_failing_prompt_fails_its_caller_only(make_engine):
    engine = make_engine()
    core: GatedEngine = engine.engine
    core.poison = 7
    good = [[0, 100, 2], [0, 101, 102, 2], [0, 103, 2]]

    async def main():
        core.hold()
        gate = asyncio.ensure_future(engine.encode([good[0]], "embed", PARAMS))
        await until_async(core.stepping.is_set)  # the next callers queue up and share one batch
        calls = [engine.encode([good[1]], "embed", PARAMS), engine.encode([[0, 7, 2]], "embed", PARAMS),
                 engine.encode([good[2], good[0]], "token_embed", PARAMS)]
        futures = [asyncio.ensure_future(c) for c in calls]
        await until_async(lambda: engine.num_waiting == 5)
        core.release()
        return await gate, await asyncio.gather(*futures, return_exceptions=True)

    _, (ok1, bad, ok2) = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)
    assert ok1[0].outputs.data.shape == (64,) and [o.outputs.data.shape[0] for o in ok2] == [2, 2]
    assert engine.counters.failed == 1 and engine.is_healthy


def test_dead_engine_turns_health_to_503(make_engine):
    engine = make_engine(max_consecutive_failures=2)
    app = build_app(engine, ServerConfig())
    with InProcessServer(app) as server:
        assert requests.get(server.url("/health"), timeout=10).status_code == 200
        engine.engine.poison = engine.engine.processor(["hi"])[0][1]  # every batch with "hi" fails
        for _ in range(2):
            response = requests.post(server.url("/pooling"), json={"input": "hi"}, timeout=30)
            assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
        health = requests.get(server.url("/health"), timeout=10)
        assert health.status_code == 503 and "dead" in health.json()["error"]["message"]
        response = requests.post(server.url("/pooling"), json={"input": "hi"}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["type"] == "ServiceUnavailableError"
        metrics = requests.get(server.url("/metrics"), timeout=10).text
        assert "tokenpool_engine_healthy 0.0" in metrics


def test_client_disconnect_drops_its_queued_prompts(make_engine):
    engine = make_engine()
    core: GatedEngine = engine.engine
    app = build_app(engine, ServerConfig())
    with InProcessServer(app) as server:
        core.hold()
        gate = threading.Thread(target=requests.post, args=(server.url("/pooling"),),
                                kwargs={"json": {"input": "gate"}, "timeout": 30})
        gate.start()
        until(core.stepping.is_set)  # the gate's step is held
        body = b'{"input": ["a", "b", "c", "d", "e"]}'
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /pooling HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            until(lambda: engine.num_waiting == 6)  # the five are queued behind the gate
        until(lambda: engine.counters.cancelled == 1)  # the server saw the client go
        core.release()
        gate.join()
        until(lambda: engine.counters.aborted == 5)  # its five prompts dropped, never run
        until(lambda: engine.num_waiting == 0)
        assert sum(len(s) for s in core.steps) == 1
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


def test_bge_m3_route_uses_the_combined_task(make_engine, tiny_bge_m3):
    from tokenpool import LLM

    engine = make_engine()
    core: GatedEngine = engine.engine
    app = build_app(engine, ServerConfig())
    assert app.state.serving.has_combined_task and "all" not in app.state.serving.tasks
    texts = ["Hello world", "dense sparse colbert: retrieval ☃ 42"]
    with InProcessServer(app) as server:
        body = requests.post(server.url("/v1/bge_m3"), json={"input": texts}, timeout=30).json()
    assert [len(s) for s in core.steps] == [2]  # one request per input, one forward pass
    llm = LLM(str(tiny_bge_m3), dtype="float32")
    for item, text in zip(body["data"], texts):
        dense, colbert, sparse = (llm.encode([text], pooling_task=t, use_tqdm=False)[0]
                                  for t in ("embed", "token_embed", "token_classify"))
        torch.testing.assert_close(torch.tensor(item["dense_vecs"]), dense.outputs.data, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(item["colbert_vecs"]), colbert.outputs.data, atol=1e-5, rtol=0)
        assert {w["token_id"]: w["weight"] for w in item["lexical_weights"]} == pytest.approx(
            sparse.outputs.lexical_weights, abs=1e-5)


def test_many_small_batches_with_cancellations(make_engine):
    """With 3 prompts per batch, 30 callers queue ~10 batches in the one scheduler; a cancelled caller's
    prompts are skipped; every answer equals the prompt run alone."""
    engine = make_engine(max_num_seqs=3)
    core: GatedEngine = engine.engine
    ids = core.processor([f"prompt number {i} " * (1 + i % 3) for i in range(30)])
    refs = [asyncio.run(engine.encode([i], "token_embed", PARAMS))[0].outputs.data for i in ids]
    core.steps.clear()

    async def main():
        core.hold()
        gate = asyncio.ensure_future(engine.encode([ids[0]], "embed", PARAMS))
        await until_async(core.stepping.is_set)
        calls = [asyncio.ensure_future(engine.encode([i], "token_embed", PARAMS)) for i in ids]
        dropped = asyncio.ensure_future(engine.encode(ids[:6], "token_embed", PARAMS))
        await until_async(lambda: engine.num_waiting == 37)
        dropped.cancel()
        core.release()
        return await gate, await asyncio.gather(*calls)

    _, outputs = asyncio.run(main())
    for out, ref in zip(outputs, refs):
        torch.testing.assert_close(out[0].outputs.data, ref, atol=1e-5, rtol=0)
    until(lambda: engine.num_waiting == 0)
    assert max(len(s) for s in core.steps) == 3 and sum(len(s) for s in core.steps) == 31
    assert engine.counters.aborted == 6 and engine.is_healthy


def test_load_hint_counts_requests_not_yet_queued(make_engine):
    """The server tells the engine how many model requests are still being read or tokenized (so a step can
    wait a moment for them); the counts go back to zero once the answers are sent."""
    engine = make_engine()
    app = build_app(engine, ServerConfig())
    load = app.state.serving.load
    seen = []
    engine.on_step = lambda stats: seen.append((load.active, load.submitted))
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
        release = threading.Event()
        blocker = asyncio.ensure_future(engine.run_in_tokenizer_thread(release.wait))  # the tokenizer is busy
        await until_async(lambda: not engine.tokenizer_thread.is_free())
        busy = asyncio.ensure_future(engine.run_in_tokenizer_thread(where, inline=True))
        await asyncio.sleep(0)
        assert not busy.done()  # the tiny call queued behind the busy tokenizer instead of running here
        release.set()
        await blocker
        return inline, queued, await busy

    inline, queued, busy = asyncio.run(run())
    assert inline == threading.current_thread().name
    assert queued.startswith("tokenpool-tokenizer") and busy.startswith("tokenpool-tokenizer")
