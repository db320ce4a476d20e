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
