"""`Request`: one prompt's trip through the engine."""

from __future__ import annotations

import enum
from array import array
import time
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
    """A tokenized prompt with its task and pooling options."""

    request_id: str
    prompt_token_ids: list[int]
    task: str
    params: PoolingParams
    # The same ids as int64 in a C buffer, for fast packing (`np.frombuffer`).
    tokens: array = field(default_factory=lambda: array("q"))
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # Preprocessed images (tokenpool.multimodal.inputs.ImageInputs); taken from the ids when they carry them.
    images: Any = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = array("q", self.prompt_token_ids)
        if self.images is None and type(self.prompt_token_ids) is not list:
            self.images = getattr(self.prompt_token_ids, "images", None)
            if self.images is not None:  # outputs show a plain list
                self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)
