"""The instruction-set class of an x86-64 CPU from its flags, lowered by the cap variables (no torch:
bench/gemm_rate.py loads this file on its own). `tokenpool.platforms.cpu` is the engine's view."""

from __future__ import annotations

import os

ISA_CLASSES = ("avx2", "avx512", "avx512_bf16", "amx")

# The cap variables, and how their values map onto our classes (unknown values: no cap).
_ATEN_CAPS = {"default": "none", "avx2": "avx2", "avx512": "avx512"}
_ONEDNN_CAPS = {
    "sse41": "none", "avx": "none", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2",
    "avx512_core": "avx512", "avx512_core_vnni": "avx512", "avx512_core_bf16": "avx512_bf16",
    "avx10_1_512": "avx512_bf16", "avx512_core_fp16": "avx512_bf16",
    "avx10_1_512_amx": "amx", "avx512_core_amx": "amx", "avx10_1_512_amx_fp16": "amx", "avx512_core_amx_fp16": "amx",
}
_MKL_CAPS = {"sse4_2": "none", "avx": "none", "avx2": "avx2", "avx512": "avx512", "avx512_e1": "avx512",
             "avx512_e2": "avx512", "avx512_e3": "avx512_bf16", "avx512_e4": "amx", "avx512_e5": "amx"}
CAP_VARIABLES = {"ATEN_CPU_CAPABILITY": _ATEN_CAPS, "ONEDNN_MAX_CPU_ISA": _ONEDNN_CAPS,
                 "MKL_ENABLE_INSTRUCTIONS": _MKL_CAPS}
# The variables that lower every library to the AVX2 class (what the tests and CI use).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def hardware_class(flags: frozenset[str] | set[str]) -> str:
    """The class of a CPU with these flags ("none" below AVX2)."""
    if "avx2" not in flags:
        return "none"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    if "amx_bf16" in flags and "amx_tile" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512"


def _rank(cls: str) -> int:
    return -1 if cls == "none" else ISA_CLASSES.index(cls)


def lowered_class(hardware: str, env: dict[str, str] | os._Environ = os.environ) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`hardware` capped by the variables set in `env`; also returns the caps that are set."""
    cls, caps = hardware, []
    for name, table in CAP_VARIABLES.items():
        value = env.get(name, "").strip()
        if not value:
            continue
        caps.append((name, value))
        cap = table.get(value.lower())
        if cap is not None and _rank(cap) < _rank(cls):
            cls = cap
    return cls, tuple(caps)
