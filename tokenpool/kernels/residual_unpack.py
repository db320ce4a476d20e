"""Python side of residual_unpack.c: the residual codec's packed codes -> quantized residual coordinates."""

from __future__ import annotations

import ctypes

import numpy as np

from tokenpool.kernels import function

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = (_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, ctypes.c_int)


def available() -> bool:
    """Whether the kernel is built for this CPU (builds it)."""
    return function("residual_unpack", _ARGS) is not None


def residual_unpack(codes: np.ndarray, first: np.ndarray, second: np.ndarray, shift: np.ndarray, mask: np.ndarray,
                    levels: np.ndarray, out: np.ndarray, threads: int = 1) -> np.ndarray:
    """`out` `[n, dim]` float32 (written): per token of `codes` `[n, code bytes]` uint8 and axis d,
    `levels[d, ((codes[first[d]] << 8 | codes[second[d]]) >> shift[d]) & mask[d]]`. Check `available` first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    first, second = (np.ascontiguousarray(a, dtype=np.int64).ravel() for a in (first, second))
    shift, mask = (np.ascontiguousarray(a, dtype=np.int32).ravel() for a in (shift, mask))
    levels = np.ascontiguousarray(levels, dtype=np.float32)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != (len(codes), levels.shape[0]):
        raise ValueError("out must be a C-contiguous float32 [tokens, dim] array")
    rc = function("residual_unpack", _ARGS)(codes.ctypes.data, len(codes), codes.shape[1], levels.shape[0],
                                            first.ctypes.data, second.ctypes.data, shift.ctypes.data,
                                            mask.ctypes.data, levels.ctypes.data, levels.shape[1], out.ctypes.data,
                                            threads)
    if rc != 0:
        raise RuntimeError(f"residual_unpack kernel failed (code {rc}: a bad argument)")
    return out
