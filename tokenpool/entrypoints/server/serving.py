"""What every route shares: the async engine, the served names, the model's tasks and output sizes.

`ServingState` turns validated requests into engine work: model-name and task checks, tokenization on the
tokenizer thread, engine calls that are dropped when the client disconnects, usage counting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from tokenpool.engine.async_engine import AsyncLLMEngine
from tokenpool.entrypoints.server.errors import APIError, ClientDisconnected
from tokenpool.entrypoints.server.media import MediaPolicy, load_images, parse_messages
from tokenpool.entrypoints.server.metrics import ServerMetrics
from tokenpool.entrypoints.server.middleware import Load
from tokenpool.entrypoints.server.protocol import ChatMessage
from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.loader.model_files import DEFAULT_MODEL
from tokenpool.outputs import PoolingRequestOutput
from tokenpool.pooling_params import PoolingParams
from tokenpool.tasks import PUBLIC_TASKS

# Tasks requests may name; "all" is the engine's combined BGE-M3 task (dense + sparse + colbert in one
# pass), used by /v1/bge_m3 only.


@dataclass
class ServerConfig:
    """Options of `tokenpool serve` beyond the engine arguments."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] | None = None
    api_key: str | None = None
    max_concurrent_requests: int | None = None
    max_request_body_bytes: int | None = 64 * 1024 * 1024
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    index_dir: str | None = None  # a MultiVectorIndex folder: /v1/index/*, /v1/search (created if missing)
    index_codec: str | None = None  # for a new index (default float16); an existing index must have this codec
    index_nbits: int | None = None  # for a new residual index (default 2); an existing one must have these


class ServingState:
    """Shared by the routes of one app (stored as `app.state.serving`)."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig, metrics: ServerMetrics,
                 default_task: str | None = None, load: Load | None = None):
        engine.start()  # builds and warms up the engine on its thread, if not done yet
        core = engine.engine
        self.engine = engine
        self.core = core
        self.config = config
        self.metrics = metrics
        self.load = load or Load()
        self.media = MediaPolicy.create(config.allowed_local_media_path, config.allowed_media_domains)
        model = core.args.model or DEFAULT_MODEL
        self.served_names = list(config.served_model_name or []) or [model]
        self.model_name = self.served_names[0]
        self.model_root = core.info.model_dir
        self.created = int(time.time())
        info = core.info
        self.max_model_len = info.max_model_len
        self.tasks = tuple(t for t in info.tasks if t in PUBLIC_TASKS)
        self.has_combined_task = info.combined_task is not None
        self.lexical_head = info.lexical_weights
        self.input_types = info.input_types  # ("query", "document") for ColBERT models
        self.supports_images = info.supports_images
        self.image_placeholder = info.image_placeholder
        self.special_ids = info.lexical_skip_ids
        self.processor = core.processor  # tokenization, on the tokenizer thread only
        if default_task is not None and default_task not in self.tasks:
            raise ValueError(f"--task {default_task!r} is not supported by this model ({self.model_name}). "
                             f"Supported tasks: {', '.join(self.tasks)}.")
        if default_task is not None:
            self.default_task = default_task
        else:
            self.default_task = "token_embed" if "token_embed" in self.tasks else self.tasks[0]
        self.output_dims = info.output_dims
        self.index = self._open_index(config) if config.index_dir else None

    def _open_index(self, config: ServerConfig):
        """The --index folder's index, created with the model's token_embed width if it holds none yet."""
        from pathlib import Path

        from tokenpool.index import MultiVectorIndex
        from tokenpool.index.multivector import check_codec

        if "token_embed" not in self.tasks:
            raise ValueError(f"--index needs a model with token_embed; {self.model_name} has {', '.join(self.tasks)}.")
        dim = self.output_dims["token_embed"]
        if (Path(config.index_dir) / "manifest.json").exists():
            index = MultiVectorIndex.open(config.index_dir)
            if index.dim != dim:
                raise ValueError(f"--index {config.index_dir} holds {index.dim}-dim vectors; this model's token_embed "
                                 f"rows have {dim}.")
            check_codec(index, config.index_codec, config.index_nbits, "--index-codec", "--index-nbits")
            return index
        return MultiVectorIndex.create(config.index_dir, dim, codec=config.index_codec or "float16",
                                       nbits=config.index_nbits or 2)

    # ----- checks -----
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise APIError(f"The model `{name}` does not exist.", status=404, param="model")

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise APIError(f"Task {task!r} is not supported by this model ({self.model_name}). "
                           f"Supported tasks: {', '.join(self.tasks)}.", param="task")

    def require_task(self, task: str, api: str) -> None:
        """A whole API the model cannot serve (501)."""
        if task not in self.tasks:
            raise APIError(f"The model `{self.model_name}` does not support the {api} "
                           f"(needs the {task!r} task; it has {', '.join(self.tasks)}).", status=501)

    def check_common(self, priority: int) -> None:
        if priority != 0:
            raise APIError("priority must be 0: this server schedules first come, first served.", param="priority")

    def pooling_params(self, task: str, use_activation: bool | None, dimensions: int | None,
                       input_type: str | None = None) -> PoolingParams:
        if dimensions is not None:
            if task != "embed":
                raise APIError("`dimensions` applies to the 'embed' task only.", param="dimensions")
            width = self.output_dims.get("embed", 0)
            if dimensions > width:
                raise APIError(f"dimensions={dimensions} is larger than the embedding size ({width}).",
                               param="dimensions")
        return PoolingParams(use_activation=use_activation, dimensions=dimensions, task=task, input_type=input_type)

    # ----- tokenization (tokenizer thread) -----
    async def tokenize(self, prompts: list[Any], truncate_prompt_tokens: int | None,
                       add_special_tokens: bool, input_type: str | None = None) -> list[ProcessedPrompt]:
        """Validate and tokenize prompts (str or {"prompt_token_ids": [...]}) in `input_type`'s mode (ColBERT
        models); 400 on bad input."""
        types = [input_type] * len(prompts) if input_type is not None else None
        try:
            return await self.engine.run_in_tokenizer_thread(
                self.processor.process, prompts, truncate_prompt_tokens, add_special_tokens, 0, types,
                inline=_tiny(prompts))
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param="input") from e

    async def tokenize_input(self, input_value: Any, messages: list[ChatMessage] | None,
                             truncate_prompt_tokens: int | None, add_special_tokens: bool | None,
                             mm_processor_kwargs: dict | None = None,
                             input_type: str | None = None) -> list[ProcessedPrompt]:
        """`input` (str | list[str] | list[int] | list[list[int]]) or `messages` -> token ids per prompt.
        `mm_processor_kwargs` (e.g. max_pixels) go to the image processor: messages with images only."""
        if mm_processor_kwargs and (messages is None or not self.supports_images):
            raise APIError("`mm_processor_kwargs` applies to `messages` with images (on a model that reads images).",
                           param="mm_processor_kwargs")
        if messages is not None:
            tokenizer = self.processor.tokenizer
            chat = await self.engine.run_in_tokenizer_thread(
                parse_messages, messages, self.media, self.supports_images, tokenizer, self.image_placeholder)
            # A chat template adds the special tokens itself; without one the text is tokenized as `input`.
            default = not getattr(tokenizer, "chat_template", None)
            add = default if add_special_tokens is None else add_special_tokens
            prompt: Any = chat.text
            if chat.image_urls:
                images = await self.engine.run_in_tokenizer_thread(load_images, chat.image_urls)
                prompt = {"prompt": chat.text, "multi_modal_data": {"image": images}}
                if mm_processor_kwargs:
                    prompt["mm_processor_kwargs"] = mm_processor_kwargs
            elif mm_processor_kwargs:
                raise APIError("`mm_processor_kwargs` applies to `messages` with images; these messages have none.",
                               param="mm_processor_kwargs")
            return await self.tokenize([prompt], truncate_prompt_tokens, add, input_type)
        add = True if add_special_tokens is None else add_special_tokens
        if isinstance(input_value, str):
            prompts: list[Any] = [input_value]
        elif isinstance(input_value[0], int):
            prompts = [{"prompt_token_ids": input_value}]
        elif isinstance(input_value[0], str):
            prompts = input_value
        else:
            prompts = [{"prompt_token_ids": ids} for ids in input_value]
        return await self.tokenize(prompts, truncate_prompt_tokens, add, input_type)

    # ----- engine -----
    async def encode(self, raw_request: Request, token_ids: list[ProcessedPrompt], task: str | list[str],
                     params: PoolingParams | list[PoolingParams]) -> list[PoolingRequestOutput]:
        """Run the prompts; if the client disconnects first, drop its queued work and raise ClientDisconnected."""
        # The watcher first: after `submit` the engine thread starts at once, and on a small CPU any work
        # left on this thread competes with the forward pass.
        watch = asyncio.ensure_future(_disconnected(raw_request))
        try:
            ticket = self.engine.submit(token_ids, task, params)
        except BaseException:
            watch.cancel()
            raise
        self.load.mark_submitted(raw_request.scope)
        try:
            await asyncio.wait((ticket.future, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not ticket.future.done():  # the client went away (or the server is stopping)
                self.engine.cancel(ticket)
        if ticket.future.cancelled():
            raise ClientDisconnected()
        try:
            outputs = ticket.future.result()
        except (ValueError, TypeError) as e:
            raise APIError(str(e)) from e
        for name, count in Counter([task] * len(outputs) if isinstance(task, str) else task).items():
            self.metrics.prompts.labels(name).inc(count)
        return outputs

    def count_tokens(self, route: str, outputs: list[PoolingRequestOutput]) -> int:
        return self.add_prompt_tokens(route, sum(len(o.prompt_token_ids) for o in outputs))

    def add_prompt_tokens(self, route: str, n: int) -> int:
        self.metrics.prompt_tokens.labels(route).inc(n)
        return n

    @staticmethod
    def response_id(prefix: str, request_id: str | None) -> str:
        # 128 random bits as uuid4().hex has, from Python's generator: os.urandom releases the GIL and, under
        # load, waited ~0.1 ms to get it back from the engine thread. (Ids, not secrets.)
        return f"{prefix}-{request_id or format(random.getrandbits(128), '032x')}"


# Inputs this small are tokenized inline on the event loop when the tokenizer is free (~10-20 us of work:
# less than the hand-off to the tokenizer thread and back).
_TINY_INPUT = 256


def _tiny(prompts: list[Any]) -> bool:
    size = 0
    for p in prompts:
        if isinstance(p, str):
            size += len(p)
        elif isinstance(p, dict) and len(p) == 1 and isinstance(p.get("prompt_token_ids"), list):
            size += len(p["prompt_token_ids"])
        else:
            return False
    return size <= _TINY_INPUT


async def _disconnected(raw_request: Request) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return
