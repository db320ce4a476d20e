"""The CPU MaxSim kernel (tokenpool/kernels/maxsim.c) of the exact index codecs: every build this CPU can run
against a float64 brute force; the bf16 path (AMX or AVX512-BF16) within its error bound; and the index's bf16 prefilter with
fp32 rescoring returning exactly what the fp32 scan returns."""

from __future__ import annotations

import numpy as np
import pytest

from tokenpool.index import MultiVectorIndex
from tests.toolkit import amx_emulated
from tokenpool.kernels import build_variant, buildable_variants
from tokenpool.kernels import maxsim as kernel

VARIANTS = buildable_variants()


def _segment(dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = np.append(rng.integers(1, 300, 120), [1, 17])
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lens)
    x = rng.standard_normal((int(offsets[-1]), dim)).astype(np.float32)
    x[:, : dim // 16] *= 4  # a few large dimensions, as token embeddings have
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((45, dim)).astype(np.float32)
    return offsets, x, queries, np.array([0, 32, 40])


def _brute(queries, starts, decoded, offsets):
    s = queries.astype(np.float64) @ decoded.astype(np.float64).T
    return np.add.reduceat(np.maximum.reduceat(s, offsets[:-1], axis=1), starts, axis=0)


def _encode(x, codec):
    """(codes, row scales, dimension scales, the fp32 rows the kernel decodes) of a codec"""
    if codec != "int8":
        codes = x.astype(codec)
        return codes, None, None, codes.astype(np.float32)
    dim_scales = np.sqrt((x ** 2).mean(axis=0)).astype(np.float32)
    y = x / dim_scales
    scales = (np.abs(y).max(axis=1) / 127).astype(np.float32)
    codes = np.rint(y / scales[:, None]).astype(np.int8)
    return codes, scales, dim_scales, codes.astype(np.float32) * scales[:, None] * dim_scales


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [96, 128, 384])
@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_fp32_path_equals_float64_brute_force(variant, dim, codec):
    if not kernel.available() or kernel.function("maxsim", kernel._ARGS, variant) is None:
        pytest.skip("the C kernel cannot be built here (no C compiler)")
    offsets, x, queries, starts = _segment(dim)
    codes, scales, dim_scales, decoded = _encode(x, codec)
    want = _brute(queries, starts, decoded, offsets)
    got = kernel.maxsim(queries, starts, codes, offsets, scales=scales, dim_scales=dim_scales, threads=2,
                        variant=variant)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-4)
    subset = np.array([121, 0, 57])  # some documents, in any order
    got = kernel.maxsim(queries, starts, codes, offsets, scales=scales, dim_scales=dim_scales, docs=subset,
                        variant=variant)
    assert np.allclose(got, want[:, subset], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_segments_in_one_call_equal_one_call_per_segment(codec, bf16):
    """`maxsim_segments`: the documents of several segments (of unequal sizes, one of a single document) in one
    parallel region, all of them or a selection across segments, give bit for bit what one call per segment
    gives."""
    if not kernel.available(bf16=bf16):
        pytest.skip(f"no {'bf16' if bf16 else 'C'} kernel on this CPU ({build_variant()} class)")
    offsets, x, queries, starts = _segment(128, seed=2)
    codes, scales, dim_scales, _ = _encode(x, codec)
    cuts = [0, 1, 50, 51, len(offsets) - 1]  # document ranges: 1, 49, 1, the rest
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        t0, t1 = offsets[a], offsets[b]
        segments.append((codes[t0:t1], offsets[a:b + 1] - t0, None if scales is None else scales[t0:t1]))
    want = np.concatenate([kernel.maxsim(queries, starts, c, o, scales=sc, dim_scales=dim_scales, bf16=bf16,
                                         threads=2) for c, o, sc in segments], axis=1)
    got = kernel.maxsim_segments(queries, starts, segments, dim_scales=dim_scales, bf16=bf16, threads=2)
    assert got.shape == (len(starts), len(offsets) - 1) and np.array_equal(got, want)
    chosen = np.array([0, 1, 2, 49, 50, 51, 90, len(offsets) - 2])  # positions in every segment
    got = kernel.maxsim_segments(queries, starts, segments, dim_scales=dim_scales, docs=chosen, bf16=bf16, threads=2)
    assert np.array_equal(got, want[:, chosen])
    with pytest.raises(ValueError, match="positions must be in 0"):
        kernel.maxsim_segments(queries, starts, segments, dim_scales=dim_scales, docs=[len(offsets) - 1])
    with pytest.raises(ValueError, match="share a codec"):
        other = x[:5].astype(np.float32 if codes.dtype == np.float16 else np.float16)
        kernel.maxsim_segments(queries, starts, [segments[0], (other, np.array([0, 5]), None)])


@pytest.mark.skipif(not kernel.available(bf16=True),
                    reason=f"needs an AMX or AVX512-BF16 CPU (this one: {build_variant()} class)")
@pytest.mark.parametrize("dim", [64, 128, 384])
@pytest.mark.parametrize("codec", ["float16", "float32", "int8"])
def test_bf16_path_within_its_bound(dim, codec):
    offsets, x, queries, starts = _segment(dim, seed=1)
    codes, scales, dim_scales, decoded = _encode(x, codec)
    want = _brute(queries, starts, decoded, offsets)
    got = kernel.maxsim(queries, starts, codes, offsets, scales=scales, dim_scales=dim_scales, bf16=True, threads=2)
    row_norms = np.add.reduceat(np.linalg.norm(queries, axis=1), starts)
    bound = 2.0 ** -8 * (1 + 2.0 ** -7) * row_norms * np.linalg.norm(decoded, axis=1).max()
    assert (np.abs(got - want) <= bound[:, None]).all()
    assert np.abs(got - want).max() > 1e-4  # really the bf16 path: not the fp32 results


@pytest.mark.parametrize("codec", ["float16", "int8", "float32"])
def test_index_search_with_the_bf16_prefilter_equals_the_fp32_scan(tmp_path, monkeypatch, codec):
    """Many near-ties (documents drawn around a few topics): the prefilter's rescoring keeps every document the
    bf16 error could move into the top k, so results (ids and scores) equal the fp32 scan's."""
    rng = np.random.default_rng(3)
    topics = rng.standard_normal((6, 128))
    docs = []
    for _ in range(600):
        m = topics[rng.integers(0, 6, int(rng.integers(2, 60)))] + 0.7 * rng.standard_normal((1, 128))
        m = m + 0.3 * rng.standard_normal(m.shape)
        docs.append((m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32))
    index = MultiVectorIndex.create(tmp_path / "ix", 128, codec=codec)
    index.add(list(range(300)), docs[:300])
    index.add(list(range(300, 600)), docs[300:])
    index.delete([5, 450])
    queries = [docs[i][:32] for i in (1, 77, 310, 599)] + [rng.standard_normal((20, 128)).astype(np.float32)]
    with_prefilter = index.search(queries, k=25)
    monkeypatch.setenv("TOKENPOOL_INDEX_BF16", "0")
    plain = index.search(queries, k=25)
    for a, b in zip(with_prefilter, plain):
        assert [h[0] for h in a] == [h[0] for h in b]
        assert np.allclose([h[1] for h in a], [h[1] for h in b], rtol=1e-5)


@pytest.fixture(scope="module")
def amx_maxsim(tmp_path_factory):
    return amx_emulated("maxsim", kernel._ARGS, tmp_path_factory.mktemp("amx"))


@pytest.mark.parametrize("codec", ["float16", "float32", "int8"])
@pytest.mark.parametrize("rows", [[7], [16], [9, 8], [32], [30, 2], [45], [32, 8, 5], [40, 40]])
def test_amx_tile_code_within_the_bf16_bound(amx_maxsim, monkeypatch, codec, rows):
    """The AMX path's tile schedule (one token tile a step, up to four row blocks, a last pass of fewer) over 122
    documents of 1-299 tokens (partial last tiles; several chunks of documents, each converting its next document
    during this one's tiles), against a float64 brute force within the bf16 bound. The last document (17 tokens)
    lies around a direction that the second query row points away from: its true maxima are negative, so a zero
    padding row taken for a token would show."""
    offsets, x, queries, _ = _segment(128, seed=4)
    u = np.random.default_rng(5).standard_normal(128).astype(np.float32)
    u /= np.linalg.norm(u)
    last = x[offsets[-2]:] + u * 4
    x[offsets[-2]:] = last / np.linalg.norm(last, axis=1, keepdims=True)
    queries = np.concatenate([queries, queries])[: sum(rows)]
    queries[1] = -3 * u
    starts = np.cumsum([0, *rows[:-1]])
    codes, scales, dim_scales, decoded = _encode(x, codec)
    monkeypatch.setattr(kernel, "function", lambda *args, **kwargs: amx_maxsim)
    got = kernel.maxsim(queries, starts, codes, offsets, scales=scales, dim_scales=dim_scales, bf16=True, threads=2)
    want = _brute(queries, starts, decoded, offsets)
    row_norms = np.add.reduceat(np.linalg.norm(queries, axis=1), starts)
    bound = 2.0 ** -8 * (1 + 2.0 ** -7) * row_norms * np.linalg.norm(decoded, axis=1).max()
    assert got.shape == want.shape and (np.abs(got - want) <= bound[:, None]).all()
    assert np.abs(got - want).max() > 1e-4  # the bf16 products ran, not an fp32 path


def test_amx_next_document_conversion_follows_the_selection(amx_maxsim, monkeypatch):
    """The fp16 AMX path converts the next document of its chunk while it scores this one: with documents selected
    out of order and repeated, over two segments and with empty documents among them (the kernel scores those 0),
    every document's scores are exactly those of the call without a selection."""
    offsets, x, queries, starts = _segment(128, seed=6)
    lens = np.diff(offsets)
    lens = np.insert(lens, [3, 40, 41], 0)  # empty documents, two in a row
    offsets = np.concatenate([[0], np.cumsum(lens)])
    codes = x.astype(np.float16)
    half = 60  # segment 2: documents 60.. (a copy: another buffer, other addresses)
    segments = [(codes[: offsets[half]], offsets[: half + 1], None),
                (codes[offsets[half]:].copy(), offsets[half:] - offsets[half], None)]
    monkeypatch.setattr(kernel, "function", lambda *args, **kwargs: amx_maxsim)
    every = kernel.maxsim_segments(queries, starts, segments, bf16=True, threads=2)
    assert every.shape == (3, len(lens)) and (every[:, lens == 0] == 0).all()
    pick = np.random.default_rng(7).permutation(np.tile(np.arange(len(lens)), 2))[:150]
    chosen = kernel.maxsim_segments(queries, starts, segments, docs=pick, bf16=True, threads=2)
    assert np.array_equal(chosen, every[:, pick])
    want = _brute(queries, starts, codes.astype(np.float32), offsets[np.r_[lens > 0, True]])
    assert np.abs(every[:, lens > 0] - want).max() < 0.05
