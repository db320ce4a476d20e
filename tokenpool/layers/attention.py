"""Variable-length attention over a packed batch `[total_tokens, heads, head_dim]` described by `cu_seqlens`."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import numpy as np

import torch
import torch.nn.functional as F

from tokenpool.kernels import kernel_variant
from tokenpool.kernels import varlen_attention as fused_attention
from tokenpool.layers import triton_attention
from tokenpool.platforms.cpu import attention_kernel, gemm_mode

try:  # PyTorch >= 2.10: FlashAttention's varlen kernel (CUDA, fp16/bf16).
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _VARLEN_GQA = "enable_gqa" in inspect.signature(_varlen_attn).parameters
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_GQA = None, False


@dataclass
class AttentionMetadata:
    """Where each sequence of a packed batch starts and ends.

    cu_seqlens: int32 `[num_seqs + 1]` on the model's device; seq_lens: the same on the host;
    max_seqlen: the longest sequence; causal: decoder backbones attend to earlier tokens only; window: below.
    """

    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    max_seqlen: int
    causal: bool = False
    # (left, right): a token attends the tokens i-left..i+right of its sequence (-1: unbounded), as
    # FlashAttention's window_size; ModernBERT's local layers use (w/2, w/2). Combined with `causal`.
    window: tuple[int, int] = (-1, -1)
    # Only the first key_lens[i] rows of sequence i are keys (ColBERT query expansion without attention to
    # the expansion positions: they read the text, nothing reads them); None: every row is a key.
    # kv_rows: those rows' indices in the batch; cu_seqlens_k: their offsets once gathered.
    key_lens: list[int] | None = None
    kv_rows: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    # the Triton kernel's tile tables, built once per batch and shared by its layers (and by the copies that
    # `dataclasses.replace` makes for windowed layers: the tables depend on seq_lens only)
    tiles: dict = field(default_factory=dict, repr=False, compare=False)

    def with_key_lens(self, key_lens: list[int]) -> "AttentionMetadata":
        starts = np.cumsum([0] + self.seq_lens[:-1])
        rows = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, key_lens)]).astype(np.int64)
        device = self.cu_seqlens.device
        cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(key_lens)]).astype(np.int32))
        return dataclasses.replace(self, key_lens=list(key_lens),
                                   kv_rows=torch.from_numpy(rows).to(device, non_blocking=True),
                                   cu_seqlens_k=cu_k.to(device, non_blocking=True))

    @property
    def window_bounds(self) -> tuple[int, int]:
        """The effective (left, right) window, causality included."""
        left, right = self.window
        return left, (0 if self.causal else right)

    @classmethod
    def from_seq_lens(cls, seq_lens: list[int], device: torch.device, causal: bool = False) -> "AttentionMetadata":
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
        return cls(cu.to(device, non_blocking=True), list(seq_lens), max(seq_lens), causal)


def takes_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether `varlen_attention` runs tokenpool's Triton kernel for these inputs (CUDA, fp16/bf16, a head size
    it has, every row a key; `TOKENPOOL_CUDA_ATTENTION` not `flash`): callers that fuse work into that kernel
    (ModernBERT's rotary of q) ask here, so the choice is made in one place."""
    return (q.is_cuda and meta.kv_rows is None and triton_attention.enabled()
            and triton_attention.supports(q, k, v))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Attention of each sequence to itself. q: `[T, heads, head_dim]`, k, v: `[T, kv_heads, head_dim]` (grouped
    KV heads: kv_heads divides heads) -> `[T, heads, head_dim]`."""
    groups = q.shape[1] // k.shape[1]
    cu_k, max_k = meta.cu_seqlens, meta.max_seqlen
    if meta.kv_rows is not None:
        k, v = k.index_select(0, meta.kv_rows), v.index_select(0, meta.kv_rows)
        cu_k, max_k = meta.cu_seqlens_k, max(meta.key_lens)
    if takes_triton(q, k, v, meta):
        return triton_attention.varlen_attention(q, k, v, meta.seq_lens, meta.window_bounds, meta.tiles)
    if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
        kwargs = {}
        if groups > 1 and _VARLEN_GQA:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return _varlen_attn(
            q, k, v, meta.cu_seqlens, cu_k, meta.max_seqlen, max_k,
            window_size=meta.window_bounds, **kwargs,
        )
    if meta.kv_rows is not None:  # a few short queries: PyTorch's per-sequence kernel with its own key rows
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dtype = q.dtype
        if q.device.type == "cpu" and gemm_mode(dtype) == "emulated":
            q, k, v = q.float(), k.float(), v.float()
        return _per_sequence_sdpa(q, k, v, meta).to(dtype)
    if q.device.type == "cpu":
        return _cpu_attention(q, k, v, meta)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _per_sequence_sdpa(q, k, v, meta)


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """With the kernel chosen for this CPU (`tokenpool.platforms.cpu.attention_kernel`): our C kernel, one call
    for the whole batch, else PyTorch's flash-attention kernel or two bmm per sequence.

    Rows past the last sequence (the runner rounds a CPU batch's rows up to a bucket) come out as zeros.
    Where the dtype is emulated the inputs are upcast: the scores are computed in fp32 arithmetic.
    """
    dtype = q.dtype
    kernel = attention_kernel(dtype)
    if gemm_mode(dtype) == "emulated":
        q, k, v = q.float(), k.float(), v.float()
    variant = kernel_variant(q.dtype == torch.bfloat16)
    if kernel == "fused" and fused_attention.supports(q, k, v, variant) and fused_attention.available(variant):
        return fused_attention.varlen_attention(q, k, v, meta.cu_seqlens, meta.window_bounds, variant).to(dtype)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if meta.window != (-1, -1):  # PyTorch's CPU kernels have no window: a band mask
        out = _per_sequence_sdpa(q, k, v, meta)
    else:
        out = (_bmm_fp32_scores if kernel == "bmm" else _flash_cpu)(q, k, v, meta)
    return out.to(dtype)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """PyTorch's flash-attention CPU kernel, one call per sequence: blocked QK^T -> online softmax -> PV, with
    fp32 scores and accumulators, bf16 blocks through AMX / AVX512-BF16 where the CPU has them."""
    out = q.new_empty(q.shape)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    start = 0
    for length in meta.seq_lens:
        end = start + length
        qs, ks, vs = (t[start:end].unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # [1, H, L, D] views
        out[start:end] = flash(qs, ks, vs, is_causal=meta.causal)[0][0].transpose(0, 1)
        start = end
    if start < out.shape[0]:
        out[start:].zero_()
    return out


def _bmm_fp32_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Per sequence, fp32 scores -> in-place softmax -> weighted sum of values (two bmm). Bidirectional only."""
    if meta.causal:
        return _flash_cpu(q, k, v, meta)
    out = torch.zeros(q.shape, dtype=torch.float32)
    out_heads = out.transpose(0, 1)  # [H, T, D] view of the output
    scale = q.shape[-1] ** -0.5
    start = 0
    for length in meta.seq_lens:
        end = start + length
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))  # [H, L, D]
        scores = torch.bmm(qs, ks.transpose(1, 2))  # [H, L, L]
        scores.mul_(scale)
        torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place: no second [H, L, L] buffer
        out_heads[:, start:end].copy_(torch.bmm(scores, vs))
        start = end
    return out


def _per_sequence_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The reference path (CPU, fp32 on CUDA): one fused SDPA call per sequence, no padding; a window becomes
    a band mask. Rows past the last sequence come out as zeros."""
    out = torch.zeros_like(q)
    left, right = meta.window_bounds
    key_lens = meta.key_lens or meta.seq_lens  # k, v hold only the key rows when key_lens is set
    start = key_start = 0
    for length, keys in zip(meta.seq_lens, key_lens):
        end = start + length
        # [L, H, D] -> [H, L, D]
        qs = q[start:end].transpose(0, 1)
        ks, vs = (t[key_start:key_start + keys].transpose(0, 1) for t in (k, v))
        key_start += keys
        if (left, right) == (-1, 0):
            res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        elif (left, right) == (-1, -1):
            res = F.scaled_dot_product_attention(qs, ks, vs)
        else:
            pos = torch.arange(length, device=q.device)
            offset = pos[None, :keys] - pos[:, None]  # key - query
            band = torch.ones_like(offset, dtype=torch.bool)
            if left >= 0:
                band &= offset >= -left
            if right >= 0:
                band &= offset <= right
            res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band)
        out[start:end] = res.transpose(0, 1)
        start = end
    return out
