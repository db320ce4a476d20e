"""`AsyncLLMEngine`: the synchronous engine driven by its own thread, awaited by asyncio handlers.

The trip of one HTTP request:

    handler (event loop) --process--> tokenizer thread         (overlaps the running batch)
    handler --`submit`--> inbox --> engine thread: LLMEngine.add_requests, then LLMEngine.step()
    engine thread --call_soon_threadsafe--> the handler's future resolves with its outputs

- Continuous batching: before every step the engine thread drains the inbox into the core, whose scheduler
  (the only one) packs the prompts of all callers that arrived while the previous batch ran into the next
  one (FCFS, the engine's token budget); on CUDA the core keeps a batch in flight while it launches the next.
- A caller that went away (`encode` cancelled) has its prompts aborted in the core: those not yet running
  are skipped by the scheduler, never computed.
- Errors: a request the core rejects fails its caller only. When a step raises, the core names the requests
  of the failed batch; each is retried alone, so only a prompt that fails alone fails (and only its caller). After
  `max_consecutive_failures` internal errors in a row, or when the loop itself breaks, the engine is dead:
  every waiter gets `EngineDeadError` and `is_healthy` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tokenpool.engine.engine import BatchFailed, LLMEngine
from tokenpool.engine.request import EngineRequest
from tokenpool.engine.tickets import Counters, QueuedPrompt, StepStats, Ticket, reject, resolve
from tokenpool.engine.tokenizer_thread import TokenizerThread
from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.outputs import PoolingRequestOutput
from tokenpool.pooling_params import PoolingParams

logger = logging.getLogger("tokenpool")

_T = TypeVar("_T")
_STOP = object()  # inbox sentinel: stop the loop
_WAKE = object()  # inbox sentinel: a caller cancelled; look at the queue again


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served any more."""



class AsyncLLMEngine:
    """Runs an `LLMEngine` in a background thread; `await encode(...)` from any asyncio task.

    Args:
        engine: a loaded `LLMEngine`, or a function that builds one. Prefer the function (e.g.
            `lambda: LLMEngine(args)`): the engine is then built, warmed up and run on the engine thread,
            so one thread does all of torch's work. (With OpenMP, every thread that runs parallel torch
            ops gets its own worker team; two teams on a small CPU oversubscribe it and a short forward
            pass takes ~50% longer.) Either way only the engine thread calls `add_request` / `step` /
            `abort_requests` once started.
        on_step: called on the engine thread after each step with a `StepStats` (metrics hook).
        max_consecutive_failures: internal (non-input) errors in a row after which the engine is dead.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], *,
                 on_step: Callable[[StepStats], None] | None = None, max_consecutive_failures: int = 8):
        built = hasattr(engine, "step")  # an engine (or a stand-in with the same methods), not a factory
        self._factory = None if built else engine
        self.engine: LLMEngine = engine if built else None  # type: ignore[assignment]
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.on_step = on_step
        self.max_consecutive_failures = max_consecutive_failures
        self.counters = Counters()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._in_inbox = 0  # prompts in the inbox (changed under _count_lock by both threads)
        self._count_lock = threading.Lock()
        self._fed: dict[str, QueuedPrompt] = {}  # engine thread only: prompts in the core, by request id
        self._ids = itertools.count()
        self._failures_in_a_row = 0
        self._last_step_s = 0.0
        # Optional hint from the server: how many callers are about to submit (e.g. being tokenized). While
        # there are some, a step waits a little for them, so they join this batch instead of the next one.
        self.expected_callers: Callable[[], int] | None = None
        self.max_batch_wait_s = 0.005
        self._dead: BaseException | None = None
        self.tokenizer_thread = TokenizerThread()  # every use of the tokenizer goes through it
        self._thread = threading.Thread(target=self._main, name="tokenpool-engine", daemon=True)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._started = False

    # ----- lifecycle -----
    def start(self) -> "AsyncLLMEngine":
        """Start the engine thread; returns once the engine is built and warmed up (re-raises its errors)."""
        if not self._started:
            self._started = True
            self._thread.start()
            self._ready.wait()
            if self._start_error is not None:
                raise self._start_error
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; callers still waiting get `EngineDeadError`."""
        if self._started and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
        self.tokenizer_thread.shutdown()

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._started and self._thread.is_alive()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def num_waiting(self) -> int:
        """Prompts queued and not yet finished (in the inbox or in the core)."""
        return self._in_inbox + len(self._fed)

    @property
    def num_running(self) -> int:
        """Prompts handed to the engine core (scheduled into batches), not yet finished."""
        return len(self._fed)

    @property
    def num_queued(self) -> int:
        """Prompts submitted but not yet handed to the engine core."""
        return self._in_inbox

    # ----- API for handlers (event loop thread) -----
    async def run_in_tokenizer_thread(self, fn: Callable[..., _T], *args: Any, inline: bool = False) -> _T:
        """Run `fn(*args)` on the tokenizer thread (`TokenizerThread.run`; inline for tiny inputs)."""
        return await self.tokenizer_thread.run(fn, *args, inline=inline)

    async def encode(self, prompts: Sequence[ProcessedPrompt | list[int]], task: str | Sequence[str],
                     params: PoolingParams | Sequence[PoolingParams]) -> list[PoolingRequestOutput]:
        """Pool each prompt with `task` (one task for all, or one per prompt); outputs in input order.

        Raises ValueError/TypeError for input the core rejects (the caller's fault), EngineDeadError when
        the engine is gone, other exceptions for internal errors. Cancelling the awaiting task drops the
        prompts that have not started running.
        """
        if not prompts:
            return []
        ticket = self.submit(prompts, task, params)
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise

    def submit(self, prompts: Sequence[ProcessedPrompt | list[int]], task: str | Sequence[str],
               params: PoolingParams | Sequence[PoolingParams]) -> Ticket:
        """Queue processed prompts (or plain token-id lists, validated in the core) now, from the event loop
        thread; await `ticket.future` for the outputs, or `cancel`."""
        self._check_alive()
        n = len(prompts)
        if isinstance(params, PoolingParams):
            params = [params] * n
        tasks = [task] * n if isinstance(task, str) else list(task)
        if n == 0 or len(params) != n or len(tasks) != n:
            raise ValueError(f"Got {n} prompts, {len(params)} PoolingParams and {len(tasks)} tasks.")
        loop = asyncio.get_running_loop()
        group = Ticket(loop.create_future(), loop, [None] * n, n)
        items = [QueuedPrompt(EngineRequest(str(next(self._ids)), prompt, t, p), group, i)
                 for i, (prompt, t, p) in enumerate(zip(prompts, tasks, params))]
        with self._count_lock:
            self._in_inbox += n
        self._inbox.put(items)
        self._check_alive()  # the loop may have died between the first check and `put`
        return group

    def cancel(self, ticket: Ticket) -> None:
        """The caller went away: its prompts that have not started running are dropped."""
        if not ticket.done:
            self.counters.cancelled += 1
            ticket.cancelled = True
            ticket.future.cancel()
            self._inbox.put(_WAKE)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine is dead: {type(self._dead).__name__}: {self._dead}")
        if not self._started:
            raise EngineDeadError("The engine has not been started.")

    # ----- engine thread -----
    def _main(self) -> None:
        try:
            if self._factory is not None:
                self.engine = self._factory()
            self.output_shapes = self._warm_up()
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._start_error = e
            self._dead = e
            self._ready.set()
            return
        self._ready.set()
        self._run()

    def _warm_up(self) -> dict[str, tuple[int, ...]]:
        """Run one tiny prompt per task (first-call costs paid here); each task's output shape for it."""
        engine = self.engine
        prompt = engine.processor.process(["warm up"])[0]
        shapes: dict[str, tuple[int, ...]] = {}
        for n, task in enumerate(engine.supported_tasks):
            engine.add_requests([EngineRequest(f"warmup-{n}", prompt, task, PoolingParams())])
            outputs: list[PoolingRequestOutput] = []
            while engine.has_unfinished_requests():
                outputs += engine.step()
            data = outputs[0].outputs.data
            shapes[task] = tuple(data.shape) if hasattr(data, "shape") else ()
        return shapes

    def _run(self) -> None:
        try:
            while True:
                idle = not self._fed and not self.engine.has_unfinished_requests()
                if not self._take(self._inbox.get() if idle else _WAKE):
                    break
                stop = False
                while not stop:
                    try:
                        stop = not self._take(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if stop or not self._gather():
                    break
                self._drop_cancelled()
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - any escape from the loop kills the engine
            logger.exception("The engine loop died")
            self._die(e)
        else:
            self._die(EngineDeadError("The engine was shut down."))

    def _gather(self) -> bool:
        """Before a step, wait (briefly) for callers the server says are about to submit; False: stop.

        Concurrent clients send their next requests as soon as the previous batch's answers go out; without
        this the first one to arrive would start a step alone and the others would form the next batches.
        The wait is bounded by `max_batch_wait_s` and a quarter of the last step's time, ends when a batch is
        full, and never happens when no caller is expected (a lone request is not delayed).
        """
        hint = self.expected_callers
        if hint is None or not self._fed:
            return True
        engine = self.engine
        deadline = time.perf_counter() + min(self.max_batch_wait_s, 0.25 * self._last_step_s)
        while hint() > 0 and engine.num_waiting_tokens < engine.max_num_batched_tokens:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if not self._take(item):
                return False
        return True

    def _take(self, item: Any) -> bool:
        """Accept one inbox item (a caller's prompts go into the core at once); False means stop."""
        if item is _STOP:
            return False
        if item is not _WAKE:
            with self._count_lock:
                self._in_inbox -= len(item)
            group = item[0].group
            if group.cancelled:
                self.counters.aborted += len(item)
                return True
            try:
                self.engine.add_requests([p.request for p in item])
            except Exception as e:  # noqa: BLE001 - the core rejected these prompts: fail their caller only
                self._fail(group, e)
                return True
            for p in item:
                self._fed[p.request.request_id] = p
        return True

    def _drop_cancelled(self) -> None:
        """Abort in the core the prompts of callers that went away: those not yet running are never run."""
        gone = [rid for rid, p in self._fed.items() if p.group.cancelled and not p.group.done]
        if gone:
            self.counters.aborted += self.engine.abort(gone)
            for rid in gone:
                del self._fed[rid]

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except BatchFailed as e:  # isolate the prompt that broke the batch
            self._recover(e)
            return
        self.counters.steps += 1
        self._last_step_s = time.perf_counter() - t0
        tokens = 0
        for out in outputs:
            prompt = self._fed.pop(out.request_id, None)
            if prompt is None:
                continue
            tokens += len(out.prompt_token_ids)
            self._failures_in_a_row = 0
            group = prompt.group
            if group.done:
                continue
            group.outputs[prompt.index] = out
            group.remaining -= 1
            if group.remaining == 0:
                group.done = True
                group.loop.call_soon_threadsafe(resolve, group.future, group.outputs)
        if outputs and self.on_step is not None:
            self.on_step(StepStats(len(outputs), tokens, time.perf_counter() - t0))

    def _recover(self, failure: BatchFailed) -> None:
        """A step raised: retry each prompt of the failed batch alone; a prompt that fails alone fails its caller."""
        error = failure.__cause__ or failure
        broken = [self._fed.pop(rid) for rid in failure.request_ids if rid in self._fed]
        broken = [p for p in broken if not p.group.done]
        if len(failure.request_ids) <= 1:
            logger.warning("Request failed in the engine: %s: %s", type(error).__name__, error)
            if broken:
                self.counters.failed += 1
                self._fail(broken[0].group, error)
            if not isinstance(error, (ValueError, TypeError)):
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= self.max_consecutive_failures:
                    raise EngineDeadError(
                        f"{self._failures_in_a_row} engine steps failed in a row; last error: "
                        f"{type(error).__name__}: {error}"
                    ) from error
            return
        logger.warning("A batch of %d prompts failed (%s: %s); retrying them one by one",
                       len(failure.request_ids), type(error).__name__, error)
        retry = []
        for prompt in broken:
            old = prompt.request
            prompt.request = EngineRequest(str(next(self._ids)), old.prompt, old.task, old.params, alone=True)
            retry.append(prompt)
        # Ahead of everything else waiting: these prompts were scheduled first.
        self.engine.add_requests([p.request for p in retry], front=True)
        for p in retry:
            self._fed[p.request.request_id] = p

    def _fail(self, group: Ticket, error: BaseException) -> None:
        if group.done:
            return
        group.done = True
        group.loop.call_soon_threadsafe(reject, group.future, error)

    def _die(self, error: BaseException) -> None:
        self._dead = error
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"The engine is dead: {type(error).__name__}: {error}")
        groups = {p.group for p in self._fed.values()}
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, list):
                groups.update(p.group for p in item)
        self._fed.clear()
        for group in groups:
            try:
                self._fail(group, dead)
            except RuntimeError:  # the group's event loop is closed
                pass
