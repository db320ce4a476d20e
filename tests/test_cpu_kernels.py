"""The C kernels (tokenpool/kernels/*.c), every build this CPU can run, against float64 references.

Each build (AVX-512, AVX2, generic) is compiled and loaded here explicitly, so one machine checks the code
that AVX2-only CPUs and other classes run. Shapes cover what the models use: head dims 32 / 64 / 80 / 128,
grouped KV heads, causal decoders, sequences of 1 to 300 tokens (lengths that are not multiples of a vector),
and rows of a fused QKV tensor (row strides wider than the heads).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.toolkit import amx_emulated
from tokenpool.kernels import add_layer_norm as aln
from tokenpool.kernels import buildable_variants, vector_width
from tokenpool.kernels import varlen_attention as va

VARIANTS = buildable_variants()
needs_kernels = pytest.mark.skipif(not va.available(), reason="the C kernels could not be built here (no C compiler?)")


def _reference(q, k, v, lens, window, dtype=torch.float64):
    """SDPA per sequence with the window as a band mask (key - query in [-left, right])."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    left, right = window
    outs, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].to(dtype).transpose(0, 1) for t in (q, k, v))
        offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        band = (offset >= -left if left >= 0 else torch.ones_like(offset, dtype=torch.bool)) & \
            (offset <= right if right >= 0 else torch.ones_like(offset, dtype=torch.bool))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band).transpose(0, 1))
        start += n
    return torch.cat(outs)


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, heads, kv_heads, window", [
    (32, 12, 12, (-1, -1)), (64, 4, 4, (-1, -1)), (80, 2, 2, (-1, -1)),
    (128, 4, 2, (-1, 0)), (64, 6, 1, (-1, 0)),  # causal decoders with grouped KV heads
    (64, 4, 4, (64, 64)),  # ModernBERT's local layers: a window of 128
    (32, 2, 2, (3, 40)), (32, 2, 2, (17, 0)),  # lopsided windows, a causal one among them
])
def test_varlen_attention_matches_sdpa(variant, dtype, head_dim, heads, kv_heads, window):
    rng = random.Random(head_dim * heads)
    lens = [1, 2, 7, 16, 17, 300] + [rng.randint(1, 200) for _ in range(6)]
    total = sum(lens)
    padded = total + 5  # rows past the last sequence, as the runner's CPU bucketing adds
    torch.manual_seed(0)
    # q, k, v as column slices of one fused projection, as the models produce them
    qkv = (torch.randn(padded, (heads + 2 * kv_heads) * head_dim) * 3).to(dtype)
    q = qkv[:, :heads * head_dim].view(padded, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(padded, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(padded, kv_heads, head_dim)
    assert va.supports(q, k, v, variant)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = va.varlen_attention(q, k, v, cu, window, variant)
    assert out.dtype == dtype and out.shape == (padded, heads, head_dim)
    ref = _reference(q[:total], k[:total], v[:total], lens, window)
    got = out[:total].double()
    # Our error to float64 is at most 1.5x PyTorch's own fp32 SDPA's on the same inputs (fp32 arithmetic either
    # way); in bf16, PyTorch's bf16 SDPA's (which rounds its outputs to bf16 as we do).
    torch_err = (_reference(q[:total], k[:total], v[:total], lens, window, dtype).double() - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 1.5 * torch_err
    assert torch.all(out[total:] == 0)


@pytest.fixture(scope="module")
def amx_attention(tmp_path_factory):
    return amx_emulated("varlen_attention", va._ARGS, tmp_path_factory.mktemp("amx"))


@pytest.mark.parametrize("head_dim, heads, kv_heads, window", [
    (32, 4, 4, (-1, -1)), (64, 4, 2, (-1, 0)), (96, 2, 2, (3, 40)), (128, 2, 2, (64, 64)), (64, 6, 1, (17, 0)),
])
def test_varlen_attention_amx_tiles_under_emulation(amx_attention, monkeypatch, head_dim, heads, kv_heads, window):
    """The AMX build's bf16 attention (both products on the tiles) with the tile unit emulated
    (tests/fixtures/amx_emulated.c), so its tile code is checked on every AVX-512 + BF16 machine: within 1.5x
    PyTorch's own bf16 SDPA error to float64, as the builds above."""
    monkeypatch.setattr(va, "function", lambda *args, **kwargs: amx_attention)
    rng = random.Random(head_dim)
    lens = [1, 2, 7, 16, 17, 33, 300] + [rng.randint(1, 200) for _ in range(4)]
    torch.manual_seed(head_dim)
    q = (torch.randn(sum(lens), heads, head_dim) * 3).to(torch.bfloat16)
    k, v = ((torch.randn(sum(lens), kv_heads, head_dim) * 3).to(torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = va.varlen_attention(q, k, v, cu, window, "amx")
    ref = _reference(q, k, v, lens, window)
    torch_err = (_reference(q, k, v, lens, window, torch.bfloat16).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 1.5 * torch_err


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_attention_refuses_what_it_cannot_do(variant):
    width = vector_width(variant)
    q = torch.randn(10, 2, width + 4)
    assert not va.supports(q, q, q, variant)  # head_dim not a multiple of the vector width
    q = torch.randn(10, 2, 32, dtype=torch.float16)
    assert not va.supports(q, q, q, variant)


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("y_dtype, lowp", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n", [384, 1024])
def test_add_layer_norm_matches_torch(variant, y_dtype, lowp, n):
    torch.manual_seed(n)
    rows = 37
    x = torch.randn(rows, n) * 4 + 1
    wide = torch.randn(rows, n + 64).to(y_dtype)
    y = wide[:, :n]  # rows with a wider stride
    norm = torch.nn.LayerNorm(n, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
    expected = F.layer_norm((y.double() + x.double()), (n,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert aln.supports(y, x, norm, variant)
    out, out_lowp = aln.add_layer_norm_(y, x.clone(), norm, lowp, variant)
    assert (out.double() - expected).abs().max().item() < 1e-5
    if lowp is None:
        assert out_lowp is out
    else:
        assert out_lowp.dtype == lowp and torch.equal(out_lowp, out.to(lowp))  # the same rounding as torch's cast


def test_every_build_the_cpu_can_run_is_listed():
    assert VARIANTS[-1] == "generic" and len(set(VARIANTS)) == len(VARIANTS)


@pytest.mark.parametrize("kernel", ["fused", "flash", "bmm"])
@pytest.mark.parametrize("window, causal", [((-1, -1), False), ((-1, -1), True), ((8, 8), False), ((5, 9), True)])
def test_attention_layer_windows_on_every_cpu_kernel(monkeypatch, kernel, window, causal):
    """`layers.attention.varlen_attention` with AttentionMetadata windows: the C kernel and PyTorch's
    fallbacks (a band mask where they have no window) compute the same function."""
    from tokenpool.layers.attention import AttentionMetadata, varlen_attention
    from tokenpool.platforms.cpu import ATTENTION_ENV

    monkeypatch.setenv(ATTENTION_ENV, kernel)
    torch.manual_seed(1)
    lens = [5, 40, 1, 23]
    q, k, v = (torch.randn(sum(lens), 4, 32) for _ in range(3))
    meta = AttentionMetadata.from_seq_lens(lens, torch.device("cpu"), causal=causal)
    meta.window = window
    left, right = window[0], 0 if causal else window[1]
    expected = _reference(q, k, v, lens, (left, right)).float()
    assert torch.allclose(varlen_attention(q, k, v, meta), expected, atol=2e-5)
