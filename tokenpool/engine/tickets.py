"""What the async engine's two threads share about each caller: tickets, queued prompts, counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tokenpool.engine.request import EngineRequest
from tokenpool.outputs import PoolingRequestOutput


@dataclass(slots=True)
class StepStats:
    """What one engine step ran (for metrics): prompts and tokens fed, wall time of the step."""

    num_requests: int
    num_tokens: int
    seconds: float


@dataclass(slots=True, eq=False)
class Ticket:
    """One caller's prompts (what `submit` hands back): they finish together, fail together and are dropped
    together; `.future` resolves to their outputs."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    outputs: list[PoolingRequestOutput | None]
    remaining: int
    cancelled: bool = False  # set by the event loop thread when the caller went away
    done: bool = False  # set by the engine thread once the future has been resolved or failed


@dataclass(slots=True, eq=False)
class QueuedPrompt:
    """One prompt of a group, as the engine thread tracks it."""

    request: EngineRequest
    group: Ticket
    index: int


@dataclass
class Counters:
    """What happened to the prompts, for metrics and tests."""

    cancelled: int = 0  # callers that went away before their answer (event loop thread)
    aborted: int = 0  # prompts dropped before running because their caller went away
    failed: int = 0  # prompts that failed in the engine
    steps: int = 0


def resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def reject(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
