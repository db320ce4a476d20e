"""Variable-length attention on CUDA in Triton: one program per (query tile, head), the tiles laid out from
the batch's sequences (no program for padding), keys visited only inside the tile's window.

Why not only PyTorch's FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`): at encoder lengths
(~200 tokens) its grid is `max_seqlen / 128` query blocks per sequence and head, most of them empty, and a
sliding window (ModernBERT's local layers, 64 tokens each side) costs more than no window: the window is
masked inside every block instead of bounding the key loop. Here a local layer reads only the key blocks
that meet its window, and the tile table holds only the query tiles that exist. bench/NOTES.md has the
measured comparison; `TOKENPOOL_CUDA_ATTENTION=flash` switches back.

With `rotary` (1-D rotary embeddings, ModernBERT), q is rotated as each program loads its query tile (fp32
arithmetic, rounded to q's dtype before the products, as the separate rotary kernel rounds what it writes
back): the rotary pass then only touches k. cos / sin come from per-position tables `[positions, D/2]`
that stay in the cache. (Rotating k here too measured slower: every query tile of a sequence rotates the
same keys again; bench/NOTES.md.)

Scores are fp32 (`exp2` of scaled logits), the online softmax of FlashAttention; masked scores are a large
finite negative rather than -inf, so a block where a row sees no key contributes nothing once a later block
has one (every row sees at least itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

_LOG2E = 1.4426950408889634


def _config(head_dim: int, window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): bench/gpu_attention.py's sweep on an H100 (head sizes 32, 64
    and 128 alike): 64 x 64 tiles, 4 warps; 2 pipeline stages for a window bounded on the left (ModernBERT's
    local layers: 4-6% faster there), 3 for the others (8-10% faster there)."""
    return 64, 64, 4, 2 if window[0] >= 0 else 3


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


@dataclass
class Rotary:
    """Rotary embedding of q for the kernel: `positions` `[T]` (int) and the tables `cos` / `sin` `[P, D/2]`
    fp32 of positions 0..P-1 (P > every position), i.e. `RotaryEmbedding.table`."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


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
                     config: tuple[int, int, int, int] | None = None, rotary: Rotary | None = None) -> torch.Tensor:
    """q `[T, heads, D]`, k / v `[T, kv_heads, D]` (views with unit stride in D; kv_heads divides heads),
    sequences of `seq_lens` laid end to end; `window` (left, right) as FlashAttention's `window_size` (-1:
    unbounded; causal is (-1, 0)) -> `[T, heads, D]`. `tiles`: a dict that caches the tile table per block
    size (the metadata's, shared by the layers of one batch); `config`: (BLOCK_M, BLOCK_N, warps, stages)
    instead of the measured default; `rotary`: rotate q (see the module doc). Rows past the last sequence (a
    batch rounded up) come out as zeros."""
    total, heads, head_dim = q.shape
    block_m, block_n, warps, stages = config or _config(head_dim, window)
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
    if rotary is not None:
        assert rotary.cos.shape[1] * 2 == head_dim and rotary.cos.is_contiguous() and rotary.sin.is_contiguous()
        pos, cos, sin = rotary.positions, rotary.cos, rotary.sin
    else:
        pos = cos = sin = table  # not read
    _attention_kernel[(len(table), heads)](
        q, k, v, out, table, pos, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), head_dim ** -0.5 * _LOG2E,
        ROTARY=rotary is not None, LEFT=left, RIGHT=right, GROUPS=heads // k.shape[1], D=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tiles_ptr, pos_ptr, cos_ptr, sin_ptr, sq_row, sq_head, sk_row,
                          sk_head, sv_row, sv_head, so_row, so_head, scale, ROTARY: tl.constexpr, LEFT: tl.constexpr,
                          RIGHT: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
        tile, head = tl.program_id(0), tl.program_id(1)
        start = tl.load(tiles_ptr + tile * 3).to(tl.int64)
        length = tl.load(tiles_ptr + tile * 3 + 1)
        first = tl.load(tiles_ptr + tile * 3 + 2)
        kv_head = head // GROUPS
        rows = first + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        row_ok = rows < length
        q_rows = q_ptr + (start + rows)[:, None] * sq_row + head * sq_head
        if ROTARY:  # rotate-half: [lo, hi] -> [lo cos - hi sin, hi cos + lo sin], cos / sin of the first half
            HALF: tl.constexpr = D // 2
            half = dims % HALF
            sign = tl.where(dims < HALF, -1.0, 1.0)
            x = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            partner = tl.load(q_rows + ((dims + HALF) % D)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            p_q = tl.load(pos_ptr + start + rows, mask=row_ok, other=0)
            c_q = tl.load(cos_ptr + p_q[:, None] * HALF + half[None, :])
            s_q = tl.load(sin_ptr + p_q[:, None] * HALF + half[None, :])
            q = (x * c_q + sign[None, :] * partner * s_q).to(q_ptr.dtype.element_ty)
        else:
            q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)
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
        out_rows = o_ptr + (start + rows)[:, None] * so_row + head * so_head
        tl.store(out_rows + dims[None, :], acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
