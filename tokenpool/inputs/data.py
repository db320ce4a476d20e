"""Prompt types, as in `vllm.inputs.data` (typed dicts, so `TextPrompt(prompt=...)` is a plain dict)."""

from __future__ import annotations

from typing import Any, Union

from typing_extensions import NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A text prompt, optionally with multimodal data (`{"image": PIL.Image | list[PIL.Image]}`)."""

    prompt: str
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]


class TokensPrompt(TypedDict):
    """A prompt given as token ids (no tokenization, no special tokens added)."""

    prompt_token_ids: list[int]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]


PromptType = Union[str, TextPrompt, TokensPrompt]
