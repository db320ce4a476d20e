"""Norms: residual add + LayerNorm fused into one pass (a Triton kernel on CUDA, a C kernel on the CPU); RMSNorm.

The unfused form reads and writes the `[tokens, hidden]` activations five times (add: 2 reads + 1 write,
LayerNorm: 1 read + 1 write); the Triton kernel reads both inputs once and writes once. It computes the
same function as the unfused torch ops, including the rounding of `x + residual` to the activation dtype
before normalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenpool.kernels import add_layer_norm as fused_add_layer_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x + residual)` for `[tokens, hidden]` tensors."""
    if triton is not None and x.is_cuda and x.is_contiguous() and residual.is_contiguous() and x.dim() == 2:
        return _fused(x, residual, norm.weight, norm.bias, norm.eps)
    return norm(x + residual)


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        r = tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0)
        s = (x + r).to(tl.float32)  # x + r rounded to the activation dtype, as the unfused add does
        mean = tl.sum(s, axis=0) / n_cols
        d = tl.where(mask, s - mean, 0.0)
        var = tl.sum(d * d, axis=0) / n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = d * tl.rsqrt(var + eps) * w + b
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        rows, cols = x.shape
        out = torch.empty_like(x)
        block = triton.next_power_of_2(cols)
        _add_layer_norm_kernel[(rows,)](x, residual, weight, bias, out, cols, eps, BLOCK=block,
                                        num_warps=4 if block >= 1024 else 2)
        return out


def add_layer_norm_cast(y: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm,
                        gemm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm(y + x)`, and the same rounded to `gemm_dtype` for the next GEMM.

    On the CPU, with an fp32 residual stream, one pass of tokenpool/kernels/add_layer_norm.c that overwrites x
    (the caller's residual, dead after this call) and writes the bf16 copy in the same pass: the unfused
    add, LayerNorm and cast read and write the activations ~8 times.
    """
    if x.device.type == "cpu" and fused_add_layer_norm.supports(y, x, norm):
        lowp = gemm_dtype if gemm_dtype in (torch.float32, torch.bfloat16) else None
        out, out_lowp = fused_add_layer_norm.add_layer_norm_(y, x, norm, lowp)
        return out, out_lowp if lowp is not None else out.to(gemm_dtype)
    out = add_layer_norm(y, x, norm)
    return out, out.to(gemm_dtype)


def add_pre_layer_norm(delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: returns (x + delta, layer_norm(x + delta) in the GEMM dtype)."""
    x = x + delta
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               dtype: torch.dtype) -> torch.Tensor:
    """layer_norm(x) in the GEMM dtype (where the residual add already happened in a GEMM's epilogue)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def reference_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """The unfused form, for tests."""
    return F.layer_norm(x + residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class RMSNorm(torch.nn.Module):
    """`weight * x / rms(x)`, computed in fp32 and rounded to the input dtype before the weight (as Qwen2)."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: returns (x + delta, rms_norm(x + delta) in the GEMM dtype)."""
    x = x + delta
    return x, rms_norm(x, weight, eps).to(dtype)
