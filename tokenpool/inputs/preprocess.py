"""Prompts -> token ids: validation, batched tokenization, truncation, context-length checks."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokenpool.inputs.data import PromptType
from tokenpool.inputs.prompt import ProcessedPrompt


class InputProcessor:
    """Turns user prompts into token id lists for one model.

    Truncation follows vLLM: `truncate_prompt_tokens=k` keeps the LAST k tokens (left truncation; for text
    the tokenizer truncates from the left and keeps the special tokens); `-1` means the model's context.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int, do_lower_case: bool = False,
                 image_processor: Any = None, colbert: Any = None):
        self.tokenizer = tokenizer
        self.colbert = colbert  # tokenpool.loader.colbert.ColbertIds: query / document modes
        self.image_processor = image_processor  # tokenpool.multimodal.inputs.ImagePromptProcessor
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.do_lower_case = do_lower_case
        self.supports_images = image_processor is not None
        if tokenizer is not None:
            tokenizer.truncation_side = "left"
            # Lengths are checked here, with vLLM's message; silence the tokenizer's own warning.
            tokenizer.model_max_length = 1 << 40

    def __call__(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                 add_special_tokens: bool = True, first_index: int = 0) -> list[list[int]]:
        """Token ids of each prompt. `first_index` numbers the prompts in error messages."""
        return [p.token_ids for p in self.process(prompts, truncate_prompt_tokens, add_special_tokens, first_index)]

    def process(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                add_special_tokens: bool = True, first_index: int = 0,
                input_types: Sequence[str | None] | None = None) -> list[ProcessedPrompt]:
        """Each prompt validated and tokenized, images preprocessed: what `LLMEngine.add_requests` takes.

        input_types: per prompt, "query" / "document" / None (a document), for ColBERT models; ignored by
        models without modes (as sentence-transformers ignores them)."""
        limit = self._truncation_limit(truncate_prompt_tokens)
        if self.colbert is not None:
            return self._process_colbert(prompts, limit, first_index, input_types)
        if self.image_processor is None:
            fast = self._token_prompts(prompts, limit)
            if fast is not None:
                return list(map(ProcessedPrompt, *fast))
        return [p if isinstance(p, ProcessedPrompt) else ProcessedPrompt(p)
                for p in self._process(prompts, limit, add_special_tokens, first_index)]

    def _token_prompts(self, prompts: Sequence[PromptType], limit: int | None) -> tuple[list[list[int]], list[array]] | None:
        """The fast path for lists of `{"prompt_token_ids": list}` prompts: one conversion of the ids to int64
        per prompt, one range check for all. None when any prompt is something else or fails a check: the
        general path then handles them, and raises its errors."""
        lists: list[list[int]] = []
        append = lists.append
        try:
            for prompt in prompts:
                if type(prompt) is not dict or len(prompt) != 1:
                    return None
                ids = prompt["prompt_token_ids"]
                if type(ids) is not list:
                    return None
                append(ids)
            packed = [array("q", ids) for ids in lists]
        except (KeyError, TypeError, OverflowError):
            return None
        joined = b"".join(packed)
        # One unsigned max catches both ends: negative ids wrap around to huge values.
        if joined and int(np.frombuffer(joined, dtype=np.uint64).max()) >= self.vocab_size:
            return None
        if limit is not None:
            for j, ids in enumerate(lists):
                if len(ids) > limit:
                    lists[j], packed[j] = ids[-limit:], packed[j][-limit:]
        lengths = list(map(len, lists))
        if lengths and (min(lengths) == 0 or max(lengths) > self.max_model_len):
            return None
        return lists, packed

    def _process(self, prompts: Sequence[PromptType], limit: int | None, add_special_tokens: bool,
                 first_index: int) -> list[list[int] | ProcessedPrompt]:
        texts: dict[int, str] = {}
        images: dict[int, tuple[list, dict | None]] = {}
        result: list[list[int] | None] = [None] * len(prompts)
        for j, prompt in enumerate(prompts):
            i = first_index + j
            if isinstance(prompt, str):
                texts[j] = prompt
            elif isinstance(prompt, dict):
                if prompt.get("multi_modal_data"):
                    if not self.supports_images:
                        raise ValueError("This model does not accept multimodal inputs (multi_modal_data was given).")
                    from tokenpool.multimodal.inputs import as_image_list

                    images[j] = (as_image_list(prompt["multi_modal_data"], i), prompt.get("mm_processor_kwargs"))
                if "prompt_token_ids" in prompt:
                    result[j] = self._check_ids(prompt["prompt_token_ids"], i, None if j in images else limit)
                elif "prompt" in prompt and isinstance(prompt["prompt"], str):
                    if j not in images:
                        texts[j] = prompt["prompt"]
                    else:
                        result[j] = self.tokenize([prompt["prompt"]], None, add_special_tokens)[0]
                else:
                    raise ValueError(
                        f"Prompt {i} is a dict without 'prompt' (str) or 'prompt_token_ids' (list[int]): "
                        f"keys {sorted(prompt)}."
                    )
            else:
                raise TypeError(
                    f"Prompt {i} has type {type(prompt).__name__}; expected str, TextPrompt or TokensPrompt."
                )
        if texts:
            for j, ids in zip(texts, self.tokenize(list(texts.values()), limit, add_special_tokens)):
                result[j] = ids
        for j, ids in enumerate(result):
            i = first_index + j
            if j in images:
                processed = result[j] = self.image_processor(ids, *images[j], i)
                ids = processed.token_ids
                if limit is not None and len(ids) > limit:
                    raise ValueError(f"Prompt {i} has {len(ids)} tokens with its images expanded; prompts with images "
                                     f"are not truncated (truncate_prompt_tokens={limit}).")
            elif self.image_processor is not None:
                self.image_processor.check_text_only(ids, i)
            self.check_length(ids, i)  # type: ignore[arg-type]
        return result  # type: ignore[return-value]

    def _process_colbert(self, prompts: Sequence[PromptType], limit: int | None, first_index: int,
                         input_types: Sequence[str | None] | None) -> list[ProcessedPrompt]:
        """Texts in their mode: [first, marker] + text ids (truncated to the mode's length, and to `limit`) +
        [last], queries expanded with the mask token; a prompt (sentence-transformers 6's markers) is prepended
        to the text. Token-id prompts are taken as the model's input as they are (markers included, no
        expansion); the skiplist applies to both."""
        colbert = self.colbert
        modes = list(input_types) if input_types is not None else [None] * len(prompts)
        texts: dict[int, str] = {}
        given: dict[int, list[int]] = {}
        for j, prompt in enumerate(prompts):
            i = first_index + j
            if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
                raise ValueError("This model does not accept multimodal inputs (multi_modal_data was given).")
            if isinstance(prompt, str):
                texts[j] = prompt
            elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                given[j] = self._check_ids(prompt["prompt_token_ids"], i, limit)
            elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
                texts[j] = prompt["prompt"]
            else:
                raise ValueError(f"Prompt {i} must be a str, a TextPrompt or a TokensPrompt.")
        out: list[ProcessedPrompt | None] = [None] * len(prompts)
        if texts:
            prompted = [colbert.prompt(modes[j] or "document") + text for j, text in texts.items()]
            for j, ids in zip(texts, self.tokenize(prompted, None, add_special_tokens=False)):
                token_ids, num_keys, keep = colbert.build(ids, modes[j] or "document", limit)
                out[j] = ProcessedPrompt(token_ids, num_keys=num_keys, keep_rows=keep)
        for j, ids in given.items():
            out[j] = ProcessedPrompt(ids, keep_rows=colbert.kept_rows(ids, modes[j] or "document"))
        for j, p in enumerate(out):
            self.check_length(p.token_ids, first_index + j)
        return out  # type: ignore[return-value]

    def tokenize(self, texts: list[str], limit: int | None = None, add_special_tokens: bool = True) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("This engine has no tokenizer; pass TokensPrompt(prompt_token_ids=...).")
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        # Only the ids are used: no attention masks or token type ids built per text.
        kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens, "return_attention_mask": False,
                                  "return_token_type_ids": False}
        if limit is not None:
            kwargs.update(truncation=True, max_length=limit)
        return self.tokenizer(texts, **kwargs)["input_ids"]

    def _truncation_limit(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if not isinstance(truncate_prompt_tokens, int) or truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or a positive integer, got {truncate_prompt_tokens!r}.")
        if truncate_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens value ({truncate_prompt_tokens}) is greater than max_model_len "
                f"({self.max_model_len}). Please select a smaller truncation size."
            )
        return truncate_prompt_tokens

    def _check_ids(self, ids: Any, index: int, limit: int | None) -> list[int]:
        # array("q", ...) converts in C and rejects floats, strings and None: fast for long prompts.
        try:
            packed = array("q", ids)
        except (TypeError, OverflowError):
            raise TypeError(f"Prompt {index}: prompt_token_ids must be a list of ints.") from None
        # One unsigned max catches both ends: negative ids wrap around to huge values.
        if packed and int(np.frombuffer(packed, dtype=np.uint64).max()) >= self.vocab_size:
            bad = next(t for t in packed if t < 0 or t >= self.vocab_size)
            raise ValueError(f"Prompt {index}: token id {bad} is out of the vocabulary (size {self.vocab_size}).")
        ids = ids if type(ids) is list else list(ids)
        return ids[-limit:] if limit is not None and len(ids) > limit else ids

    def check_length(self, ids: list[int], index: int = 0) -> None:
        if len(ids) == 0:
            raise ValueError(f"Prompt {index} is empty (no tokens).")
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{len(ids)} input tokens. Please reduce the length of the input, or truncate it "
                f"(tokenization_kwargs={{'truncate_prompt_tokens': -1}})."
            )
