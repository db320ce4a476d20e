"""Chains of elementwise ops compiled into one kernel each on CUDA (torch.compile, dynamic token count).

Eager PyTorch runs RMSNorm, the residual add before it, the rotary rotation and SiLU x up as 4-10 passes
over the activations; compiled, each chain is one Triton kernel computing the same function. A model builds
one `FusedOps(compile=...)` and hands it to its layers, so `enforce_eager=True` (no compilation) is a
constructor argument, not a global.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from tokenpool.layers.activation import gelu_mul, silu_mul
from tokenpool.layers.norm import add_pre_layer_norm, add_rms_norm, layer_norm, rms_norm
from tokenpool.layers.rotary import rotate

logger = logging.getLogger("tokenpool")

# TOKENPOOL_COMPILE=0 keeps eager PyTorch everywhere (a debugging switch, as vLLM's enforce_eager).
COMPILE_BY_DEFAULT = os.environ.get("TOKENPOOL_COMPILE", "1") != "0"


class _CompiledOnCuda:
    """`fn` for CPU tensors; for CUDA tensors, `fn` compiled on first use (eager again if compiling fails)."""

    # One compiled function per Python function, shared by every model of the process: compiling costs seconds.
    _cache: dict[Callable, Callable | None] = {}

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def __call__(self, *args):
        if not args[0].is_cuda:
            return self.fn(*args)
        compiled = self._cache.get(self.fn, False)
        if compiled is False:
            compiled = self._cache[self.fn] = torch.compile(self.fn, dynamic=True, fullgraph=True)
        if compiled is None:
            return self.fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # no Triton, no compiler: the eager ops compute the same function
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.__name__, type(e).__name__, e)
            self._cache[self.fn] = None
            return self.fn(*args)


class FusedOps:
    """The elementwise chains of the rotary backbones: `rms_norm`, `add_rms_norm`, `rotate`, `silu_mul` (Qwen2),
    `add_pre_layer_norm`, `layer_norm`, `gelu_mul` (ModernBERT).

    `compile=False` (or TOKENPOOL_COMPILE=0) gives the plain eager functions; on CPU tensors they are always
    eager (the CPU's time is in the GEMMs and attention, and inductor's first compile costs ~a minute there).
    """

    def __init__(self, compile: bool = True):
        self.compiled = compile and COMPILE_BY_DEFAULT
        wrap = _CompiledOnCuda if self.compiled else (lambda fn: fn)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.rotate = wrap(rotate)
        self.silu_mul = wrap(silu_mul)
        self.add_pre_layer_norm = wrap(add_pre_layer_norm)
        self.layer_norm = wrap(layer_norm)
        self.gelu_mul = wrap(gelu_mul)
