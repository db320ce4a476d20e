"""The Triton varlen attention kernel (CUDA; or the Triton interpreter on the CPU:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_attention.py
) against the reference path (PyTorch's SDPA per sequence, fp32, a band mask for a window)."""

from __future__ import annotations

import os

import pytest
import torch

from tokenpool.layers import triton_attention
from tokenpool.layers.attention import AttentionMetadata, _per_sequence_sdpa

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel = pytest.mark.skipif(
    triton_attention.triton is None or not (torch.cuda.is_available() or INTERPRET),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with Triton installed: the kernel then runs on CPU)")

# the interpreter multiplies bfloat16 as raw bits: float16 there
DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]


def _qkv(seq_lens, heads, kv_heads, head_dim, dtype, seed=0):
    """q, k, v as the strided views of one fused projection, as the models make them."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(sum(seq_lens), heads + 2 * kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    return fused[:, :heads], fused[:, heads:heads + kv_heads], fused[:, heads + kv_heads:]


def _reference(q, k, v, seq_lens, window, causal=False):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    meta = AttentionMetadata.from_seq_lens(seq_lens, q.device, causal=causal)
    meta = AttentionMetadata(meta.cu_seqlens, meta.seq_lens, meta.max_seqlen, causal, window)
    return _per_sequence_sdpa(q.float(), k.float(), v.float(), meta)


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,causal", [((-1, -1), False), ((3, 3), False), ((64, 64), False), ((-1, 0), True),
                                           ((5, 0), True), ((2, 40), False)])
def test_equals_the_reference(dtype, window, causal):
    seq_lens = [1, 5, 130, 17, 257, 64, 129]
    q, k, v = _qkv(seq_lens, 4, 4, 32, dtype)
    meta_window = (window[0], 0) if causal else window
    out = triton_attention.varlen_attention(q, k, v, seq_lens, meta_window)
    ref = _reference(q, k, v, seq_lens, window, causal)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 3e-3, rtol=0)


@kernel
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 4), (128, 4, 2)] if INTERPRET else
                         [(32, 12, 12), (64, 12, 12), (64, 16, 16), (128, 16, 2)])
def test_head_sizes_and_grouped_keys(head_dim, heads, kv_heads):
    seq_lens = [200, 3, 77] if INTERPRET else [200, 3, 77, 512, 129, 1, 300] * 5
    q, k, v = _qkv(seq_lens, heads, kv_heads, head_dim, torch.float16, seed=1)
    tiles = {}
    for window in [(-1, -1), (64, 64)]:
        out = triton_attention.varlen_attention(q, k, v, seq_lens, window, tiles)
        torch.testing.assert_close(out.float(), _reference(q, k, v, seq_lens, window), atol=3e-3, rtol=0)
    assert len(tiles) == 1  # one table for the batch, reused by the second call


def test_tile_table():
    table = triton_attention.tile_table([1, 128, 129, 0, 300], 128, torch.device("cpu")).tolist()
    assert table == [[0, 1, 0], [1, 128, 0], [129, 129, 0], [129, 129, 128],
                     [258, 300, 0], [258, 300, 128], [258, 300, 256]]


@kernel
@pytest.mark.parametrize("window", [(-1, -1), (3, 3)])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_q_rotated_inside_the_kernel_equals_rotating_first(window, head_dim):
    from tokenpool.layers.rotary import RotaryEmbedding, rotate

    seq_lens = [1, 70, 130, 9]
    q, k, v = _qkv(seq_lens, 2, 2, head_dim, torch.float16, seed=2)
    positions = torch.cat([torch.arange(n) for n in seq_lens]).to(DEVICE)
    rotary = RotaryEmbedding(head_dim, 160000.0)
    cos, sin = rotary(positions)
    table_cos, table_sin = rotary.table(256, positions.device)
    torch.testing.assert_close(table_cos[positions], cos[:, :head_dim // 2], atol=0, rtol=0)
    torch.testing.assert_close(table_sin[positions], sin[:, :head_dim // 2], atol=0, rtol=0)
    out = triton_attention.varlen_attention(q, k, v, seq_lens, window,
                                            rotary=triton_attention.Rotary(positions, table_cos, table_sin))
    rotated_q = rotate(q, cos, sin)
    expected = triton_attention.varlen_attention(rotated_q, k, v, seq_lens, window)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(out.float(), _reference(rotated_q, k, v, seq_lens, window), atol=3e-3, rtol=0)
