"""`LLMEngine`: the synchronous core (`add_request` / `step` / `has_unfinished_requests`)."""

from __future__ import annotations

import itertools
import logging
import time

import torch

from tokenpool.config import EngineArgs, resolve_device, resolve_dtype
from tokenpool.engine.request import Request, RequestStatus
from tokenpool.engine.runner import InFlight, ModelRunner
from tokenpool.engine.scheduler import Scheduler
from tokenpool.inputs.preprocess import InputProcessor
from tokenpool.loader.model_files import resolve_model_dir
from tokenpool.loader.st_config import read_st_config
from tokenpool.models.bge_m3 import lexical_weights
from tokenpool.models.pooling_model import ALL_TASKS
from tokenpool.models.registry import build_model
from tokenpool.outputs import BatchOutput, PoolingOutput, PoolingRequestOutput
from tokenpool.platforms.cpu import describe_plan
from tokenpool.pooling_params import PoolingParams

logger = logging.getLogger("tokenpool")

# Default batch sizes: GPUs want large packed batches. On the CPU a batch's activations should stay in the
# caches: 4k tokens ran fp32 MiniLM ~15% faster than 8k (2 Zen 5 cores), and bf16 at the same speed.
_DEFAULT_BUDGET = {"cuda": (65536, 1024), "cpu": (4096, 256)}


class LLMEngine:
    """Loads one model and runs batches of pooling requests on it."""

    def __init__(self, args: EngineArgs):
        from transformers import AutoConfig, AutoTokenizer

        self.args = args
        if args.seed is not None:
            torch.manual_seed(args.seed)
        self.model_dir = resolve_model_dir(args.model, args.revision, args.download_dir)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        if self.device.type == "cpu":
            logger.info(describe_plan(self.dtype))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.set_per_process_memory_fraction(args.gpu_memory_utilization, self.device)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        if args.hf_overrides:
            for key, value in args.hf_overrides.items():
                setattr(self.hf_config, key, value)
        st_config = read_st_config(self.model_dir)
        self.tokenizer = None
        if not args.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or self.model_dir, revision=args.tokenizer_revision)
        t0 = time.perf_counter()
        self.model = build_model(self.model_dir, self.hf_config, st_config, args.pooler_config, self.dtype, self.device)
        if args.enforce_eager and hasattr(self.model.backbone, "compile_fused"):
            self.model.backbone.compile_fused = False  # vLLM's meaning: no compilation, no graphs
        logger.info("Loaded %s (%s) on %s in %s in %.2fs", self.model_dir, self.model.name, self.device,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - t0)
        self.max_model_len = self._derive_max_model_len(st_config.max_seq_length)
        budget, seqs = _DEFAULT_BUDGET[self.device.type]
        budget = max(args.max_num_batched_tokens or budget, self.max_model_len)
        self.scheduler = Scheduler(budget, args.max_num_seqs or seqs)
        pooler_cfg = args.pooler_config
        self.embed_width = (self.model.poolers["embed"].width(self.model.backbone.hidden_size)
                            if "embed" in self.model.poolers else None)
        default_dims = pooler_cfg.dimensions if pooler_cfg else None
        if default_dims is not None:
            self.check_dimensions("embed", default_dims, "pooler_config.dimensions")
        self.runner = ModelRunner(self.model, self.device, pooler_cfg.use_activation if pooler_cfg else None,
                                  default_dims)
        image_processor = None
        if getattr(self.model.backbone, "visual", None) is not None:
            from tokenpool.multimodal.inputs import ImagePromptProcessor

            image_processor = ImagePromptProcessor(self.model_dir, self.hf_config)
        self.inputs = InputProcessor(self.tokenizer, self.max_model_len, self.hf_config.get_text_config().vocab_size,
                                     do_lower_case=st_config.do_lower_case, image_processor=image_processor)
        self._special_ids = self._lexical_skip_ids()
        self._requests: dict[str, Request] = {}
        self._inflight: InFlight | None = None

    def _lexical_skip_ids(self) -> frozenset[int]:
        """Token ids left out of lexical weights (FlagEmbedding: cls, eos, pad, unk)."""
        if self.tokenizer is None:  # skip_tokenizer_init: the config's ids are all we know
            names = ("bos_token_id", "eos_token_id", "pad_token_id")
            return frozenset(getattr(self.hf_config, n) for n in names if getattr(self.hf_config, n, None) is not None)
        special = self.tokenizer.special_tokens_map
        return frozenset(
            self.tokenizer.convert_tokens_to_ids(special[name])
            for name in ("cls_token", "eos_token", "pad_token", "unk_token")
            if name in special
        )

    def _derive_max_model_len(self, st_max_seq_length: int | None) -> int:
        derived = self.model.max_model_len
        if st_max_seq_length:
            derived = min(derived, st_max_seq_length)
        wanted = self.args.max_model_len
        if wanted is None:
            return derived
        if wanted > self.model.max_model_len:
            raise ValueError(
                f"max_model_len={wanted} is greater than the model's context length ({self.model.max_model_len})."
            )
        return wanted

    # ----- tasks -----
    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.model.supported_tasks

    def check_task(self, task: str) -> None:
        if task not in self.supported_tasks:
            raise ValueError(
                f"Task {task!r} is not supported by this model ({self.model.name}). "
                f"Supported tasks: {', '.join(self.supported_tasks)}."
            )

    def check_dimensions(self, task: str, dimensions: int | None, name: str = "dimensions") -> None:
        """Matryoshka truncation: `embed` (or its part of "all") only, 1..the embedding's length."""
        if dimensions is None:
            return
        if task not in ("embed", ALL_TASKS) or self.embed_width is None:
            raise ValueError(f"{name} applies to the 'embed' task only.")
        if not 1 <= dimensions <= self.embed_width:
            raise ValueError(f"{name}={dimensions} is outside 1..{self.embed_width}, the embedding size.")

    # ----- request flow -----
    def add_request(self, request_id: str, prompt_token_ids: list[int], task: str, params: PoolingParams) -> None:
        self.check_task(task)
        if request_id in self._requests:
            raise ValueError(f"Duplicate request id {request_id!r}.")
        self.inputs.check_length(prompt_token_ids)
        request = Request(request_id, prompt_token_ids, task, params)
        self._requests[request_id] = request
        self.scheduler.add(request)

    def add_validated_requests(self, request_ids: list[str], token_ids: list[list[int]], arrays: list,
                               task: str, params: list[PoolingParams]) -> None:
        """Queue a chunk of plain token-id prompts that `InputProcessor.process` has already validated into
        int64 `arrays` (ids in the vocabulary, lengths within the context; no images), in one call: no
        per-request checks or conversions. `task` must have been checked (`check_task`)."""
        known = self._requests
        for rid in request_ids:
            if rid in known:
                raise ValueError(f"Duplicate request id {rid!r}.")
        requests = list(map(Request, request_ids, token_ids, itertools.repeat(task), params, arrays))
        known.update(zip(request_ids, requests))
        self.scheduler.add_many(requests, sum(map(len, token_ids)))

    def abort_requests(self, request_ids: list[str]) -> None:
        """Drop requests: queued ones never run; a running one's output is discarded."""
        ids = set(request_ids)
        self.scheduler.abort(ids)
        for rid in ids:
            request = self._requests.pop(rid, None)
            if request is not None:
                request.status = RequestStatus.ABORTED

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_waiting() or self._inflight is not None

    def step(self) -> list[PoolingRequestOutput]:
        """Launch the next packed batch, then collect the previous one; return the finished requests.

        Keeping one batch in flight lets the host prepare and launch batch N+1 while the device still
        runs batch N (on the CPU, launching is running, so this is plain sequential execution). Each output
        owns its memory (see `step_batch` for the batch's outputs without per-request copies).
        """
        self.runner.owned_outputs = True
        done = self._advance()
        return [] if done is None else self._request_outputs(done.batch, self.runner.finish(done))

    def step_batch(self) -> BatchOutput | None:
        """`step` for consumers that want no per-request copies (an index, a Ray actor): the finished batch's
        outputs as views of one flat float32 tensor, or None when no batch finished."""
        self.runner.owned_outputs = False
        done = self._advance()
        if done is None:
            return None
        flat, views = self.runner.finish_batch(done)
        return BatchOutput(flat, self._request_outputs(done.batch, views))

    def _advance(self) -> InFlight | None:
        """Launch the next batch; return the one to collect now (None: nothing finished in this step)."""
        batch = self.scheduler.schedule()
        launched = self.runner.launch(batch) if batch is not None else None
        previous, self._inflight = self._inflight, launched
        if previous is None:
            if launched is None or self.device.type == "cuda" and self.scheduler.has_waiting():
                return None
            previous, self._inflight = launched, None
        return previous

    def _request_outputs(self, batch, results: list) -> list[PoolingRequestOutput]:
        outputs = []
        for request, data in zip(batch.requests, results):
            if request.status is RequestStatus.ABORTED:
                continue
            request.status = RequestStatus.FINISHED
            self._requests.pop(request.request_id, None)
            weights = None
            if self.model.lexical_head and request.task in ("token_classify", ALL_TASKS):
                sparse = data["token_classify"] if request.task == ALL_TASKS else data
                weights = lexical_weights(request.prompt_token_ids[1:-1], sparse, self._special_ids)
            outputs.append(PoolingRequestOutput(request.request_id, PoolingOutput(data, weights), request.prompt_token_ids))
        return outputs
