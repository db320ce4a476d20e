"""Variable-length attention on CUDA in Triton: one program per (query tile, head), the tiles laid out from
the batch's sequences (no program for padding), keys visited only inside the tile's window.

Why not only PyTorch's FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`): at encoder lengths
(~200 tokens) its grid is `max_seqlen / 128` query blocks per sequence and head, most of them empty, and a
sliding window (ModernBERT's local layers, 64 tokens each side) costs more than no window: the window is
masked inside every block instead of bounding the key loop. Here a local layer reads only the key blocks
that meet its window, and the tile table holds only the query tiles that exist. bench/NOTES.md has the
measured comparison; `TOKENPOOL_CUDA_ATTENTION=flash` switches back.

Scores are fp32 (`exp2` of scaled logits), the online softmax of FlashAttention; masked scores are a large
finite negative rather than -inf, so a block where a row sees no key contributes nothing once a later block
has one (every row sees at least itself).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

_LOG2E = 1.4426950408889634


def _config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head size (bench/gpu_attention.py's sweep)."""
    return 64, 64, 4, 3


def enabled() -> bool:
    """Whether CUDA attention takes this kernel (`TOKENPOOL_CUDA_ATTENTION`: `triton`, the default, or
    `flash` for PyTorch's FlashAttention-2)."""
    choice = os.environ.get("TOKENPOOL_CUDA_ATTENTION", "triton")
    if choice not in ("triton", "flash"):
        raise ValueError(f"TOKENPOOL_CUDA_ATTENTION must be 'triton' or 'flash', got {choice!r}.")
    return triton is not None and choice == "triton"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return (triton is not None and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and head_dim in (32, 64, 128) and v.shape[-1] == head_dim and q.shape[1] % k.shape[1] == 0
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def tile_table(seq_lens: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """int32 `[tiles, 3]`: (first row of the sequence, its length, the tile's first row within it)."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    per_seq = (lens + block_m - 1) // block_m
    seq = np.repeat(np.arange(len(lens)), per_seq)
    first = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    table = np.stack([starts[seq], lens[seq], first * block_m], axis=1).astype(np.int32)
    return torch.from_numpy(table).to(device, non_blocking=True)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                     window: tuple[int, int], tiles: dict | None = None,
                     config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q `[T, heads, D]`, k / v `[T, kv_heads, D]` (views with unit stride in D; kv_heads divides heads),
    sequences of `seq_lens` laid end to end; `window` (left, right) as FlashAttention's `window_size` (-1:
    unbounded; causal is (-1, 0)) -> `[T, heads, D]`. `tiles`: a dict that caches the tile table per block
    size (the metadata's, shared by the layers of one batch); `config`: (BLOCK_M, BLOCK_N, warps, stages) instead
    of the measured default. Rows past the last sequence (a batch rounded up) come out as zeros."""
    total, heads, head_dim = q.shape
    block_m, block_n, warps, stages = config or _config(head_dim)
    table = tiles.get(block_m) if tiles is not None else None
    if table is None:
        table = tile_table(seq_lens, block_m, q.device)
        if tiles is not None:
            tiles[block_m] = table
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    covered = sum(seq_lens)
    if covered < total:
        out[covered:].zero_()
    if len(table) == 0:
        return out
    left, right = window
    _attention_kernel[(len(table), heads)](
        q, k, v, out, table, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), head_dim ** -0.5 * _LOG2E,
        LEFT=left, RIGHT=right, GROUPS=heads // k.shape[1], D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    return out


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tiles_ptr, sq_row, sq_head, sk_row, sk_head, sv_row, sv_head,
                          so_row, so_head, scale, LEFT: tl.constexpr, RIGHT: tl.constexpr, GROUPS: tl.constexpr,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tile, head = tl.program_id(0), tl.program_id(1)
        start = tl.load(tiles_ptr + tile * 3).to(tl.int64)
        length = tl.load(tiles_ptr + tile * 3 + 1)
        first = tl.load(tiles_ptr + tile * 3 + 2)
        kv_head = head // GROUPS
        rows = first + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        row_ok = rows < length
        q = tl.load(q_ptr + (start + rows)[:, None] * sq_row + head * sq_head + dims[None, :], mask=row_ok[:, None],
                    other=0.0)
        lo = 0
        hi = length
        if LEFT >= 0:
            lo = tl.maximum(first - LEFT, 0) // BLOCK_N * BLOCK_N
        if RIGHT >= 0:
            hi = tl.minimum(first + BLOCK_M + RIGHT, length)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = k_ptr + start * sk_row + kv_head * sk_head
        v_base = v_ptr + start * sv_row + kv_head * sv_head
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + cols
            key_ok = keys < length
            kt = tl.load(k_base + keys[None, :] * sk_row + dims[:, None], mask=key_ok[None, :], other=0.0)  # [D, N]
            s = tl.dot(q, kt) * scale
            ok = key_ok[None, :]
            if LEFT >= 0:
                ok = ok & (keys[None, :] >= rows[:, None] - LEFT)
            if RIGHT >= 0:
                ok = ok & (keys[None, :] <= rows[:, None] + RIGHT)
            s = tl.where(ok, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vals = tl.load(v_base + keys[:, None] * sv_row + dims[None, :], mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(o_ptr + (start + rows)[:, None] * so_row + head * so_head + dims[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
