"""Gated activations: the MLP's two halves come out of one stacked GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's `silu(gate) * up` for `[tokens, 2 * intermediate]` = (gate, up) side by side."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_mul(input_gate: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU's `gelu(input) * gate` for `[tokens, 2 * intermediate]` = (input, gate) side by side (ModernBERT)."""
    x, gate = input_gate.chunk(2, dim=-1)
    return F.gelu(x, approximate=approximate) * gate
