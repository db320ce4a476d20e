"""Python side of maxsim.c: MaxSim of stacked queries against a segment's documents, or every document of several
segments, in one call."""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from tokenpool.kernels import build_variant, function, kernel_variant
from tokenpool.platforms.cpu import cpu_info

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = (_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, ctypes.c_int,
         ctypes.c_int)
_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2}
_ERRORS = {1: "bad shape", 2: "bad offsets", 3: "out of memory", 4: "no bf16 path on this CPU or build"}


def available(bf16: bool = False) -> bool:
    """Whether the kernel is built for this CPU (builds it); bf16: a bf16 path, on AMX (the amx build) or with
    AVX512-BF16 (the avx512 build on a CPU whose flags have avx512_bf16, where the compiler could build it)."""
    if bf16 and not (build_variant() == "amx" or cpu_info().isa_class == "avx512_bf16"):
        return False
    if function("maxsim", _ARGS, kernel_variant(bf16)) is None:
        return False
    return not bf16 or _bf16_runs()


@functools.cache
def _bf16_runs() -> bool:
    """Whether this build runs the bf16 path (an old compiler builds the avx512 variant without it): one tiny call."""
    x = np.ones((1, 32), dtype=np.float32)
    try:
        maxsim(x, np.zeros(1, dtype=np.int64), x, np.array([0, 1]), bf16=True)
    except RuntimeError:
        return False
    return True


def maxsim(queries: np.ndarray, starts: np.ndarray, codes: np.ndarray, offsets: np.ndarray, *,
           scales: np.ndarray | None = None, dim_scales: np.ndarray | None = None, docs: np.ndarray | None = None,
           bf16: bool = False, threads: int = 1, variant: str | None = None) -> np.ndarray:
    """`[n_queries, n_docs]` float32 MaxSim of each query (rows starts[i].. of `queries` `[rows, dim]` fp32)
    against documents `docs` (positions; default all) of a segment (`codes` `[tokens, dim]` fp32 / fp16 / int8
    with `scales` and `dim_scales` for int8, `offsets` `[docs + 1]`). bf16: products on the AMX tiles or with
    AVX512-BF16 (dim a multiple of 32), both sides rounded to bf16 (|error of a dot product| <= 2^-8 |q| |x| (1 + 2^-7)). Check `available` first;
    variant: a build of tokenpool.kernels (default: this CPU's, AVX-512 for fp32 on the AMX class)."""
    return maxsim_segments(queries, starts, [(codes, offsets, scales)], dim_scales=dim_scales, docs=docs, bf16=bf16,
                           threads=threads, variant=variant)


def maxsim_segments(queries: np.ndarray, starts: np.ndarray, segments: list[tuple], *,
                    dim_scales: np.ndarray | None = None, docs: np.ndarray | None = None, bf16: bool = False,
                    threads: int = 1, variant: str | None = None) -> np.ndarray:
    """`maxsim` over the documents of several segments of one codec in one call (one parallel region):
    `segments` a list of (codes, offsets, scales or None); `[n_queries, documents]`, every document segment after
    segment, or the positions `docs` of that order."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    row_query = np.repeat(np.arange(len(starts), dtype=np.int32), np.diff(np.append(starts, len(queries))))
    codes = [np.asarray(c) for c, _, _ in segments]  # a memory map stays one: the kernel reads it in place
    if len({c.dtype for c in codes}) > 1:
        raise ValueError("segments of one call share a codec")
    offsets = [np.ascontiguousarray(o, dtype=np.int64) for _, o, _ in segments]
    first = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum([len(o) - 1 for o in offsets], out=first[1:])
    table = lambda arrays: np.array([_ptr(a) or 0 for a in arrays], dtype=np.uintp)  # noqa: E731
    code_ptrs, scale_ptrs, offset_ptrs = table(codes), table([sc for _, _, sc in segments]), table(offsets)
    if docs is not None:
        docs = np.ascontiguousarray(docs, dtype=np.int64)
        if len(docs) and (docs.min() < 0 or docs.max() >= first[-1]):
            raise ValueError(f"document positions must be in 0..{int(first[-1]) - 1}")
    n_docs = int(first[-1]) if docs is None else len(docs)
    out = np.empty((n_docs, len(starts)), dtype=np.float32)
    rc = function("maxsim", _ARGS, variant or kernel_variant(bf16))(
        _ptr(queries), len(queries), queries.shape[1], _ptr(row_query), len(starts), len(segments), _ptr(code_ptrs),
        _KINDS[codes[0].dtype], _ptr(scale_ptrs), _ptr(dim_scales), _ptr(offset_ptrs), _ptr(first), _ptr(docs),
        n_docs, _ptr(out), int(bf16), threads)
    if rc != 0:
        raise RuntimeError(f"maxsim kernel failed (code {rc}: {_ERRORS.get(rc, 'unknown')})")
    return out.T


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data

