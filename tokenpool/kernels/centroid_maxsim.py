"""Python side of centroid_maxsim.c: the residual index's centroid MaxSim of one query's (query, document) pairs."""

from __future__ import annotations

import ctypes

import numpy as np

from tokenpool.kernels import function

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = (_PTR, _I64, _I64, _PTR, ctypes.c_int, _PTR, _PTR, _I64, _PTR, ctypes.c_int)
_KINDS = {np.dtype(np.uint16): 0, np.dtype(np.int32): 1}
MAX_ROWS = 256


def available() -> bool:
    """Whether the kernel is built for this CPU (builds it)."""
    return function("centroid_maxsim", _ARGS) is not None


def supports(cids: np.ndarray, rows: int) -> bool:
    """Whether the kernel takes centroid ids `cids` (uint16 or int32) and queries of `rows` rows, and is built."""
    return np.asarray(cids).dtype in _KINDS and rows <= MAX_ROWS and available()


def centroid_maxsim(scores: np.ndarray, cids: np.ndarray, offsets: np.ndarray, docs: np.ndarray,
                    threads: int = 1, variant: str | None = None) -> np.ndarray:
    """float32 `[len(docs)]`: per document (positions `docs` of a segment with token offsets `offsets` and
    centroid ids `cids`, uint16 or int32, a memory map read in place), the sum over the query's rows of the
    max over its tokens of `scores [rows, n_centroids]` at the token's centroid. rows <= MAX_ROWS; check
    `supports` first. variant: a build of tokenpool.kernels (default: this CPU's)."""
    rows = scores.shape[0]
    mp = max(16, -(-rows // 16) * 16)  # zero rows up to a multiple of 16: whole vectors, each adds 0
    table = np.zeros((scores.shape[1], mp), dtype=np.float32)
    table[:, :rows] = scores.T
    cids = np.ascontiguousarray(cids)  # a whole memory map stays one (read in place)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    docs = np.ascontiguousarray(docs, dtype=np.int64)
    out = np.empty(len(docs), dtype=np.float32)
    rc = function("centroid_maxsim", _ARGS, variant)(table.ctypes.data, table.shape[0], mp, cids.ctypes.data,
                                            _KINDS[cids.dtype], offsets.ctypes.data, docs.ctypes.data, len(docs),
                                            out.ctypes.data, threads)
    if rc != 0:
        raise RuntimeError(f"centroid_maxsim kernel failed (code {rc})")
    return out
