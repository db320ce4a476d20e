"""CUDA-only fast paths against their exact torch forms (skipped without a GPU; run by hand on one)."""


import pytest
import torch

from tokenpool.layers.attention import AttentionMetadata, _per_sequence_sdpa, varlen_attention
from tokenpool.layers.norm import add_layer_norm, reference_add_layer_norm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("hidden", [384, 1024, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_add_layer_norm(hidden, dtype):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(hidden, eps=1e-5).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(3001, hidden, device="cuda", dtype=dtype) * 3 + 1
    r = torch.randn(3001, hidden, device="cuda", dtype=dtype)
    got = add_layer_norm(x, r, norm)
    want = reference_add_layer_norm(x, r, norm)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("window", [(-1, -1), (64, 64), (3, 3)])
def test_varlen_attention_equals_per_sequence_sdpa(window):
    """FlashAttention varlen, unbounded and with ModernBERT's symmetric window (a band mask in the reference)."""
    import dataclasses

    torch.manual_seed(0)
    lens = [1, 17, 200, 64, 511, 3]
    meta = dataclasses.replace(AttentionMetadata.from_seq_lens(lens, torch.device("cuda")), window=window)
    q, k, v = (torch.randn(sum(lens), 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = varlen_attention(q, k, v, meta)
    want = _per_sequence_sdpa(q.float(), k.float(), v.float(), meta)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(1), want.flatten(1), dim=1)
    assert cos.min().item() > 0.999


@cuda
@pytest.mark.parametrize("tokens", [1, 777, 5000])
def test_fused_elementwise_chains_equal_eager(tokens):
    """The torch.compile'd chains of Qwen2.5-VL (add + RMSNorm, rotary, SiLU x up) and ModernBERT (add +
    LayerNorm without bias, GELU x gate) vs the same eager ops."""
    from tokenpool.layers import activation, norm, rotary
    from tokenpool.layers.fused import FusedOps

    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(tokens, 2048, device="cuda", dtype=dt)
    delta = torch.randn(tokens, 2048, device="cuda", dtype=dt)
    weight = torch.rand(2048, device="cuda", dtype=dt) + 0.5
    heads = torch.randn(tokens, 16, 128, device="cuda", dtype=dt)
    cos, sin = rotary.RotaryEmbedding(128, 1e6, [16, 24, 24])(torch.randint(0, 500, (3, tokens), device="cuda"))
    gate_up = torch.randn(tokens, 2 * 1000, device="cuda", dtype=dt)
    fused = FusedOps(compile=True)
    assert fused.compiled, "TOKENPOOL_COMPILE=0 is set: nothing to compare"
    pairs = [
        (fused.rms_norm(x, weight, 1e-6), norm.rms_norm(x, weight, 1e-6)),
        (fused.add_rms_norm(delta, x, weight, 1e-6, dt)[1], norm.add_rms_norm(delta, x, weight, 1e-6, dt)[1]),
        (fused.rotate(heads, cos, sin), rotary.rotate(heads, cos, sin)),
        (fused.silu_mul(gate_up), activation.silu_mul(gate_up)),
        (fused.gelu_mul(gate_up, "none"), activation.gelu_mul(gate_up, "none")),
        (fused.add_pre_layer_norm(delta, x, weight, None, 1e-5, dt)[1],
         norm.add_pre_layer_norm(delta, x, weight, None, 1e-5, dt)[1]),
    ]
    # The hand-written Triton kernels: GeGLU with exact GELU; rotary in place on the q and k heads of a fused
    # qkv (16 + 2 heads of 128, as Qwen2.5-VL's; and ModernBERT's 12 + 12 of 64).
    from tokenpool.layers.activation import exact_gelu_mul_cuda
    from tokenpool.layers.rotary import rotate_heads_cuda_

    pairs.append((exact_gelu_mul_cuda(gate_up), activation.gelu_mul(gate_up, "none")))
    for heads, head_dim in ((18, 128), (24, 64)):
        qkv = torch.randn(tokens, (heads + 6) * head_dim, device="cuda", dtype=dt)
        c, s = rotary.RotaryEmbedding(head_dim, 160000.0)(torch.randint(0, 500, (tokens,), device="cuda"))
        want = torch.cat([rotary.rotate(qkv[:, :heads * head_dim].view(tokens, heads, head_dim), c, s).flatten(1),
                          qkv[:, heads * head_dim:]], dim=1)
        assert rotate_heads_cuda_(qkv, c, s, heads, head_dim)
        pairs.append((qkv, want))
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        # One bf16 rounding apart at most (the fused kernel keeps fp32 between ops where eager rounds).
        assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("attend", [False, True])
def test_colbert_modes_on_cuda_equal_the_cpu(tmp_path, attend):
    """Query expansion whose positions are not keys runs FlashAttention varlen with separate key offsets on
    CUDA: bf16 there vs fp32 on the CPU (itself checked against sentence-transformers in test_colbert.py).
    The tokenizer comes from bench/minilm_files (all-MiniLM-L6-v2's files, committed), so no package is needed."""
    import pathlib

    import torch.nn.functional as F

    from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_tiny_colbert
    from tokenpool import LLM, PoolingParams

    source = pathlib.Path(__file__).resolve().parents[1] / "bench" / "minilm_files"
    folder = build_tiny_colbert(tmp_path / "cb", source, "pylate", attend)
    texts = SAMPLE_QUERIES + SAMPLE_DOCUMENTS
    params = [PoolingParams(input_type="query")] * len(SAMPLE_QUERIES) + [PoolingParams()] * len(SAMPLE_DOCUMENTS)
    runs = [[o.outputs.data for o in LLM(str(folder), dtype=dtype, device=device).encode(
        texts, params, pooling_task="token_embed", use_tqdm=False)]
        for dtype, device in (("float32", "cpu"), ("bfloat16", "cuda"))]
    for want, got in zip(*runs):
        assert want.shape == got.shape
        assert F.cosine_similarity(want, got, dim=-1).min().item() >= 0.99


@cuda
def test_modernbert_on_cuda_equals_the_cpu(tmp_path):
    """The tiny ModernBERT (local window of 8, texts many windows long; itself checked against transformers in
    test_modernbert.py) and its ColBERT form (queries with non-attended expansion, documents past the window's
    reach) in bf16 on CUDA (FlashAttention varlen with a window) vs fp32 on the CPU."""
    import pathlib

    import torch.nn.functional as F

    from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_tiny_colbert
    from tests.fixtures.modernbert import SAMPLE_TEXTS, build_tiny_modernbert
    from tokenpool import LLM, PoolingParams

    backbone = build_tiny_modernbert(tmp_path / "mb")
    colbert = build_tiny_colbert(tmp_path / "cb", pathlib.Path("unused"), "pylate", backbone="modernbert")
    texts = SAMPLE_QUERIES + SAMPLE_DOCUMENTS
    params = [PoolingParams(input_type="query")] * len(SAMPLE_QUERIES) + [PoolingParams()] * len(SAMPLE_DOCUMENTS)
    for folder, inputs, p in ((backbone, SAMPLE_TEXTS, None), (colbert, texts, params)):
        runs = [[o.outputs.data for o in LLM(str(folder), dtype=dtype, device=device).encode(
            inputs, p, pooling_task="token_embed", use_tqdm=False)]
            for dtype, device in (("float32", "cpu"), ("bfloat16", "cuda"))]
        for want, got in zip(*runs):
            assert want.shape == got.shape
            assert F.cosine_similarity(want, got.float(), dim=-1).min().item() >= 0.99
