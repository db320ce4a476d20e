"""Gated activations: the MLP's gate and up projections come out of one stacked GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's `silu(gate) * up` for `[tokens, 2 * intermediate]` = (gate, up) side by side."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

