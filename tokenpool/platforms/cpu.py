"""What this CPU can do, read once: its instruction-set class and how each dtype's GEMMs run on it.

x86-64 CPUs come in four classes that matter here (each includes the ones before it; "none" is anything
else, e.g. an Arm CPU, where fp32 runs through PyTorch as usual and bf16/fp16 are emulated):

- "avx2":        AVX2 + FMA only (e.g. AMD Zen 3, Intel Haswell..Comet Lake).
- "avx512":      AVX-512 F/BW/VL/DQ (e.g. Intel Skylake-SP..Ice Lake).
- "avx512_bf16": plus AVX512-BF16 dot products (e.g. AMD Zen 4 / Zen 5, Intel Cooper Lake).
- "amx":         plus AMX-BF16 tiles (Intel Sapphire Rapids and later).

The class is the hardware's, lowered by the variables that cap the libraries our kernels run in, so one
machine can run (and test) another class's path:
`ATEN_CPU_CAPABILITY=avx2` (PyTorch's own kernels), `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN),
`MKL_ENABLE_INSTRUCTIONS=AVX2` (MKL). The lowest cap wins.

How a dtype's GEMMs run (`gemm_mode`):
- float32: oneDNN (or MKL through `F.linear` where PyTorch has no oneDNN) on every class.
- bfloat16: oneDNN's bf16 kernels where the class has native bf16 ("avx512_bf16", "amx"). Elsewhere
  *emulated*: the weights and each GEMM's input are rounded to bf16 (so the function is the bf16 model's),
  and the products are summed in fp32 arithmetic (exact for bf16 x bf16, as the native kernels do): the
  same results at fp32 speed, on every x86-64 CPU. PyTorch's own bf16 path refuses AVX2-only CPUs.
- float16: emulated the same way on every class (oneDNN's native fp16 needs AMX-FP16, Granite Rapids, on
  which this path has not been measured).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from tokenpool.platforms.isa import AVX2_ENV, ISA_CLASSES, hardware_class, lowered_class  # noqa: F401

@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The CPU as our kernels see it.

    model: the model name; cores: logical CPUs this process may run on; flags: the kernel's CPU flags;
    hardware_class: the class the silicon has; isa_class: that class lowered by the cap variables;
    caps: the cap variables that are set, as given.
    """

    model: str
    cores: int
    flags: frozenset[str]
    hardware_class: str
    isa_class: str
    caps: tuple[tuple[str, str], ...]

    @property
    def native_bf16(self) -> bool:
        return self.isa_class in ("avx512_bf16", "amx")

    def describe(self) -> str:
        lowered = f", lowered from {self.hardware_class} by {' '.join(f'{k}={v}' for k, v in self.caps)}" \
            if self.isa_class != self.hardware_class else ""
        return f"{self.model}, {self.cores} cores, {self.isa_class.upper()} class{lowered}"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    if not flags:  # not Linux: ask PyTorch's own probes
        cpu = getattr(torch, "cpu", None)
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        found = set()
        for flag, probe in probes.items():
            try:
                if getattr(cpu, probe)():
                    found.add(flag)
            except Exception:  # noqa: BLE001 - a private probe this torch may lack
                pass
        if "avx512f" in found:
            found |= {"avx512bw", "avx512vl", "avx512dq"}
        flags = frozenset(found)
    return model, flags


@functools.cache
def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    hardware = hardware_class(flags)
    isa, caps = lowered_class(hardware)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(model, cores, flags, hardware, isa, caps)


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def gemm_mode(dtype: torch.dtype) -> str:
    """How GEMMs in `dtype` run on this CPU: "onednn" (oneDNN kernels in `dtype`), "emulated" (inputs
    rounded to `dtype`, fp32 arithmetic on oneDNN), or "aten" (`F.linear`: this PyTorch has no oneDNN)."""
    if not onednn_available():
        return "aten"
    info = cpu_info()
    if dtype == torch.float32:
        return "onednn"
    if dtype == torch.bfloat16:
        return "onednn" if info.native_bf16 else "emulated"
    if dtype == torch.float16:
        return "emulated"  # oneDNN's fp16 path needs AMX-FP16 (Granite Rapids), which we could not test yet
    raise ValueError(f"dtype {dtype} is not supported on the CPU; use float32, bfloat16 or float16.")


_MODE_WORDS = {
    "onednn": "oneDNN {dtype} kernels",
    "emulated": "{dtype} emulated (inputs rounded to {dtype}, fp32 arithmetic: the {dtype} model's results at fp32 "
                "speed; this CPU class has no native {dtype} matrix instructions, float32 is as fast and exact)",
    "aten": "PyTorch's F.linear (no oneDNN in this PyTorch)",
}


def describe_plan(dtype: torch.dtype) -> str:
    """One line for the log: the CPU and how the model's GEMMs and attention will run on it (builds the C
    attention kernel now if it is the choice, so that the first batch does not wait for it)."""
    from tokenpool.kernels import kernel_variant, varlen_attention

    name = str(dtype).removeprefix("torch.")
    kernel = attention_kernel(dtype)
    if kernel == "fused":
        variant = kernel_variant(dtype == torch.bfloat16)
        kernel = f"fused C kernel ({variant} build)" if varlen_attention.available(variant) else \
            "PyTorch's flash kernel per sequence (the C kernel could not be built)"
    return (f"CPU: {cpu_info().describe()}; GEMMs: {_MODE_WORDS[gemm_mode(dtype)].format(dtype=name)}; "
            f"attention: {kernel}")


# Set to "fused", "flash" or "bmm" to override the CPU attention kernel (benchmarks: bench/cpu_kernels.py).
ATTENTION_ENV = "TOKENPOOL_CPU_ATTENTION"
_ATTENTION_KERNELS = ("fused", "flash", "bmm")


def attention_kernel(dtype: torch.dtype) -> str:
    """The CPU attention kernel: "fused" (tokenpool/kernels/varlen_attention.c: every sequence and head of a
    batch in one call, fp32 arithmetic, built for this class; where it cannot be built, PyTorch's "flash"
    kernel per sequence), "flash", or "bmm" (fp32 scores through two batched GEMMs per sequence)."""
    forced = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if forced:
        if forced not in _ATTENTION_KERNELS:
            raise ValueError(f"${ATTENTION_ENV}={forced!r}: use one of {', '.join(_ATTENTION_KERNELS)}.")
        return forced
    return "fused"
