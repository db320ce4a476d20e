"""`LLM`: the offline, vLLM-compatible entry point (`embed`, `encode`, `score`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenpool.config import EngineArgs
from tokenpool.engine.engine import BatchFailed, LLMEngine
from tokenpool.engine.request import EngineRequest
from tokenpool.inputs.data import PromptType
from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.outputs import (
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from tokenpool.pooling_params import PoolingParams
from tokenpool.scoring import pair_inputs, score_pairs

# Prompts tokenized and queued at a time (see LLM._run); prompts with images (~3 ms of preprocessing each)
# go in smaller chunks, so the device starts early and later images are preprocessed while it runs.
_CHUNK = 512
_IMAGE_CHUNK = 16
_TOKENIZATION_KEYS = {"truncate_prompt_tokens", "add_special_tokens", "truncation", "max_length"}


class LLM:
    """A pooling model loaded once, serving every task it supports.

    `LLM(model="BAAI/bge-m3")` (or a local folder; with no model, the built-in all-MiniLM-L6-v2).
    Keyword arguments are `EngineArgs` fields (vLLM's names), e.g. `dtype`, `device`, `max_model_len`.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine(self.engine_args)
        self._next_id = 0  # request ids: str(0), str(1), ...

    # ----- public API -----
    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.llm_engine.supported_tasks

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Run `pooling_task` over `prompts`; outputs in input order.

        pooling_task: "token_embed" (default when the model has it), "embed", "token_classify".
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported.")
        if pooling_task is None:
            default = self.engine_args.task or (self.engine_args.pooler_config.task if self.engine_args.pooler_config else None)
            pooling_task = default or ("token_embed" if "token_embed" in self.supported_tasks else self.supported_tasks[0])
        self.llm_engine.check_task(pooling_task)
        prompt_list = _as_list(prompts)
        params_list = self._params_list(pooling_params, len(prompt_list), pooling_task)
        truncate, add_special = self._tokenization(tokenization_kwargs, truncate_prompt_tokens)
        return self._run(prompt_list, params_list, pooling_task, truncate, add_special, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One pooled vector per prompt (`outputs.embedding`, a list of floats)."""
        outputs = self.encode(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                              pooling_task="embed", tokenization_kwargs=tokenization_kwargs,
                              truncate_prompt_tokens=truncate_prompt_tokens)
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(self, prompts: PromptType | Sequence[PromptType], *args: Any, **kwargs: Any):
        self.llm_engine.check_task("classify")
        raise AssertionError("unreachable: no supported model has a classify head")  # check_task raised

    def score(
        self,
        data_1: PromptType | Sequence[PromptType],
        data_2: PromptType | Sequence[PromptType],
        /,
        *,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """Score pairs: 1 x N, N x 1 or N x N (pairwise).

        pooling_task "embed" (default where the model has it): cosine of the pooled embeddings;
        "token_embed": late interaction, MaxSim over the per-token embeddings. Models with query / document
        modes (ColBERT) encode `data_1` as queries and `data_2` as documents.
        """
        if pooling_task is None:
            pooling_task = "embed" if "embed" in self.supported_tasks else "token_embed"
        if pooling_task not in ("embed", "token_embed"):
            raise ValueError(f"score uses 'embed' (cosine) or 'token_embed' (MaxSim), not {pooling_task!r}.")
        pairs = pair_inputs(_as_list(data_1), _as_list(data_2))
        if not pairs:
            raise ValueError("score got no inputs.")
        # Every distinct prompt is encoded once (a 1 x N query: once, not N times).
        sides = ("query", "document") if self.llm_engine.info.input_types else (None, None)
        keys: dict = {}  # (side, key) -> the first prompt with it
        key_pairs = []
        for a, b in pairs:
            ka, kb = (sides[0], _prompt_key(a)), (sides[1], _prompt_key(b))
            keys.setdefault(ka, a)
            keys.setdefault(kb, b)
            key_pairs.append((ka, kb))
        params = pooling_params
        if sides[0] is not None:
            base = pooling_params or PoolingParams()
            params = [dataclasses.replace(base, input_type=side) for side, _ in keys]
        outputs = self.encode(list(keys.values()), params, use_tqdm=use_tqdm, pooling_task=pooling_task,
                              tokenization_kwargs=tokenization_kwargs, truncate_prompt_tokens=truncate_prompt_tokens)
        by_key = dict(zip(keys, outputs))
        vectors = {key: out.outputs.data for key, out in by_key.items()}
        scores = score_pairs(key_pairs, vectors, "cosine" if pooling_task == "embed" else "maxsim")
        return [
            ScoringRequestOutput(
                request_id=f"{by_key[a].request_id}-{by_key[b].request_id}",
                outputs=ScoringOutput(score),
                prompt_token_ids=by_key[a].prompt_token_ids + by_key[b].prompt_token_ids,
            )
            for (a, b), score in zip(key_pairs, scores)
        ]

    def add_to_index(self, index, ids: Sequence, texts: PromptType | Sequence[PromptType],
                     metadata: Sequence | None = None, *, use_tqdm: bool = True) -> None:
        """Embed `texts` (token_embed; document mode for models with modes) and add them to `index` (a
        `tokenpool.index.MultiVectorIndex`) under `ids`; an id already there is replaced."""
        from tokenpool.index.multivector import check_ids

        ids = check_ids(ids)  # before the work: a bare str or a set is refused, not taken apart
        prompts = _as_list(texts)
        if len(prompts) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(prompts)} texts.")
        outputs = self.encode(prompts, self._side_params("document"), use_tqdm=use_tqdm, pooling_task="token_embed")
        self._check_index_dim(index, outputs)
        index.add(ids, [o.outputs.data for o in outputs], metadata)

    def search(self, queries: PromptType | Sequence[PromptType], index, k: int = 10, *,
               use_tqdm: bool = False) -> list[list[tuple]]:
        """Per query, the `k` best documents of `index` as (id, MaxSim score), best first; queries are
        embedded with token_embed (query mode for models with modes)."""
        prompts = _as_list(queries)
        outputs = self.encode(prompts, self._side_params("query"), use_tqdm=use_tqdm, pooling_task="token_embed")
        self._check_index_dim(index, outputs)
        return index.search([o.outputs.data for o in outputs], k=k)

    def _side_params(self, side: str) -> PoolingParams | None:
        return PoolingParams(input_type=side) if self.llm_engine.info.input_types else None

    def _check_index_dim(self, index, outputs) -> None:
        dim = self.llm_engine.info.output_dims["token_embed"]
        if index.dim != dim:
            raise ValueError(f"The index holds {index.dim}-dim vectors; this model's token_embed rows have {dim}.")

    # ----- internals -----
    def _params_list(self, pooling_params, n: int, task: str) -> list[PoolingParams]:
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            params = [pooling_params.clone()] * n  # one shared object: the engine never mutates it
        else:
            params = [p.clone() for p in pooling_params]
            if len(params) != n:
                raise ValueError(f"Got {len(params)} PoolingParams for {n} prompts.")
        for p in params[:1] if isinstance(pooling_params, PoolingParams) else params:
            if not isinstance(p, PoolingParams):
                raise TypeError(f"pooling_params must be PoolingParams, got {type(p).__name__}.")
            if p.task is not None and p.task != task:
                raise ValueError(f"PoolingParams.task={p.task!r} conflicts with pooling_task={task!r}.")
            self.llm_engine.check_dimensions(task, p.dimensions)
            p.task = task
        return params

    @staticmethod
    def _tokenization(kwargs: dict[str, Any] | None, truncate_prompt_tokens: int | None) -> tuple[int | None, bool]:
        kwargs = dict(kwargs or {})
        unknown = set(kwargs) - _TOKENIZATION_KEYS
        if unknown:
            raise ValueError(f"Unsupported tokenization_kwargs {sorted(unknown)}; use {sorted(_TOKENIZATION_KEYS)}.")
        truncate = kwargs.get("truncate_prompt_tokens", truncate_prompt_tokens)
        if truncate is None and kwargs.get("truncation"):
            truncate = kwargs.get("max_length", -1)
        return truncate, bool(kwargs.get("add_special_tokens", True))

    def _process(self, prompts: list, params: list[PoolingParams], truncate: int | None, add_special: bool,
                 first_index: int = 0) -> list[ProcessedPrompt]:
        """Each prompt validated and tokenized (per distinct truncation limit when the params differ)."""
        process = self.llm_engine.processor.process
        first = params[0]
        if params.count(first) == len(params):  # the usual case: one PoolingParams for all (identity first)
            limit = first.truncate_prompt_tokens if first.truncate_prompt_tokens is not None else truncate
            types = [first.input_type] * len(prompts) if first.input_type is not None else None
            return process(prompts, limit, add_special, first_index, types)
        limits = [p.truncate_prompt_tokens if p.truncate_prompt_tokens is not None else truncate for p in params]
        result: list[ProcessedPrompt] = [None] * len(prompts)  # type: ignore[list-item]
        for limit in dict.fromkeys(limits):
            idx = [i for i, lim in enumerate(limits) if lim == limit]
            group = prompts if len(idx) == len(prompts) else [prompts[i] for i in idx]
            types = [params[i].input_type for i in idx]
            for i, prompt in zip(idx, process(group, limit, add_special, first_index, types)):
                result[i] = prompt
        return result

    def _run(self, prompts: list, params: list[PoolingParams], task: str, truncate: int | None,
             add_special: bool, use_tqdm: bool) -> list[PoolingRequestOutput]:
        """Process and queue prompts chunk by chunk while the engine runs, so that input processing overlaps
        the device's work; keep about two batches queued ahead."""
        engine = self.llm_engine
        n = len(prompts)
        first_id = self._next_id
        self._next_id += n
        ids = list(map(str, range(first_id, first_id + n)))
        finished: dict[str, PoolingRequestOutput] = {}
        ahead = 2 * engine.max_num_batched_tokens
        queued = 0
        with tqdm(total=n, desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar, \
                _cyclic_gc_paused():
            has_images = any(isinstance(p, dict) and p.get("multi_modal_data") for p in prompts)
            try:
                while queued < n or engine.has_unfinished_requests():
                    while queued < n and engine.num_waiting_tokens < ahead:
                        end = min(queued + (_IMAGE_CHUNK if has_images else _CHUNK), n)
                        chunk = self._process(prompts[queued:end], params[queued:end], truncate, add_special, queued)
                        engine.add_requests(list(map(EngineRequest, ids[queued:end], chunk, itertools.repeat(task),
                                                     params[queued:end])))
                        queued = end
                    step_outputs = engine.step()
                    for out in step_outputs:
                        finished[out.request_id] = out
                    if use_tqdm:
                        bar.update(len(step_outputs))
            except BatchFailed as e:  # the engine names the batch; the caller gets the error that broke it
                engine.abort(ids)
                raise e.__cause__ from None
            except BaseException:
                engine.abort(ids)
                raise
        return list(map(finished.__getitem__, ids))


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off for the duration (process-wide; restored after).

    A run allocates a few container objects per prompt, which triggers full collections that walk every
    tracked object, the caller's prompt lists included: ~10 us per prompt of 20,000 pre-tokenized passages
    (a third of the host's cost per request, bench/host_overhead.py), ~3% of BGE-M3's GPU throughput.
    Nothing of a run forms reference cycles; memory is freed by reference counting as before.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _prompt_key(prompt: Any) -> Any:
    """Equal keys for prompts that encode the same: a text, or the ids / text of a plain prompt dict; any
    other prompt (e.g. with images) is only equal to itself."""
    if isinstance(prompt, str):
        return ("text", prompt)
    if isinstance(prompt, dict) and set(prompt) <= {"prompt", "prompt_token_ids"}:
        if "prompt_token_ids" in prompt and isinstance(prompt["prompt_token_ids"], (list, tuple)):
            return ("ids", tuple(prompt["prompt_token_ids"]), prompt.get("prompt"))
        if isinstance(prompt.get("prompt"), str):
            return ("text", prompt["prompt"])
    return ("object", id(prompt))


def _as_list(prompts: Any) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise TypeError(f"prompts must be a str, a prompt dict or a list of them, got {type(prompts).__name__}.")
