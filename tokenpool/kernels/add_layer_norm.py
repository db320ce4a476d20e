"""Python side of add_layer_norm.c: `LayerNorm(y + x)` into the fp32 residual stream x, in one pass."""

from __future__ import annotations

import ctypes

import torch

from tokenpool.kernels import function, vector_width

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = (_PTR, _PTR, _I64, ctypes.c_int, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float, ctypes.c_int)


def supports(y: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm, variant: str | None = None) -> bool:
    """x: contiguous fp32 `[rows, n]` on the CPU; y: fp32 or bf16 rows of n with contiguous columns; norm: fp32
    weight and bias of n; n a multiple of the vector width. Checks that the kernel is built (builds it)."""
    n = x.shape[-1]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and y.dim() == 2 and y.shape == x.shape and y.dtype in (torch.float32, torch.bfloat16) and y.stride(1) == 1
            and norm.weight is not None and norm.bias is not None and norm.weight.dtype == torch.float32
            and norm.bias.dtype == torch.float32 and n % vector_width(variant) == 0
            and function("add_layer_norm", _ARGS, variant) is not None)


def add_layer_norm_(y: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm, lowp: torch.dtype | None,
                    variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x <- norm(y + x) in place; returns (x, x rounded to `lowp` (bf16) or x itself). Check `supports` first."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.bfloat16) if lowp == torch.bfloat16 else None
    rc = function("add_layer_norm", _ARGS, variant)(
        x.data_ptr(), y.data_ptr(), y.stride(0), int(y.dtype == torch.bfloat16), norm.weight.data_ptr(),
        norm.bias.data_ptr(), None if out is None else out.data_ptr(), rows, n, norm.eps, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"add_layer_norm kernel failed (code {rc})")
    return x, (x if out is None else out)
