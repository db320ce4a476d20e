"""`Request`: one prompt's trip through the engine."""

from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from tokenpool.pooling_params import PoolingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True)
class Request:
    """A tokenized prompt with its task and pooling options.

    `tokens`: the same ids as int64 in a C buffer (an `array("q")`, or any int64 buffer such as a slice of
    one), for fast packing; made from `prompt_token_ids` unless given (the input processor already made
    one when it validated the ids). `num_tokens` is set once, at creation.
    """

    request_id: str
    prompt_token_ids: list[int]
    task: str
    params: PoolingParams
    tokens: Any = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # Preprocessed images (tokenpool.multimodal.inputs.ImageInputs); taken from the ids when they carry them.
    images: Any = None
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        ids = self.prompt_token_ids
        if type(ids) is not list and self.images is None:
            self.images = getattr(ids, "images", None)
            if self.images is not None:  # outputs show a plain list
                ids = self.prompt_token_ids = list(ids)
        if not self.tokens:
            self.tokens = array("q", ids)
        self.num_tokens = len(ids)
