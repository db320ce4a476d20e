"""`LLMEngine`: the synchronous core (`add_request` / `step` / `has_unfinished_requests`)."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from tokenpool.config import EngineArgs, resolve_device, resolve_dtype
from tokenpool.engine.request import EngineRequest, Request, RequestStatus
from tokenpool.engine.runner import InFlight, ModelRunner
from tokenpool.engine.scheduler import Scheduler
from tokenpool.inputs.preprocess import InputProcessor
from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.loader.model_files import resolve_model_dir
from tokenpool.loader.st_config import read_st_config
from tokenpool.loader.colbert import MODES as COLBERT_MODES, ColbertIds
from tokenpool.models.bge_m3 import lexical_weights
from tokenpool.models.registry import build_model
from tokenpool.outputs import BatchOutput, PoolingOutput, PoolingRequestOutput
from tokenpool.layers import triton_attention
from tokenpool.platforms.cpu import describe_plan
from tokenpool.pooling_params import PoolingParams
from tokenpool.tasks import COMBINED_TASK as ALL_TASKS

logger = logging.getLogger("tokenpool")

# Default batch sizes: GPUs want large packed batches. On the CPU a batch's activations should stay in the
# caches: 4k tokens ran fp32 MiniLM ~15% faster than 8k (2 Zen 5 cores), and bf16 at the same speed.
_DEFAULT_BUDGET = {"cuda": (65536, 1024), "cpu": (4096, 256)}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a loaded model offers (`LLMEngine.info`; picklable).

    tasks: every task it serves, the combined one included; combined_task: "all" where several heads'
    outputs come from one forward pass, else None; output_dims: the width of each task's output rows (0 for
    scalars per token); lexical_weights: token_classify outputs also come keyed by token id (BGE-M3's sparse
    head), leaving out `lexical_skip_ids`; image_placeholder: how a chat message's image is written into the
    prompt text, where the model reads images; input_types: the encoding modes a request can ask for
    (`PoolingParams.input_type`: ("query", "document") for ColBERT checkpoints, else none).
    """

    name: str
    model_dir: str
    tasks: tuple[str, ...]
    combined_task: str | None
    output_dims: dict[str, int]
    max_model_len: int
    vocab_size: int
    lexical_weights: bool
    lexical_skip_ids: frozenset[int]
    supports_images: bool
    image_placeholder: str
    input_types: tuple[str, ...] = ()


class BatchFailed(RuntimeError):
    """A step failed; `request_ids` were running in it and are dropped (the cause is `__cause__`)."""

    def __init__(self, request_ids: list[str], error: Exception):
        super().__init__(f"A batch of {len(request_ids)} request(s) failed: {type(error).__name__}: {error}")
        self.request_ids = request_ids


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
            logger.info("CUDA attention: %s", "Triton varlen kernel" if triton_attention.enabled()
                        else "PyTorch's FlashAttention-2")  # also checks $TOKENPOOL_CUDA_ATTENTION at start
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
        # enforce_eager, vLLM's meaning: no compilation, no graphs.
        self.model = build_model(self.model_dir, self.hf_config, st_config, args.pooler_config, self.dtype, self.device,
                                 compile_fused=not args.enforce_eager)
        logger.info("Loaded %s (%s) on %s in %s in %.2fs", self.model_dir, self.model.name, self.device,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - t0)
        self.max_model_len = self._derive_max_model_len(st_config.max_seq_length)
        budget, seqs = _DEFAULT_BUDGET[self.device.type]
        budget = max(args.max_num_batched_tokens or budget, self.max_model_len)
        self.max_num_batched_tokens = budget
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
        colbert = None
        if self.model.colbert is not None:
            if self.tokenizer is None:
                raise ValueError("ColBERT models need their tokenizer for the query / document markers "
                                 "(skip_tokenizer_init=True was given).")
            colbert = ColbertIds.resolve(self.model.colbert, self.tokenizer)
        self.processor = InputProcessor(self.tokenizer, self.max_model_len, self.hf_config.get_text_config().vocab_size,
                                     do_lower_case=st_config.do_lower_case, image_processor=image_processor,
                                     colbert=colbert)
        self._special_ids = self._lexical_skip_ids()
        self.info = ModelInfo(
            name=self.model.name, model_dir=str(self.model_dir), tasks=self.model.supported_tasks,
            combined_task=ALL_TASKS if ALL_TASKS in self.model.supported_tasks else None,
            output_dims=self.model.output_dims(), max_model_len=self.max_model_len,
            vocab_size=self.processor.vocab_size, lexical_weights=self.model.lexical_head,
            lexical_skip_ids=self._special_ids, supports_images=image_processor is not None,
            image_placeholder=getattr(image_processor, "placeholder", ""),
            input_types=COLBERT_MODES if colbert is not None else ())
        self._requests: dict[str, Request] = {}
        self._inflight: deque[InFlight] = deque()  # launched, not yet collected, oldest first

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
    def add_requests(self, requests: list[EngineRequest], front: bool = False) -> None:
        """Queue processed prompts (from `processor.process`; a plain token-id list is validated here), in
        order, after the waiting ones (`front`: before them). Checks each request's task and options and
        refuses duplicate ids; nothing of the call is queued when one fails."""
        known = self._requests
        for r in requests:
            if not isinstance(r.prompt, ProcessedPrompt):
                r.prompt = self.processor.process([{"prompt_token_ids": list(r.prompt)}])[0]
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(rid in known for rid in ids):
            dup = next(rid for i, rid in enumerate(ids) if rid in known or rid in ids[:i])
            raise ValueError(f"Duplicate request id {dup!r}.")
        checked: set[tuple[str, int | None]] = set()
        for r in requests:
            key = (r.task, r.params.dimensions)
            if key not in checked:  # the usual call has one task and one PoolingParams for all
                self.check_task(r.task)
                self.check_dimensions(r.task, r.params.dimensions)
                checked.add(key)
            n = len(r.prompt.token_ids)
            if n == 0 or n > self.max_model_len:
                self.processor.check_length(r.prompt.token_ids)
        queued = [Request(r.request_id, r.prompt, r.task, r.params, r.alone) for r in requests]
        known.update(zip(ids, queued))
        self.scheduler.add_many(queued, front)

    def add_request(self, request_id: str, prompt_token_ids: list[int], task: str, params: PoolingParams) -> None:
        """Queue one token-id prompt (validated here): `add_requests` for one prompt."""
        prompt = self.processor.process([{"prompt_token_ids": prompt_token_ids}])[0]
        self.add_requests([EngineRequest(request_id, prompt, task, params)])

    def abort(self, request_ids) -> int:
        """Drop requests: waiting ones never run; a running one's output is discarded. Returns how many were
        dropped before they ran."""
        dropped = 0
        for rid in request_ids:
            request = self._requests.pop(rid, None)
            if request is not None:
                if request.status is RequestStatus.WAITING:
                    self.scheduler.abort(request)
                    dropped += 1
                request.status = RequestStatus.ABORTED
        return dropped

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens queued and not yet scheduled (callers that feed the engine in chunks keep it a batch or two
        ahead)."""
        return self.scheduler.num_waiting_tokens

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_waiting() or bool(self._inflight)

    def step(self) -> list[PoolingRequestOutput]:
        """Launch the next packed batch, then collect the previous one; return the finished requests.

        Keeping batches in flight lets the host prepare and launch batch N+2 while the device still runs
        batches N and N+1 (on the CPU, launching is running, so this is plain sequential execution). Each output
        has a storage of its own (pickles compactly); see `step_batch` for the batch as one flat tensor.
        """
        try:
            done = self._advance()
            return [] if done is None else self._request_outputs(done.batch, self.runner.finish(done))
        except Exception as e:
            raise self._failed(e) from e

    def step_batch(self) -> BatchOutput | None:
        """`step` for consumers that want the batch as one tensor (an index, a Ray actor): the finished batch's
        outputs as views of one flat float32 tensor, or None when no batch finished."""
        try:
            done = self._advance()
            if done is None:
                return None
            flat, views = self.runner.finish_batch(done)
        except Exception as e:
            raise self._failed(e) from e
        return BatchOutput(flat, self._request_outputs(done.batch, views))

    def _failed(self, error: Exception) -> "BatchFailed":
        """A step raised: the requests it was running (this batch and the one in flight) are dropped and named."""
        running = [rid for rid, r in self._requests.items() if r.status is RequestStatus.RUNNING]
        for rid in running:
            self._requests.pop(rid).status = RequestStatus.ABORTED
        self._inflight.clear()
        return BatchFailed(running, error)

    def _advance(self) -> InFlight | None:
        """Launch the next batch; return the one to collect now (None: nothing finished in this step).

        On CUDA up to `runner.inflight_depth` batches stay launched while more work waits; once nothing waits,
        each step collects one (oldest first) until none is left.
        """
        batch = self.scheduler.schedule()
        if batch is not None:
            self._inflight.append(self.runner.launch(batch))
        if not self._inflight:
            return None
        if len(self._inflight) <= self.runner.inflight_depth and self.scheduler.has_waiting():
            return None
        return self._inflight.popleft()

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
