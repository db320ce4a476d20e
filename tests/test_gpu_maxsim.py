"""Exact MaxSim (tokenpool/index/cuda_maxsim.py): the torch reference against a float64 brute force (always, on
CPU), and the fused Triton kernel against the torch reference (on a CUDA GPU; skipped without one).

The kernel's logic can be checked without a GPU through Triton's interpreter, on CPU tensors and smaller shapes:

    TRITON_INTERPRET=1 python -m pytest tests/test_gpu_maxsim.py
"""

import dataclasses
import os

import pytest
import torch

from tokenpool.index import cuda_maxsim
from tokenpool.index.cuda_maxsim import Config, maxsim_cuda, maxsim_torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel = pytest.mark.skipif(
    not cuda_maxsim.available(),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with Triton installed: the kernel then runs on CPU)")


def _offsets(lens) -> torch.Tensor:
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.as_tensor(lens, dtype=torch.int64), 0)
    return offsets


def _corpus(lens, dim, codec, seed=0):
    """Unit-norm token vectors with a few large dimensions (as real token embeddings have), encoded like
    MultiVectorIndex: (codes, offsets, scales, dim_scales, decoded float64)."""
    g = torch.Generator().manual_seed(seed)
    offsets = _offsets(lens)
    weight = torch.ones(dim)
    weight[: max(dim // 16, 1)] = 4.0
    x = torch.nn.functional.normalize(torch.randn(int(offsets[-1]), dim, generator=g) * weight, dim=-1)
    scales = dim_scales = None
    if codec == "int8":
        dim_scales = x.pow(2).mean(0).sqrt().clamp_min(1e-6)
        y = x / dim_scales
        scales = y.abs().amax(1) / 127
        codes = torch.round(y / scales[:, None]).clamp(-127, 127).to(torch.int8)
        decoded = codes.double() * scales.double()[:, None] * dim_scales.double()[None, :]
    else:
        codes = x.to(getattr(torch, codec))
        decoded = codes.double()
    return codes, offsets, scales, dim_scales, decoded


def _queries(lens, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(sum(lens), dim, generator=g), dim=-1)
    return q, _offsets(lens)


def _brute(q, q_offsets, decoded, doc_offsets) -> torch.Tensor:
    q = q.double()
    out = torch.empty(len(q_offsets) - 1, len(doc_offsets) - 1, dtype=torch.float64)
    for i in range(len(q_offsets) - 1):
        qi = q[q_offsets[i]:q_offsets[i + 1]]
        for j in range(len(doc_offsets) - 1):
            d = decoded[doc_offsets[j]:doc_offsets[j + 1]]
            out[i, j] = (qi @ d.T).amax(dim=1).sum() if len(d) else float("-inf")
    return out


def _close(got, want, rtol):
    assert got.shape == want.shape and got.dtype == torch.float32
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=rtol * scale)


# ----- the torch reference, on CPU

@pytest.mark.parametrize("codec", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("chunk_elements", [None, 3000])
def test_maxsim_torch_equals_float64_brute_force(codec, chunk_elements):
    """Varied document lengths (incl. 1 and a document larger than a chunk) and query lengths (incl. 1)."""
    lens = [1, 5, 130, 17, 1, 64, 300, 2, 33, 128, 1, 77]
    codes, offsets, scales, dim_scales, decoded = _corpus(lens, 64, codec)
    q, q_offsets = _queries([1, 32, 7, 20], 64)
    got = maxsim_torch(q, q_offsets, codes, offsets, scales, dim_scales, chunk_elements=chunk_elements)
    _close(got, _brute(q, q_offsets, decoded, offsets), 1e-5)


def test_maxsim_torch_equal_lengths_and_sliced_offsets():
    """Equal-length documents (the reshape path) and offsets that start inside `codes` (a slice of a segment);
    queries whose offsets start above 0."""
    codes, offsets, _, _, decoded = _corpus([16] * 30, 128, "float16")
    q, q_offsets = _queries([3, 32, 32], 128)
    got = maxsim_torch(q, q_offsets[1:], codes, offsets[4:20], chunk_elements=32 * 16 * 5)
    _close(got, _brute(q, q_offsets[1:], decoded, offsets[4:20]), 1e-5)


def test_maxsim_torch_empty_document_and_query():
    """A document with no rows scores -inf; a query with no rows scores 0 against the others."""
    codes, offsets, _, _, decoded = _corpus([4, 0, 3], 16, "float32")
    q, q_offsets = _queries([2, 0], 16)
    got = maxsim_torch(q, q_offsets, codes, offsets)
    assert torch.isneginf(got[:, 1]).all()
    assert got[1, 0] == 0 and got[1, 2] == 0
    _close(got[0, [0, 2]], _brute(q, q_offsets, decoded, offsets)[0, [0, 2]], 1e-5)


def test_maxsim_cuda_falls_back_for_odd_dims():
    """A dim that is not a multiple of 16 (or a CPU tensor without the interpreter) takes maxsim_torch."""
    codes, offsets, _, _, decoded = _corpus([3, 9, 1], 40, "float32")
    q, q_offsets = _queries([5, 2], 40)
    _close(maxsim_cuda(q, q_offsets, codes, offsets), _brute(q, q_offsets, decoded, offsets), 1e-5)


# ----- the Triton kernel against the torch reference

def _doc_lens(n, seed, low=1, high=600):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [low, high, *lens, 128, 1]


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _check_kernel(q, q_offsets, codes, offsets, scales, dim_scales, config=None, rtol=1e-3):
    q, codes, scales, dim_scales = _on_device(q, codes, scales, dim_scales)
    if config is None:
        got = maxsim_cuda(q, q_offsets, codes, offsets.to(DEVICE), scales, dim_scales)
    else:
        got = cuda_maxsim._maxsim_triton(q, q_offsets, codes, offsets.to(DEVICE), scales, dim_scales, config=config)
    want = maxsim_torch(q, q_offsets, codes, offsets, scales, dim_scales)
    _close(got, want, rtol)
    return got


@kernel
@pytest.mark.parametrize("n_queries", [1, 40])
@pytest.mark.parametrize("dim", [64, 128, 384])
@pytest.mark.parametrize("codec", ["float16", "bfloat16", "float32", "int8"])
def test_kernel_equals_torch(codec, dim, n_queries):
    """Documents of 1..600 rows, queries of 1..40 rows (one query: 32 rows), the launch's own configuration."""
    n_docs = 10 if INTERPRET else 300
    codes, offsets, scales, dim_scales, _ = _corpus(_doc_lens(n_docs, seed=dim), dim, codec, seed=dim)
    g = torch.Generator().manual_seed(7)
    q_lens = [32] if n_queries == 1 else [1, 40, *torch.randint(1, 41, (n_queries - 2,), generator=g).tolist()]
    if INTERPRET and n_queries > 1:
        q_lens = q_lens[:6]
    q, q_offsets = _queries(q_lens, dim)
    _check_kernel(q, q_offsets, codes, offsets, scales, dim_scales)


@kernel
@pytest.mark.parametrize("dim", [128, 384])
@pytest.mark.parametrize("codec", ["float16", "bfloat16", "float32", "int8"])
def test_kernel_transposed_equals_torch(codec, dim):
    """The other orientation of the product (S^T = D Q^T), on the launch's own blocking otherwise."""
    codes, offsets, scales, dim_scales, _ = _corpus(_doc_lens(10 if INTERPRET else 300, seed=5), dim, codec, seed=5)
    q, q_offsets = _queries([32, 1, 40, 7, 17] if INTERPRET else [32, 1, 40, 7, 17] * 8, dim)
    config = cuda_maxsim.choose_config((len(q_offsets) - 1) * 64, dim, codes.dtype, len(offsets) - 1,
                                       torch.device(DEVICE))
    _check_kernel(q, q_offsets, codes, offsets, scales, dim_scales, config=dataclasses.replace(config, trans=True))


@kernel
@pytest.mark.parametrize("config", [
    Config(bq=16, bt=16, dpp=3),  # documents of several tiles; several documents a program; queries of 2 tiles
    Config(bq=32, bt=64, dpp=1),
    Config(bq=64, bt=32, dpp=5, num_warps=8, num_stages=2),
    Config(bq=128, bt=128, dpp=2, num_warps=8),
    Config(bq=16, bt=16, dpp=3, trans=True),  # S^T = D Q^T
    Config(bq=64, bt=64, dpp=2, trans=True),
])
@pytest.mark.parametrize("layout", ["varied", "equal", "equal-masked"])
def test_kernel_configs(config, layout):
    """Explicit blockings over the three ways the kernel walks documents: the tile table (varied lengths), the
    arithmetic walk with whole tiles (lengths a multiple of the tile), and with a masked last tile; offsets
    that start inside `codes`; a query longer than the query tile; int8 with scales."""
    lens = {"varied": [1, 600, 17, 16, 15, 33, 2, 130, 64, 1, 5],
            "equal": [128] * 9, "equal-masked": [40] * 9}[layout]
    codes, offsets, scales, dim_scales, _ = _corpus(lens, 128, "int8", seed=3)
    q, q_offsets = _queries([32, 3, 9, 20, 1], 128)
    _check_kernel(q, q_offsets, codes, offsets[2:], scales, dim_scales, config=config)
    fp16 = _corpus(lens, 128, "float16", seed=4)[0]
    _check_kernel(q, q_offsets, fp16, offsets[1:-1], None, None, config=config)


@kernel
def test_kernel_empty_document_scores_minus_inf():
    codes, offsets, _, _, _ = _corpus([4, 0, 3, 20], 64, "float16")
    q, q_offsets = _queries([2, 7], 64)
    got = maxsim_cuda(*_on_device(q), q_offsets, *_on_device(codes), offsets.to(DEVICE))
    assert torch.isneginf(got[:, 1]).all()
    want = maxsim_torch(q, q_offsets, codes, offsets)
    _close(got[:, [0, 2, 3]], want[:, [0, 2, 3]], 1e-3)
    empty = torch.full((4,), 3, dtype=torch.int64)  # documents that are all empty (equal lengths, 0)
    assert torch.isneginf(maxsim_cuda(*_on_device(q), q_offsets, *_on_device(codes), empty.to(DEVICE))).all()


@kernel
@pytest.mark.skipif(INTERPRET, reason="a large corpus: GPU only")
def test_kernel_large_equal_length_corpus():
    """20,000 documents of 128 rows, 32 queries of 32 rows: the benchmark's shape, scaled down."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20_000 * 128, 128, device=DEVICE), dim=-1).half()
    offsets = torch.arange(0, 20_000 * 128 + 1, 128, device=DEVICE)
    q = torch.nn.functional.normalize(torch.randn(32 * 32, 128, device=DEVICE), dim=-1)
    q_offsets = torch.arange(0, 32 * 32 + 1, 32)
    for n in (1, 32):
        got = maxsim_cuda(q[: 32 * n], q_offsets[: n + 1], x, offsets)
        _close(got, maxsim_torch(q[: 32 * n], q_offsets[: n + 1], x, offsets), 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("codec", ["float32", "float16", "int8", "residual"])
def test_index_on_cuda_equals_the_cpu_index(tmp_path, codec):
    """MultiVectorIndex.open(path, device="cuda") returns the CPU index's results (ids; scores to 1e-3)."""
    import numpy as np

    from tokenpool.index import MultiVectorIndex

    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 200, (3000,), generator=g).tolist()
    flat = torch.nn.functional.normalize(torch.randn(sum(lens), 128, generator=g) + 0.8 * torch.randn(128, generator=g),
                                         dim=-1).numpy()
    docs = np.split(flat, np.cumsum(lens)[:-1])
    cpu = MultiVectorIndex.create(tmp_path / "ix", 128, codec=codec, num_centroids=256)
    cpu.add(list(range(2000)), docs[:2000])
    cpu.add(list(range(2000, 3000)), docs[2000:])
    cpu.delete([5, 2500])
    gpu = MultiVectorIndex.open(tmp_path / "ix", device="cuda")
    queries = [docs[i][:32] for i in (3, 40, 2222)] + [np.asarray(flat[:7])]
    for compacted in (False, True):  # then merged into one segment on the GPU index: the same results
        if compacted:
            assert gpu.compact()["segments"] == 1
            cpu = MultiVectorIndex.open(tmp_path / "ix")
        for kwargs in ({}, {"exact": True}) if codec == "residual" else ({},):
            want, got = cpu.search(queries, k=10, **kwargs), gpu.search(queries, k=10, **kwargs)
            for w, h in zip(want, got):
                assert [x[0] for x in h] == [x[0] for x in w]
                assert np.allclose([x[1] for x in h], [x[1] for x in w], rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_residual_index_built_on_cuda(tmp_path):
    """A residual index created with device="cuda" trains and encodes on the GPU: its codes equal the CPU's
    encoding with the same codec (but for argmax near-ties), and its candidate search finds what its exact scan
    finds."""
    import numpy as np

    from tokenpool.index import MultiVectorIndex

    g = torch.Generator().manual_seed(7)
    lens = torch.randint(20, 120, (2000,), generator=g).tolist()
    topics = torch.nn.functional.normalize(torch.randn(64, 128, generator=g), dim=-1)
    flat = torch.nn.functional.normalize(topics[torch.randint(0, 64, (sum(lens),), generator=g)]
                                         + 0.5 * torch.randn(sum(lens), 128, generator=g) / 128 ** 0.5, dim=-1).numpy()
    docs = np.split(flat, np.cumsum(lens)[:-1])
    index = MultiVectorIndex.create(tmp_path / "ix", 128, codec="residual", nbits=2, device="cuda")
    index.add(list(range(2000)), docs)
    codec = index._residual
    seg = index._segments[0]
    cids, codes = codec.encode(flat[:20000])
    same = cids == np.asarray(seg.residual.cids[:20000])
    assert same.mean() > 0.999
    assert (codes[same] == np.asarray(seg.codes[:20000])[same]).mean() > 0.999
    queries = [docs[i][:32] for i in range(0, 2000, 50)]
    default, scanned = index.search(queries, k=10), index.search(queries, k=10, exact=True)
    recall = np.mean([len({d for d, _ in a} & {d for d, _ in b}) / 10 for a, b in zip(default, scanned)])
    assert recall >= 0.95
    cpu = MultiVectorIndex.open(tmp_path / "ix")  # the same files searched on the CPU: the same results
    for w, h in zip(cpu.search(queries, k=10), default):
        assert [x[0] for x in h] == [x[0] for x in w]
        assert np.allclose([x[1] for x in h], [x[1] for x in w], rtol=1e-3)


@pytest.mark.skipif(not (cuda_maxsim.available() and (torch.cuda.is_available() or INTERPRET)),
                    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1)")
def test_pair_kernels_equal_their_torch_paths():
    """The candidate stages' kernels equal the torch paths run on the CPU: the dense probe-hit and centroid-MaxSim
    kernels (`centroid_maxsim_dense`) against `centroid_maxsim_pairs` on the probed live documents, and the
    exact per-pair kernels (`maxsim_pairs`, 96 and 384 dims) against float64: queries of 1..40 rows (padding to
    16, 32 and 64), documents of 1..150 tokens, pairs grouped by query."""
    import numpy as np

    from tokenpool.index.multivector import _Residual

    g = torch.Generator().manual_seed(11)
    q_lens = [1, 7, 16, 17, 40]
    q_offsets = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    queries = torch.randn(int(q_offsets[-1]), 96, generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(300, 96, generator=g), dim=1)
    scores = queries @ centroids.T
    lens = torch.randint(1, 150, (500,), generator=g)
    doc_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    cids = torch.randint(0, 300, (int(doc_offsets[-1]),), generator=g, dtype=torch.int32)
    ivf, ivf_ptr = _Residual.inverted_lists(cids.numpy(), doc_offsets.numpy(), 300)
    probe = scores.topk(3, dim=1).indices
    keys = torch.cat([probe[q_offsets[b]:q_offsets[b + 1]].flatten() + b * 300 for b in range(5)])
    deleted = torch.zeros(500, dtype=torch.bool)
    deleted[::7] = True
    full = torch.full((5, 600), 7.0, device=DEVICE)  # a strided view, as the index passes one segment's columns
    cuda_maxsim.centroid_maxsim_dense(scores.to(DEVICE), q_offsets, keys.to(DEVICE), torch.from_numpy(ivf).to(DEVICE),
                                      torch.from_numpy(ivf_ptr).to(DEVICE), cids.to(DEVICE), doc_offsets.to(DEVICE),
                                      deleted.to(DEVICE), full[:, 50:550])
    assert (full[:, :50] == 7).all() and (full[:, 550:] == 7).all()
    got = full[:, 50:550].cpu()
    hit = torch.zeros(5, 500, dtype=torch.bool)
    for b in range(5):
        for c in probe[q_offsets[b]:q_offsets[b + 1]].flatten().tolist():
            hit[b, torch.from_numpy(ivf[ivf_ptr[c]:ivf_ptr[c + 1]]).long()] = True
    hit &= ~deleted
    pair_q, pair_doc = hit.nonzero(as_tuple=True)
    want = cuda_maxsim.centroid_maxsim_pairs(scores, q_offsets, cids, doc_offsets, pair_q, pair_doc)
    assert 100 < len(pair_q) < 2400 and torch.isneginf(got[~hit]).all()
    assert torch.allclose(got[pair_q, pair_doc], want, rtol=1e-5, atol=1e-5)
    pair_q = torch.repeat_interleave(torch.arange(5), torch.tensor([30, 1, 50, 7, 80]))
    t_lens = torch.randint(1, 120, (len(pair_q),), generator=g)
    t0 = torch.cumsum(t_lens, 0) - t_lens
    t1 = torch.minimum(t0 + t_lens, torch.tensor(3000))
    t0 = torch.minimum(t0 % 2900, t1 - 1)  # runs inside x; a query's runs overlap each other's, as allowed
    for dim, every in ((96, 1), (384, 4)):  # 384: the kernel for vectors over 256 dims (dimension chunks)
        pq, a0, a1 = pair_q[::every], t0[::every], t1[::every]  # (fewer pairs: Triton's interpreter is slow)
        wide = torch.randn(int(q_offsets[-1]), dim, generator=g)
        x = torch.randn(3000, dim, generator=g)
        want = torch.stack([(wide[q_offsets[b]:q_offsets[b + 1]].double() @ x[a:e].double().T).amax(1).sum()
                            for b, a, e in zip(pq.tolist(), a0.tolist(), a1.tolist())])
        got = cuda_maxsim.maxsim_pairs(wide.to(DEVICE), q_offsets, x.to(DEVICE), pq.to(DEVICE), a0.to(DEVICE),
                                       a1.to(DEVICE))
        assert torch.allclose(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
