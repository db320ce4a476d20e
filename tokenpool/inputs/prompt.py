"""`ProcessedPrompt`: a prompt as the engine takes it (leaf module)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ProcessedPrompt:
    """A validated, tokenized prompt.

    token_ids: the ids the model sees (image placeholders expanded), as `prompt_token_ids` in the outputs;
    tokens: the same ids as int64 in a C buffer (`array("q")`), for fast packing, made here unless the
    input processor already made one while validating; images: the preprocessed images of a prompt with
    images (`tokenpool.multimodal.types.ImageInputs`), else None.
    """

    token_ids: list[int]
    tokens: Any = None
    images: Any = None

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = array("q", self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)
