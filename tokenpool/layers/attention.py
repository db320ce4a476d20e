"""Variable-length attention over a packed batch `[total_tokens, heads, head_dim]` described by `cu_seqlens`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.10: FlashAttention's varlen kernel (CUDA, fp16/bf16).
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


@dataclass
class AttentionMetadata:
    """Where each sequence of a packed batch starts and ends.

    cu_seqlens: int32 `[num_seqs + 1]` on the model's device; seq_lens: the same on the host;
    max_seqlen: the longest sequence; causal: decoder backbones attend to earlier tokens only.
    """

    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    max_seqlen: int
    causal: bool = False

    @classmethod
    def from_seq_lens(cls, seq_lens: list[int], device: torch.device, causal: bool = False) -> "AttentionMetadata":
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
        return cls(cu.to(device, non_blocking=True), list(seq_lens), max(seq_lens), causal)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Attention of each sequence to itself. q, k, v: `[T, heads, head_dim]` -> `[T, heads, head_dim]`."""
    if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _varlen_attn(
            q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
            window_size=(-1, 0) if meta.causal else (-1, -1),
        )
    return _per_sequence_sdpa(q, k, v, meta)


def _per_sequence_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The reference path (CPU, fp32 on CUDA): one fused SDPA call per sequence, no padding."""
    out = torch.empty_like(q)
    start = 0
    for length in meta.seq_lens:
        end = start + length
        # [L, H, D] -> [H, L, D]
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=meta.causal).transpose(0, 1)
        start = end
    return out
