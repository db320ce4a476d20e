"""Rotary position embeddings (rotate-half form): 1-D, and Qwen2-VL's multimodal (t, h, w) sections."""

from __future__ import annotations

import torch


def inverse_frequencies(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2 (computed per call: modules are built on the meta device)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `[T, heads, D]` by per-token `[T, D]` cos/sin, computed in fp32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


class RotaryEmbedding:
    """cos, sin `[T, head_dim]` of positions: `[T]` (plain rotary) or `[3, T]` with `sections` (M-RoPE).

    M-RoPE (Qwen2-VL): frequency group i of `sections` (which sum to head_dim / 2) is rotated by position axis
    i % 3 (temporal, height, width); a text token has three equal ids, which is plain 1-D rotary.
    """

    def __init__(self, head_dim: int, theta: float, sections: list[int] | None = None):
        sections = list(sections or [head_dim // 2])
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections} must sum to head_dim/2 = {head_dim // 2}.")
        self.head_dim, self.theta, self.sections = head_dim, theta, sections

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(self.theta, self.head_dim, positions.device)
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * inv_freq
        else:
            axis = torch.repeat_interleave(torch.arange(len(self.sections)) % 3,
                                           torch.tensor(self.sections)).to(positions.device)
            per_freq = positions.index_select(0, axis).T  # [T, head_dim/2]: each frequency's position id
            freqs = per_freq.float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def table(self, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[positions, head_dim / 2]` of positions 0..positions-1 (1-D rotary; the first half of what
        `__call__` gives for those positions, the same fp32 arithmetic), cached per device."""
        if len(self.sections) != 1:
            raise ValueError("Rotary tables are for 1-D rotary embeddings.")
        cached = getattr(self, "_tables", {})
        key = (positions, torch.device(device))
        if key not in cached:
            freqs = torch.arange(positions, device=device).float()[:, None] * inverse_frequencies(
                self.theta, self.head_dim, torch.device(device))
            cached[key] = (freqs.cos().contiguous(), freqs.sin().contiguous())
            self._tables = cached
        return cached[key]


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None


def rotate_heads_cuda_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> bool:
    """Rotate, in place, the first `heads` heads of every row of a CUDA `[T, width]` (a fused qkv output: the
    q heads and then the k heads) by `[T, head_dim]` cos / sin, in fp32: `rotate` of those heads, without the
    copies. Returns False (nothing done) where the Triton kernel does not apply.

    torch.compile's dynamic-shape kernel of `rotate` on the strided q / k views moved ~0.6 TB/s on an H200
    (runtime-stride divisions per element): a quarter of ModernBERT-base's forward time.
    """
    half = head_dim // 2
    if (triton is None or not x.is_cuda or x.dim() != 2 or x.stride(1) != 1 or head_dim % 2 or cos.stride(1) != 1 or sin.stride() != cos.stride()
            or x.shape[1] < heads * head_dim):
        return False
    n = x.shape[0] * heads * half  # (token, head, d < half) triples, one flat range
    if n:
        _rotate_kernel[(triton.cdiv(n, _BLOCK),)](x, cos, sin, n, x.stride(0), cos.stride(0), HEADS=heads, HALF=half,
                                                 BLOCK=_BLOCK, num_warps=4)
    return True


_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, n, row_stride, cos_stride, HEADS: tl.constexpr, HALF: tl.constexpr,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        t = i // (HEADS * HALF)  # divisions by compile-time constants
        h = (i // HALF) % HEADS
        d = i % HALF
        first = x_ptr + t * row_stride + h * (2 * HALF) + d
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * cos_stride + d, mask=mask, other=0.0).to(tl.float32)  # cos / sin: first half
        s = tl.load(sin_ptr + t * cos_stride + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(first, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(first + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)
