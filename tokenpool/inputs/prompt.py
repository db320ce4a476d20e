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
    images (`tokenpool.multimodal.types.ImageInputs`), else None. ColBERT modes: num_keys: only the first
    `num_keys` rows are attention keys (a query's expansion positions read the text but are not read), None
    for all; keep_rows: the rows the output is made of (a document without its skiplist tokens), None for all.
    """

    token_ids: list[int]
    tokens: Any = None
    images: Any = None
    num_keys: int | None = None
    keep_rows: list[int] | None = None

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = array("q", self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)
