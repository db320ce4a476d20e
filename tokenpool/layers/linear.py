"""`Linear`: a dense layer whose CPU path runs on oneDNN, with the bias and the activation fused.

On the CPU, PyTorch's float32 `F.linear` calls MKL's sgemm, which takes its AVX2 code path on AMD CPUs:
~210 GFLOP/s on two Zen 5 cores, against ~440 for oneDNN's AVX-512 kernels on MiniLM's shapes (bf16 goes
to oneDNN either way, ~850). Here oneDNN also applies the bias and GELU in the GEMM's epilogue (in fp32,
before the bf16 rounding) and reads a weight reordered once into its blocked layout instead of on every
call. float32 stays IEEE float32: the same fp32 products and accumulation, different summation order
(outputs within ~1e-6 of `F.linear`'s). Other devices: `F.linear`, then the activation.

bf16 / fp16 on a CPU without native instructions for them (`tokenpool.platforms.cpu.gemm_mode`): the
weight (already rounded to the dtype) is kept as fp32 for oneDNN, the input is the dtype's, the products
are summed in fp32 and the output is rounded back to the dtype: what the native kernels compute, at fp32
speed. (PyTorch's own bf16 GEMM refuses AVX2-only CPUs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpool.platforms.cpu import gemm_mode

# name -> (oneDNN post-op, its algorithm, the eager function)
_ACTIVATIONS = {
    "gelu": ("gelu", "none", F.gelu),
    "gelu_tanh": ("gelu", "tanh", lambda x: F.gelu(x, approximate="tanh")),
    "relu": ("relu", "", F.relu),
}
# Rows per GEMM the packed weight layout is chosen for: the CPU batch token budget.
_PACK_ROWS = 4096


class Linear(nn.Linear):
    """`nn.Linear` followed by an optional activation: "gelu", "gelu_tanh" or "relu"."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None):
        super().__init__(in_features, out_features, bias=bias)
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"Unsupported activation {activation!r}; use one of {', '.join(_ACTIVATIONS)}.")
        self.activation = activation
        self._packed: tuple | None = None  # ((data_ptr, version), (packed weight, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            packed = self._cpu_weights()
            if packed is not None:
                weight, bias = packed
                attr, algorithm = ("none", "") if self.activation is None else _ACTIVATIONS[self.activation][:2]
                y = torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), weight, bias, attr, [], algorithm)
                return y.to(self.weight.dtype)
        y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else _ACTIVATIONS[self.activation][2](y)

    def _cpu_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight in oneDNN's blocked layout, bias) for this CPU and dtype, or None for `F.linear`.

        Reordered on first use (and again if the weight changes). Where the dtype is emulated the packed
        weight (and bias) are fp32 copies of the dtype's values.
        """
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            mode = gemm_mode(self.weight.dtype)
            if mode == "aten":
                return None
            weight, bias = self.weight.detach(), None if self.bias is None else self.bias.detach()
            if mode == "emulated":
                weight, bias = weight.float(), None if bias is None else bias.float()
            self._packed = (key, (torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS), bias))
        return self._packed[1]
