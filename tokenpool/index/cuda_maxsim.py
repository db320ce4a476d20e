"""Exact MaxSim of stacked queries against a corpus of token matrices, fused on the GPU (Triton).

    MaxSim(q, d) = sum over q's rows i of max over d's rows j of dot(q_i, d_j)

Layout (as `MultiVectorIndex` stores a segment): `codes [tokens, dim]` (float16, bfloat16, float32 or int8), the
documents contiguous runs of rows delimited by `doc_offsets [docs + 1]`; for int8 a row decodes to
`code * scales[row] * dim_scales[col]`. Queries are stacked the same way: `queries [rows, dim]`, `q_offsets
[queries + 1]`. Both entry points return float32 `[queries, docs]`.

`maxsim_torch`: the reference and fallback (any device): chunks of whole documents, `q @ d.T`, a segment max
per document, a sum per query. The `[query rows, chunk tokens]` block is bounded, never the whole corpus.

`maxsim_cuda`: one Triton kernel that never writes a score matrix to memory. Design:

* Queries are padded per query to QLEN rows (a power of two >= the longest query) with zero rows, which add
  exactly 0 to a sum of maxima (max_j dot(0, d_j) = 0), so query rows need no mask. Each query row is scaled to
  max |q_i| = 1 (factor r_i, applied after the max: max_j(r x_j) = r max_j x_j for r > 0) and rounded to the
  dot dtype (bfloat16 for bfloat16 codes, float32 for float32 codes, float16 otherwise; int8 codes are
  converted to float16 exactly in registers, the per-row scale multiplies the fp32 scores, dim_scales is
  folded into the queries). Accumulation is fp32 on the tensor cores (fp32 codes: 3xTF32).
* The corpus is cut into token tiles of BT rows that never straddle two documents: a document of n rows is
  ceil(n / BT) tiles, its last one masked (masked rows cost no HBM traffic). A tile's scores
  S = Q_tile [BQ, dim] x D_tile^T [dim, BT] (or, with `Config.trans`, S^T = D_tile Q_tile^T: the token tile
  as the MMA's M side, the query rows as its N) are reduced at once to a per-query-row max over the tile's
  tokens (a running max across a document's tiles); at a document's last tile the per-row maxima are summed
  per query (BQ / QLEN queries per tile) and stored: 4 bytes per (query, document), nothing else is written.
  A query longer than BQ rows spans several query tiles: their partial sums are added afterwards.
* Grid: 1-D, program = (query tile, document block), the query tile fastest, so the programs that read one
  document block run side by side and all but the first find its tiles in L2. A program loads its query tile
  once (it stays in shared memory: "query stationary") and walks the tiles of DPP consecutive documents in
  one flat loop, which Triton software-pipelines (num_stages - 1 tile loads in flight, cp.async).
* Tile -> (row, document, first/last, valid rows): arithmetic when every document has the same length (one
  host sync to find out), else a table built on the device (16 bytes a tile), whose entry for tile k + 1 is
  loaded during tile k (loaded in its tile's own iteration, the table path was pipelined one tile deep only).

Dimensions: the kernel pads `dim` to a power of two with masked loads; dims that are not a multiple of 16, or
above 1024, take `maxsim_torch`, as do blockings that do not fit the GPU (OutOfResources, with a warning).
Blocking: `choose_config` (heuristic); bench/gpu_maxsim.py --sweep times alternatives.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None


# ---------------------------------------------------------------- torch reference / fallback

def _host_offsets(offsets) -> torch.Tensor:
    return torch.as_tensor(offsets).to("cpu", torch.int64)


def maxsim_torch(queries: torch.Tensor, q_offsets: torch.Tensor, codes: torch.Tensor, doc_offsets: torch.Tensor,
                 scales: torch.Tensor | None = None, dim_scales: torch.Tensor | None = None, *,
                 chunk_elements: int | None = None) -> torch.Tensor:
    """MaxSim of each query (rows q_offsets[i]..q_offsets[i+1] of `queries`) against each document (rows
    doc_offsets[j]..doc_offsets[j+1] of `codes`), float32 `[queries, docs]` on `codes`' device, computed in
    float32 over chunks of whole documents (`chunk_elements` bounds the chunk's score block). A document with
    no rows scores -inf; a query with no rows scores 0."""
    device = codes.device
    qo = _host_offsets(q_offsets)
    do = _host_offsets(doc_offsets)
    nq, nd = len(qo) - 1, len(do) - 1
    out = torch.zeros(nq, nd, dtype=torch.float32, device=device)
    if nq == 0 or nd == 0:
        return out
    q = queries[int(qo[0]):int(qo[-1])].to(device=device, dtype=torch.float32)
    if dim_scales is not None:
        q = q * dim_scales.to(device=device, dtype=torch.float32)[None, :]
    rows = q.shape[0]
    q_lens = qo[1:] - qo[:-1]
    qlen = max(int(q_lens.max()), 1)
    # per-query sums through a zero-padded [queries, qlen, docs] block: deterministic on every device
    row_query = torch.repeat_interleave(torch.arange(nq), q_lens)
    dest = (row_query * qlen + torch.arange(rows) - (qo[:-1] - qo[0])[row_query]).to(device)
    if chunk_elements is None:
        chunk_elements = 1 << (26 if device.type == "cuda" else 23)
    budget = max(chunk_elements // max(rows, 1), 1)
    offs = do.numpy()
    lens_all = do[1:] - do[:-1]
    start = 0
    while start < nd:
        stop = int(torch.searchsorted(do, do[start] + budget, right=True)) - 1
        stop = min(max(stop, start + 1), nd)
        t0, t1 = int(offs[start]), int(offs[stop])
        n = stop - start
        lens = lens_all[start:stop]
        block = codes[t0:t1].to(torch.float32)
        if scales is not None:
            block = block * scales[t0:t1].to(device=device, dtype=torch.float32)[:, None]
        s = block @ q.T  # [chunk tokens, rows]
        lmin, lmax = int(lens.min()), int(lens.max())
        if lmin == lmax and lmin > 0:
            best = s.view(n, lmin, rows).amax(dim=1)
        else:  # a document with no rows: -inf
            best = torch.segment_reduce(s, "max", lengths=lens.to(device), axis=0)
        padded = torch.zeros(n, nq * qlen, dtype=torch.float32, device=device)
        padded[:, dest] = best
        out[:, start:stop] = padded.view(n, nq, qlen).sum(dim=2).T
        if lmin == 0:  # -inf for every query, one with no rows too
            out[:, start:stop][:, (lens == 0).to(device)] = float("-inf")
        start = stop
    return out


# ---------------------------------------------------------------- Triton kernel

def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Whether `maxsim_cuda` can run its kernel: Triton importable and a CUDA device (or Triton's interpreter,
    TRITON_INTERPRET=1, which runs the kernel on CPU tensors: for checking the kernel's logic only)."""
    return triton is not None and (torch.cuda.is_available() or _interpret())


@dataclass(frozen=True)
class Config:
    """One launch's blocking. bq: query rows per program (a multiple of 16, power of two); bt: tokens per tile;
    dpp: documents per program; num_warps, num_stages: Triton's; trans: compute S^T = D Q^T (token tile as the
    MMA's A operand, query rows as its N) instead of S = Q D^T."""
    bq: int
    bt: int
    dpp: int
    num_warps: int = 4
    num_stages: int = 3
    trans: bool = False


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _dot_dtype(codes_dtype: torch.dtype) -> torch.dtype:
    if codes_dtype == torch.bfloat16:
        return torch.bfloat16
    if codes_dtype == torch.float32:
        return torch.float32
    return torch.float16  # float16 and int8 (int8 -> float16 is exact)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def choose_config(rows: int, dim: int, codes_dtype: torch.dtype, n_docs: int, device: torch.device) -> Config:
    """Heuristic blocking for `rows` padded query rows (queries x QLEN), reasoned for Hopper from sm_90 builds
    (shared memory, registers, no spills) and timed on an H200 with bench/gpu_maxsim.py --sweep (fp16 codes,
    dim 128; other dtypes and dims are reasoned only). Few rows: memory bound, 128-token tiles; many rows:
    compute bound, query tiles of up to 256 rows (a document tile is then read from HBM once and from L2
    rows/256 - 1 times). Shared memory is about Q + (num_stages - 1) token tiles."""
    dp = _next_pow2(max(dim, 16))
    stages = 3
    if codes_dtype == torch.float32:  # 3xTF32 products: mma v2 (bq < 64) or larger blocks spill registers
        bq = 64 if dp <= 256 else 16  # tf32x3 keeps hi and lo copies of Q in shared memory
        return Config(bq=bq, bt=32 if dp <= 128 else 16, dpp=_docs_per_program(rows, bq, n_docs, device),
                      num_warps=4, num_stages=stages)
    # measured on an H200 (bench/gpu_maxsim.py --sweep, 1M x 128 x 128 fp16): 1 query of 32 rows, bq 32 / bt 128:
    # 7.0 ms; 32 queries (1,024 rows): bq 256 / bt 64 / 8 warps 61.5 ms, bq 128 / bt 64 69.7 ms
    bq = min(max(_next_pow2(rows), 16), 256)
    bt = 128 if bq <= 64 else 64
    while bq > 16 and bq * dp * 2 > 64 * 1024:
        bq //= 2
    tile_bytes = dp * codes_dtype.itemsize * (stages - 1) + (dp * 2 if codes_dtype == torch.int8 else 0)
    while bt > 16 and bt * tile_bytes + bq * dp * 2 > 144 * 1024:
        bt //= 2
    warps = 4 if bq * bt <= 128 * 64 else 8
    return Config(bq=bq, bt=bt, dpp=_docs_per_program(rows, bq, n_docs, device), num_warps=warps,
                  num_stages=stages)


def _docs_per_program(rows: int, bq: int, n_docs: int, device: torch.device) -> int:
    n_qtiles = -(-rows // bq)
    want = _sm_count(device) * 16  # programs wanted in all: several waves, a short tail
    return max(1, min(64, (n_docs * n_qtiles) // want))


if triton is not None:

    @triton.jit
    def _maxsim_kernel(
        q_ptr,  # [rows_pad, DP] dot dtype: queries padded to QLEN rows each (zero rows), scaled to max |q_i| = 1
        r_ptr,  # [rows_pad] float32: each row's factor
        codes_ptr,  # [tokens, DIM]
        scales_ptr,  # [tokens] float32 (HAS_SCALES)
        out_ptr,  # [n_groups, n_docs] float32
        tile_row_ptr,  # table path: [tiles + 1] int64 first row of each tile (+ a padding entry)
        tile_meta_ptr,  # table path: [tiles + 1] int64 doc << 11 | first << 10 | last << 9 | valid rows
        doc_tile_ptr,  # table path: [docs + 1] int64 first tile of each document
        n_docs, n_groups, n_qtiles, dpp,
        base_row, doc_len, tiles_per_doc,  # uniform path: every document has doc_len rows
        DIM: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
        UNIFORM: tl.constexpr, MASK_ROWS: tl.constexpr, HAS_SCALES: tl.constexpr, CONVERT: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, TRANS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        qt = pid % n_qtiles
        db = pid // n_qtiles
        d_lo = db * dpp
        d_hi = tl.minimum(d_lo + dpp, n_docs)
        rows_q = qt * BQ + tl.arange(0, BQ)
        cols = tl.arange(0, DP)
        q = tl.load(q_ptr + rows_q.to(tl.int64)[:, None] * DP + cols[None, :])
        r = tl.load(r_ptr + rows_q)
        groups = qt * (BQ // GROUP) + tl.arange(0, BQ // GROUP)
        out_rows = out_ptr + groups.to(tl.int64) * n_docs
        t = tl.arange(0, BT)
        if UNIFORM:
            k_lo = d_lo * tiles_per_doc
            k_hi = d_hi * tiles_per_doc
        else:
            k_lo = tl.load(doc_tile_ptr + d_lo)
            k_hi = tl.load(doc_tile_ptr + d_hi)
        m_run = tl.full([BQ], float("-inf"), tl.float32)
        if UNIFORM:
            row_nx = 0
            meta_nx = 0
        else:  # the table entry of the next tile, loaded one tile ahead: the tile loads' addresses then come from
            # the previous iteration and Triton pipelines them as deep as with arithmetic addresses
            row_nx = tl.load(tile_row_ptr + k_lo)
            meta_nx = tl.load(tile_meta_ptr + k_lo)
        for k in range(k_lo, k_hi):
            if UNIFORM:
                doc = k // tiles_per_doc
                j = k - doc * tiles_per_doc
                row = base_row + doc.to(tl.int64) * doc_len + j * BT
                n_valid = tl.minimum(doc_len - j * BT, BT)
                first = j == 0
                last = j == tiles_per_doc - 1
            else:
                row = row_nx
                meta = meta_nx
                row_nx = tl.load(tile_row_ptr + k + 1)  # the table ends with one entry more
                meta_nx = tl.load(tile_meta_ptr + k + 1)
                doc = meta >> 11
                first = ((meta >> 10) & 1) != 0
                last = ((meta >> 9) & 1) != 0
                n_valid = (meta & 511).to(tl.int32)
            ptrs = codes_ptr + (row + t)[:, None] * DIM + cols[None, :]
            if MASK_ROWS:
                if DP != DIM:
                    d = tl.load(ptrs, mask=(t[:, None] < n_valid) & (cols[None, :] < DIM), other=0)
                else:
                    d = tl.load(ptrs, mask=t[:, None] < n_valid, other=0)
            else:
                if DP != DIM:
                    d = tl.load(ptrs, mask=cols[None, :] < DIM, other=0)
                else:
                    d = tl.load(ptrs)
            if CONVERT:
                d = d.to(q.dtype)
            qq = q
            if INTERPRET_BF16:  # the interpreter multiplies bfloat16 as raw bits: exact fp32 of the same values
                qq = q.to(tl.float32)
                d = d.to(tl.float32)
            if HAS_SCALES:
                if MASK_ROWS:
                    sc = tl.load(scales_ptr + row + t, mask=t < n_valid, other=1.0)
                else:
                    sc = tl.load(scales_ptr + row + t)
            if TRANS:  # S^T = D Q^T [BT, BQ]: the tile is the MMA's A operand, the query rows its N
                s = tl.dot(d, tl.trans(qq), input_precision=PRECISION)
                if HAS_SCALES:
                    s = s * sc[:, None]
                if MASK_ROWS:
                    s = tl.where(t[:, None] < n_valid, s, float("-inf"))
                m = tl.max(s, axis=0)
            else:  # S = Q D^T [BQ, BT]
                s = tl.dot(qq, tl.trans(d), input_precision=PRECISION)
                if HAS_SCALES:
                    s = s * sc[None, :]
                if MASK_ROWS:
                    s = tl.where(t[None, :] < n_valid, s, float("-inf"))
                m = tl.max(s, axis=1)
            m_run = tl.where(first, m, tl.maximum(m_run, m))
            tot = tl.sum(tl.reshape(m_run * r, (BQ // GROUP, GROUP)), axis=1)
            # one comparison (the interpreter mis-types a vector mask & a scalar one)
            tl.store(out_rows + doc, tot, mask=groups < tl.where(last, n_groups, 0))


if triton is not None:

    @triton.jit
    def _pairs_kernel(q_ptr, x_ptr, pair_q_ptr, pair_t0_ptr, pair_t1_ptr, out_ptr,
                      DIM: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr):
        """One program per (query, document) pair: MaxSim of the query (MP zero-padded float32 rows) with the
        document's rows t0..t1 of `x` (float32), products in 3xTF32 (float32 accuracy)."""
        pid = tl.program_id(0)
        q = tl.load(pair_q_ptr + pid).to(tl.int64)
        t0 = tl.load(pair_t0_ptr + pid)
        t1 = tl.load(pair_t1_ptr + pid)
        r = tl.arange(0, MP)
        cols = tl.arange(0, DP)
        qt = tl.load(q_ptr + (q * MP + r)[:, None] * DP + cols[None, :])
        t = tl.arange(0, BT)
        best = tl.full([MP], float("-inf"), tl.float32)
        for start in range(t0, t1, BT):
            rows = start + t
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * DIM + cols[None, :],
                        mask=(rows[:, None] < t1) & (cols[None, :] < DIM), other=0.0)
            s = tl.dot(qt, tl.trans(x), input_precision="tf32x3")
            s = tl.where(rows[None, :] < t1, s, float("-inf"))
            best = tl.maximum(best, tl.max(s, axis=1))
        tl.store(out_ptr + pid, tl.sum(best, axis=0))

    @triton.jit
    def _pairs_chunked_kernel(q_ptr, x_ptr, pair_q_ptr, pair_t0_ptr, pair_t1_ptr, out_ptr,
                              DIM: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, MP: tl.constexpr,
                              BT: tl.constexpr):
        """`_pairs_kernel` for wide vectors (DP > 256): each block of BT tokens' scores summed over DP / DC chunks
        of the dimensions, the query's chunk read again per block (from L1/L2), so registers hold [MP, DC] and
        [BT, DC] tiles whatever the width."""
        pid = tl.program_id(0)
        q = tl.load(pair_q_ptr + pid).to(tl.int64)
        t0 = tl.load(pair_t0_ptr + pid)
        t1 = tl.load(pair_t1_ptr + pid)
        r = tl.arange(0, MP)
        c = tl.arange(0, DC)
        t = tl.arange(0, BT)
        q_rows = q_ptr + (q * MP + r)[:, None] * DP
        best = tl.full([MP], float("-inf"), tl.float32)
        for start in range(t0, t1, BT):
            rows = start + t
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * DIM
            s = tl.zeros([MP, BT], tl.float32)
            for d0 in range(0, DP, DC):  # a loop, not unrolled: one chunk's tiles in shared memory at a time
                cols = d0 + c
                qt = tl.load(q_rows + cols[None, :])
                x = tl.load(x_rows + cols[None, :], mask=(rows[:, None] < t1) & (cols[None, :] < DIM), other=0.0)
                s += tl.dot(qt, tl.trans(x), input_precision="tf32x3")
            s = tl.where(rows[None, :] < t1, s, float("-inf"))
            best = tl.maximum(best, tl.max(s, axis=1))
        tl.store(out_ptr + pid, tl.sum(best, axis=0))

    @triton.jit
    def _probe_hits_kernel(ivf_ptr, ivf_ptr_ptr, key_ptr, hit_ptr, n_docs, n_centroids, BLOCK: tl.constexpr):
        """One program per (query, probed centroid) key (query * n_centroids + centroid): sets hit[query, doc] for
        every document in the centroid's inverted list (repeated keys and documents only write 1 again)."""
        key = tl.load(key_ptr + tl.program_id(0)).to(tl.int64)
        q = key // n_centroids
        c = key % n_centroids
        lo = tl.load(ivf_ptr_ptr + c)
        hi = tl.load(ivf_ptr_ptr + c + 1)
        b = tl.arange(0, BLOCK)
        ones = tl.full([BLOCK], 1, tl.int8)
        for start in range(lo, hi, BLOCK):
            mask = start + b < hi
            doc = tl.load(ivf_ptr + start + b, mask=mask, other=0).to(tl.int64)
            tl.store(hit_ptr + q * n_docs + doc, ones, mask=mask)

    @triton.jit
    def _centroid_dense_kernel(st_ptr, cids_ptr, offsets_ptr, hit_ptr, deleted_ptr, out_ptr, n_docs, out_stride,
                               n_centroids, MP: tl.constexpr, BT: tl.constexpr):
        """Program (document, query): the max over the document's tokens of the query's transposed score table row
        ST[query, centroid of the token, :] (MP query-row scores, zero for padded rows; a gathered 4 MP-byte row,
        from L2), summed over the rows, where hit[query, document] is set and the document is not deleted; else
        -inf (its token loop then runs zero times)."""
        doc = tl.program_id(0).to(tl.int64)
        q = tl.program_id(1).to(tl.int64)
        live = (tl.load(hit_ptr + q * n_docs + doc) != 0) & (tl.load(deleted_ptr + doc) == 0)
        t0 = tl.load(offsets_ptr + doc)
        t1 = tl.where(live, tl.load(offsets_ptr + doc + 1), t0)
        base = st_ptr + q * n_centroids * MP
        r = tl.arange(0, MP)
        t = tl.arange(0, BT)
        best = tl.full([MP], float("-inf"), tl.float32)
        for start in range(t0, t1, BT):
            mask = start + t < t1
            c = tl.load(cids_ptr + start + t, mask=mask, other=0).to(tl.int64)
            v = tl.load(base + c[:, None] * MP + r[None, :], mask=mask[:, None], other=float("-inf"))
            best = tl.maximum(best, tl.max(v, axis=0))
        total = tl.where(live, tl.sum(best, axis=0), float("-inf"))
        tl.store(out_ptr + q * out_stride + doc, total)


_PAIRS_MAX_DIM = 4096  # widest vectors (padded to a power of two) `maxsim_pairs` scores in a kernel


def _kernel_ok(t: torch.Tensor, mp: int) -> bool:
    return available() and (t.is_cuda or _interpret()) and mp <= 128


def _pad_rows(rows: torch.Tensor, q_offsets: np.ndarray, mp: int, width: int | None = None) -> torch.Tensor:
    """Stacked query rows `[rows, n]` -> `[queries, mp, width or n]` float32, each query's rows first, zero padded
    (slice copies: no index tensor to copy to the device, which would be a sync point there)."""
    nq = len(q_offsets) - 1
    out = torch.zeros(nq, mp, width or rows.shape[1], dtype=torch.float32, device=rows.device)
    for b in range(nq):
        out[b, :q_offsets[b + 1] - q_offsets[b], :rows.shape[1]] = rows[q_offsets[b]:q_offsets[b + 1]]
    return out


def _query_table(scores: torch.Tensor, q_offsets: np.ndarray, mp: int) -> torch.Tensor:
    """`scores [rows, n]` of stacked queries -> `[queries, n, mp]`: each query's rows as columns, zero padded."""
    return _pad_rows(scores, q_offsets, mp).transpose(1, 2).contiguous()


def centroid_maxsim_pairs(scores: torch.Tensor, q_offsets: np.ndarray, cids, doc_offsets: torch.Tensor,
                          pair_q: torch.Tensor, pair_doc: torch.Tensor) -> torch.Tensor:
    """Per (query, document) pair, MaxSim of the query with the document's tokens replaced by their centroids:
    sum over the query's rows i of max over the document's tokens j of scores[i, cids[j]].
    `scores [rows, centroids]` (the stacked queries' rows, query b's rows q_offsets[b]..q_offsets[b + 1]),
    `cids [tokens]` (a tensor, or on the CPU also a NumPy array / memory map), `doc_offsets [docs + 1]`, the
    pairs' query and document positions (grouped by query) -> float32 `[pairs]`.
    The CPU's path (where Triton runs, `centroid_maxsim_dense` serves instead): a C kernel per query
    (tokenpool/kernels/centroid_maxsim.c) for a memory-mapped segment where it is built, else torch gathers in
    bounded blocks."""
    from tokenpool.kernels import centroid_maxsim as kernel

    n = len(pair_q)
    if n == 0:
        return torch.empty(0, device=scores.device)
    out = torch.empty(n, dtype=torch.float32, device=scores.device)
    pq, pd = pair_q.cpu().numpy(), pair_doc.cpu().numpy()
    offs = _host_offsets(doc_offsets).numpy()
    use_kernel = (isinstance(cids, np.ndarray) and scores.device.type == "cpu"
                  and kernel.supports(cids, int(np.diff(q_offsets).max())))
    for b in np.unique(pq):  # pairs are grouped by query
        lo, hi = np.searchsorted(pq, b), np.searchsorted(pq, b, side="right")
        q_scores = scores[int(q_offsets[b]):int(q_offsets[b + 1])]
        if use_kernel:
            out[lo:hi] = torch.from_numpy(kernel.centroid_maxsim(q_scores.numpy(), cids, offs, pd[lo:hi],
                                                                 torch.get_num_threads()))
            continue
        budget = max((1 << 18) // max(q_scores.shape[0], 1), 1)  # tokens per gathered [m, tokens] block
        ends = np.cumsum(offs[pd[lo:hi] + 1] - offs[pd[lo:hi]])
        start = 0
        while start < hi - lo:
            stop = max(int(np.searchsorted(ends, (ends[start - 1] if start else 0) + budget, side="right")), start + 1)
            docs = pd[lo + start:lo + stop]
            rows, owner = expand_ranges(offs[docs], offs[docs + 1] - offs[docs])
            best = torch.full((q_scores.shape[0], len(docs)), float("-inf"), device=scores.device)
            if isinstance(cids, np.ndarray):  # a CPU segment's memory map
                ids = torch.from_numpy(np.asarray(cids[rows], dtype=np.int64))
            else:
                ids = cids[torch.from_numpy(rows).to(cids.device)].long()
            gathered = q_scores.index_select(1, ids.to(scores.device))
            best.scatter_reduce_(1, torch.from_numpy(owner).to(scores.device).expand(q_scores.shape[0], -1),
                                 gathered, "amax")
            out[lo + start:lo + stop] = best.sum(dim=0)
            start = stop
    return out


def centroid_maxsim_dense(scores: torch.Tensor, q_offsets: np.ndarray, probe_keys: torch.Tensor, ivf: torch.Tensor,
                          ivf_ptr: torch.Tensor, cids: torch.Tensor, doc_offsets: torch.Tensor, deleted: torch.Tensor,
                          out: torch.Tensor) -> None:
    """Stages A and B of the residual candidate search for one segment, without a host sync: `out [queries, docs]`
    (a float32 view, row stride free) gets, per (query, document), the centroid MaxSim (as
    `centroid_maxsim_pairs`) where the document is live and has a token in one of the centroids the query
    probes (`probe_keys`: query * n_centroids + centroid, on the device; `ivf`/`ivf_ptr` the segment's inverted
    lists), else -inf. Two Triton launches of fixed grids (CUDA or Triton's interpreter only)."""
    nq, n_docs = out.shape
    n_centroids = scores.shape[1]
    mp = _next_pow2(max(int(np.diff(q_offsets).max()), 16))
    hit = torch.zeros(nq, n_docs, dtype=torch.int8, device=scores.device)
    _probe_hits_kernel[(len(probe_keys),)](ivf, ivf_ptr, probe_keys, hit, n_docs, n_centroids, BLOCK=128,
                                           num_warps=4)
    st = _query_table(scores, q_offsets, mp)
    _centroid_dense_kernel[(n_docs, nq)](st, cids, doc_offsets, hit, deleted.view(torch.uint8), out, n_docs,
                                         out.stride(0), n_centroids, MP=mp, BT=max(16, 2048 // mp), num_warps=4)


def dense_kernels_ok(t: torch.Tensor, q_offsets: np.ndarray) -> bool:
    """Whether `centroid_maxsim_dense` and `maxsim_pairs`'s kernel serve queries `q_offsets` on `t`'s device, for
    vectors of `t`'s width (`maxsim_pairs` takes its kernels up to `_PAIRS_MAX_DIM` dims)."""
    mp = _next_pow2(max(int(np.diff(q_offsets).max()), 16))
    return _kernel_ok(t, mp) and _next_pow2(max(t.shape[1], 16)) <= _PAIRS_MAX_DIM


def expand_ranges(starts, lengths):
    """The ranges starts[i]..starts[i] + lengths[i] laid end to end -> (the indices, per index the range's i).
    NumPy arrays or torch tensors (on any device; one host sync there, for the total)."""
    if isinstance(starts, np.ndarray):
        owner = np.repeat(np.arange(len(starts)), lengths)
        return np.arange(len(owner)) - (np.cumsum(lengths) - lengths)[owner] + starts[owner], owner
    total = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths, output_size=total)
    return torch.arange(total, device=starts.device) - (torch.cumsum(lengths, 0) - lengths)[owner] + starts[owner], owner


def maxsim_pairs(queries: torch.Tensor, q_offsets: np.ndarray, x: torch.Tensor, pair_q: torch.Tensor,
                 pair_t0: torch.Tensor, pair_t1: torch.Tensor) -> torch.Tensor:
    """Exact MaxSim per (query, document) pair, float32 `[pairs]`: query b is rows q_offsets[b]..q_offsets[b + 1]
    of `queries`, a pair's document rows pair_t0..pair_t1 of `x` (float32 `[tokens, dim]`, on one device with
    the queries). On CUDA one Triton program per pair (3xTF32 products; vectors over 256 dims in chunks of 64
    dims); on the CPU the C kernel's fp32 path (tokenpool/kernels/maxsim.c), query by query; else torch."""
    n = len(pair_q)
    if n == 0:
        return torch.empty(0, device=x.device)
    lens_q = np.diff(q_offsets)
    mp = _next_pow2(max(int(lens_q.max()), 16))
    dim = x.shape[1]
    dp = _next_pow2(max(dim, 16))
    if _kernel_ok(x, mp) and dp <= _PAIRS_MAX_DIM:
        qpad = _pad_rows(queries, q_offsets, mp, dp)
        out = torch.empty(n, dtype=torch.float32, device=x.device)
        pair_q, pair_t0, pair_t1 = pair_q.contiguous(), pair_t0.contiguous(), pair_t1.contiguous()  # read as arrays
        if dp <= 256:
            _pairs_kernel[(n,)](qpad, x.contiguous(), pair_q, pair_t0, pair_t1, out, DIM=dim, DP=dp, MP=mp,
                                BT=32 if mp * dp <= 4096 else 16, num_warps=4)
        else:
            _pairs_chunked_kernel[(n,)](qpad, x.contiguous(), pair_q, pair_t0, pair_t1, out, DIM=dim, DP=dp, DC=64,
                                        MP=mp, BT=32 if mp <= 32 else 16, num_warps=4, num_stages=2)
        return out
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    pq, t0, t1 = (t.cpu().numpy() for t in (pair_q, pair_t0, pair_t1))
    from tokenpool.kernels import maxsim as cpu_kernel

    in_c = x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernel.available()
    for b in np.unique(pq):
        sel = np.flatnonzero(pq == b)
        rows, owner_np = expand_ranges(t0[sel], t1[sel] - t0[sel])
        if len(rows) and (np.diff(rows) == 1).all():  # one run of x (as the candidate search lays it out)
            block = x[int(rows[0]):int(rows[-1]) + 1]
        else:
            block = x.index_select(0, torch.from_numpy(rows).to(x.device))
        if in_c:  # the CPU's C kernel (fp32 products), each pair's rows one of its documents
            offsets = np.zeros(len(sel) + 1, dtype=np.int64)
            np.cumsum(t1[sel] - t0[sel], out=offsets[1:])
            query = queries[int(q_offsets[b]):int(q_offsets[b + 1])].float().contiguous().numpy()
            got = cpu_kernel.maxsim(query, np.zeros(1, dtype=np.int64), block.contiguous().numpy(), offsets,
                                    threads=torch.get_num_threads())
            out[torch.from_numpy(sel)] = torch.from_numpy(got[0]).double()
            continue
        products = queries[int(q_offsets[b]):int(q_offsets[b + 1])].float() @ block.T
        owner = torch.from_numpy(owner_np).to(x.device)
        best = torch.full((products.shape[0], len(sel)), float("-inf"), device=x.device)
        best.scatter_reduce_(1, owner.expand(products.shape[0], -1), products, "amax")
        out[torch.from_numpy(sel).to(x.device)] = best.double().sum(dim=0)
    return out.float() if x.is_cuda else out


@dataclass
class _Plan:
    """How the kernel walks the corpus: arithmetic for equal-length documents, else a tile table."""
    uniform: bool
    base_row: int = 0
    doc_len: int = 0
    tiles_per_doc: int = 1
    tile_row: torch.Tensor | None = None
    tile_meta: torch.Tensor | None = None
    doc_tile: torch.Tensor | None = None


def _plan(doc_offsets: torch.Tensor, bt: int) -> _Plan:
    offs = doc_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    lo, hi, base = torch.stack([lens.min(), lens.max(), offs[0]]).tolist()  # one host sync
    if lo == hi:
        return _Plan(True, base_row=base, doc_len=lo, tiles_per_doc=max(-(-lo // bt), 1))
    if lo < 0:
        raise ValueError("doc_offsets must be non-decreasing.")
    n_docs = lens.numel()
    tiles = ((lens + bt - 1) // bt).clamp_min(1)
    doc_tile = torch.zeros(n_docs + 1, dtype=torch.int64, device=offs.device)
    torch.cumsum(tiles, 0, out=doc_tile[1:])
    total = int(doc_tile[-1])  # a second sync: the table's size
    tile_doc = torch.repeat_interleave(torch.arange(n_docs, device=offs.device), tiles, output_size=total)
    j = torch.arange(total, device=offs.device) - doc_tile[tile_doc]
    tile_row = offs[tile_doc] + j * bt
    valid = (lens[tile_doc] - j * bt).clamp(0, bt)
    first = (j == 0).to(torch.int64)
    last = (j == tiles[tile_doc] - 1).to(torch.int64)
    meta = (tile_doc << 11) | (first << 10) | (last << 9) | valid
    pad = torch.zeros(1, dtype=torch.int64, device=offs.device)  # read (not used) ahead of the last tile
    return _Plan(False, tile_row=torch.cat([tile_row, pad]), tile_meta=torch.cat([meta, pad]), doc_tile=doc_tile)


def _pad_queries(queries, q_offsets, dim_scales, device, dot_dtype, dp, bq):
    """Queries as the kernel reads them: [rows_pad, dp] (each query QLEN rows, zero padded; rows scaled to
    max |q_i| = 1), the row factors [rows_pad], QLEN."""
    qo = _host_offsets(q_offsets)
    nq = len(qo) - 1
    q_lens = qo[1:] - qo[:-1]
    qlen = _next_pow2(max(int(q_lens.max()), 1))
    q = queries[int(qo[0]):int(qo[-1])].to(device=device, dtype=torch.float32)
    if dim_scales is not None:
        q = q * dim_scales.to(device=device, dtype=torch.float32)[None, :]
    r = q.abs().amax(dim=1)
    r = torch.where(r > 0, r, torch.ones_like(r))
    rows = nq * qlen
    rows_pad = -(-rows // bq) * bq
    row_query = torch.repeat_interleave(torch.arange(nq), q_lens)
    dest = (row_query * qlen + torch.arange(q.shape[0]) - (qo[:-1] - qo[0])[row_query]).to(device)
    qpad = torch.zeros(rows_pad, dp, dtype=dot_dtype, device=device)
    qpad[dest, :q.shape[1]] = (q / r[:, None]).to(dot_dtype)
    rpad = torch.ones(rows_pad, dtype=torch.float32, device=device)
    rpad[dest] = r
    return qpad, rpad, qlen


def _maxsim_triton(queries, q_offsets, codes, doc_offsets, scales=None, dim_scales=None,
                   config: Config | None = None) -> torch.Tensor:
    return _prepare(queries, q_offsets, codes, doc_offsets, scales, dim_scales, config)()


def _prepare(queries, q_offsets, codes, doc_offsets, scales=None, dim_scales=None, config: Config | None = None):
    """Everything but the kernel (padded queries, the tile plan, the output): a function that launches it and
    returns the `[queries, docs]` scores (each call launches again: the benchmark times the kernel alone)."""
    device = codes.device
    n_queries = len(q_offsets) - 1
    n_docs = len(doc_offsets) - 1
    dim = codes.shape[1]
    dot_dtype = _dot_dtype(codes.dtype)
    dp = _next_pow2(max(dim, 16))
    qlen = _next_pow2(max(int((_host_offsets(q_offsets).diff()).max()), 1))
    if config is None:
        config = choose_config(n_queries * qlen, dim, codes.dtype, n_docs, device)
    bq = config.bq
    qpad, rpad, qlen = _pad_queries(queries, q_offsets, dim_scales, device, dot_dtype, dp, bq)
    group = min(qlen, bq)
    n_groups = n_queries * qlen // group
    n_qtiles = qpad.shape[0] // bq
    out = torch.empty(n_groups, n_docs, dtype=torch.float32, device=device)
    doc_offsets = doc_offsets.to(device=device, dtype=torch.int64)
    plan = _plan(doc_offsets, config.bt)
    dummy = torch.empty(1, dtype=torch.int64, device=device)
    if scales is not None:
        scales = scales.to(device=device, dtype=torch.float32).contiguous()
    grid = (n_qtiles * -(-n_docs // config.dpp),)
    args = (qpad, rpad, codes, scales if scales is not None else rpad, out,
            plan.tile_row if plan.tile_row is not None else dummy,
            plan.tile_meta if plan.tile_meta is not None else dummy,
            plan.doc_tile if plan.doc_tile is not None else dummy,
            n_docs, n_groups, n_qtiles, config.dpp, plan.base_row, plan.doc_len, plan.tiles_per_doc)
    meta = dict(DIM=dim, DP=dp, BQ=bq, BT=config.bt, GROUP=group, UNIFORM=plan.uniform,
                MASK_ROWS=not plan.uniform or plan.doc_len % config.bt != 0 or plan.doc_len == 0, HAS_SCALES=scales is not None,
                CONVERT=codes.dtype != dot_dtype, PRECISION="tf32x3" if dot_dtype == torch.float32 else "tf32",
                INTERPRET_BF16=_interpret() and dot_dtype == torch.bfloat16, TRANS=config.trans,
                num_warps=config.num_warps, num_stages=config.num_stages)

    def launch() -> torch.Tensor:
        _maxsim_kernel[grid](*args, **meta)
        if qlen > bq:  # a query spans several query tiles: add its partial sums
            return out.view(n_queries, qlen // bq, n_docs).sum(dim=1)
        return out

    return launch


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.int8)


def maxsim_cuda(queries: torch.Tensor, q_offsets: torch.Tensor, codes: torch.Tensor, doc_offsets: torch.Tensor,
                scales: torch.Tensor | None = None, dim_scales: torch.Tensor | None = None) -> torch.Tensor:
    """MaxSim of each query against each document (see the module doc), float32 `[queries, docs]`, through the
    fused Triton kernel where it applies (CUDA codes of a supported dtype, dim a multiple of 16 and at most
    1024), else `maxsim_torch` (same result up to rounding: the kernel takes the query rows in the dot dtype)."""
    if queries.dim() != 2 or codes.dim() != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and codes {tuple(codes.shape)} must be [rows, dim] "
                         "matrices of one dim.")
    n_queries, n_docs = len(q_offsets) - 1, len(doc_offsets) - 1
    dim = codes.shape[1]
    runnable = (available() and (codes.is_cuda or _interpret()) and codes.dtype in _SUPPORTED
                and dim % 16 == 0 and dim <= 1024 and codes.is_contiguous())
    if not runnable or n_queries == 0 or n_docs == 0:
        return maxsim_torch(queries, q_offsets, codes, doc_offsets, scales, dim_scales)
    try:
        return _maxsim_triton(queries, q_offsets, codes, doc_offsets, scales, dim_scales)
    except triton.runtime.errors.OutOfResources as e:  # a blocking this GPU cannot hold: exact, slower
        warnings.warn(f"maxsim_cuda: {e}; using maxsim_torch.", RuntimeWarning, stacklevel=2)
        return maxsim_torch(queries, q_offsets, codes, doc_offsets, scales, dim_scales)
