"""`Linear`: a dense layer whose CPU path runs on oneDNN, with the bias and the activation fused.

On the CPU, PyTorch's float32 `F.linear` calls MKL's sgemm, which takes its AVX2 code path on AMD CPUs:
~210 GFLOP/s on two Zen 5 cores, against ~440 for oneDNN's AVX-512 kernels on MiniLM's shapes (bf16 goes
to oneDNN either way, ~850). Here oneDNN also applies the bias and GELU in the GEMM's epilogue (in fp32,
before the bf16 rounding) and reads a weight reordered once into its blocked layout instead of on every
call. float32 stays IEEE float32: the same fp32 products and accumulation, different summation order
(outputs within ~1e-6 of `F.linear`'s). Other devices and dtypes: `F.linear`, then the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> (oneDNN post-op, its algorithm, the eager function)
_ACTIVATIONS = {
    "gelu": ("gelu", "none", F.gelu),
    "gelu_tanh": ("gelu", "tanh", lambda x: F.gelu(x, approximate="tanh")),
    "relu": ("relu", "", F.relu),
}
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# Rows per GEMM the packed weight layout is chosen for: the CPU batch token budget.
_PACK_ROWS = 4096


class Linear(nn.Linear):
    """`nn.Linear` followed by an optional activation: "gelu", "gelu_tanh" or "relu"."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None):
        super().__init__(in_features, out_features, bias=bias)
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"Unsupported activation {activation!r}; use one of {', '.join(_ACTIVATIONS)}.")
        self.activation = activation
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None  # ((data_ptr, version), weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.dtype == self.weight.dtype):
            attr, algorithm = ("none", "") if self.activation is None else _ACTIVATIONS[self.activation][:2]
            return torch.ops.mkldnn._linear_pointwise(x, self._onednn_weight(), self.bias, attr, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else _ACTIVATIONS[self.activation][2](y)

    def _onednn_weight(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout, reordered on first use (and again if the weight changes)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_ROWS))
        return self._packed[1]
