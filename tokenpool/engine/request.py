"""`Request`: one prompt's trip through the engine; `EngineRequest`: what callers hand the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.pooling_params import PoolingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True)
class EngineRequest:
    """A processed prompt with its task and options (`LLMEngine.add_requests`; picklable).

    alone: run it in a batch of its own (the async engine retries the prompts of a failed batch so).
    """

    request_id: str
    prompt: ProcessedPrompt
    task: str
    params: PoolingParams
    alone: bool = False


@dataclass(slots=True)
class Request:
    """An `EngineRequest` inside the engine: its status and arrival time; `num_tokens` is set once."""

    request_id: str
    prompt: ProcessedPrompt
    task: str
    params: PoolingParams
    alone: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prompt.token_ids

    @property
    def tokens(self):
        return self.prompt.tokens

    @property
    def images(self):
        return self.prompt.images
