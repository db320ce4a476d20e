"""Python side of varlen_attention.c: every sequence and head of a packed batch in one call."""

from __future__ import annotations

import ctypes

import torch

from tokenpool.kernels import kernel_variant, function, vector_width
from tokenpool.platforms.cpu import cpu_info

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


_ARGS = (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, _I64, _I64,
         ctypes.c_int, ctypes.c_int)


def available(variant: str | None = None) -> bool:
    """Whether the kernel is built and loaded (builds it on the first call); variant: see tokenpool.kernels."""
    return function("varlen_attention", _ARGS, variant) is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str | None = None) -> bool:
    """fp32 or bf16 `[T, heads, head_dim]` views with contiguous heads, head_dim a multiple of the vector width."""
    head_dim = q.shape[-1]
    return (q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and head_dim % vector_width(variant) == 0 and q.device.type == "cpu"
            and all(t.stride(2) == 1 and t.stride(1) == head_dim for t in (q, k, v)))


def _bf16_mode(dtype: torch.dtype, variant: str) -> int:
    """The kernel's element mode: 0 fp32, 1 bf16, 2 bf16 with AVX512-BF16 products (the avx512 build on a CPU whose
    flags have avx512_bf16; a build without that path runs mode 1)."""
    if dtype != torch.bfloat16:
        return 0
    return 2 if variant == "avx512" and cpu_info().isa_class == "avx512_bf16" else 1


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     window: tuple[int, int] = (-1, -1), variant: str | None = None) -> torch.Tensor:
    """q `[T, H, D]`, k / v `[T, KVH, D]` (KVH divides H) -> `[T, H, D]` in q's dtype; rows past the last
    sequence (`cu_seqlens[-1]`) are zeros. window (left, right): row i attends keys i-left..i+right of its
    sequence (-1: unbounded; causal is (-1, 0)). Check `available()` and `supports()` first."""
    tokens, heads, head_dim = q.shape
    variant = variant or kernel_variant(q.dtype == torch.bfloat16)
    out = q.new_empty((tokens, heads, head_dim))
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous() else \
        cu_seqlens.to(torch.int32).contiguous()
    kernel = function("varlen_attention", _ARGS, variant)
    rc = kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
                heads * head_dim, cu.data_ptr(), cu.numel() - 1, heads, k.shape[1], head_dim, head_dim ** -0.5,
                int(window[0]), int(window[1]), _bf16_mode(q.dtype, variant), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"varlen_attention kernel failed (code {rc}: 1 bad shape, 2 bad cu_seqlens, 3 out of memory)")
    used = int(cu[-1])
    if used < tokens:
        out[used:].zero_()
    return out
