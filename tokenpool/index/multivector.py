"""`MultiVectorIndex`: token matrices on disk, searched by MaxSim: exactly (codecs float32, float16, int8) or
through a compressed codec's candidates (codec residual, see tokenpool/index/residual.py).

A folder:

    manifest.json          {"format", "dim", "codec", "segments": [{"name", "docs", "tokens", "deleted"}]}
    seg-000001.codes.npy   [tokens, dim] codes of one `add` call (float32 / float16 / int8), memory-mapped;
                           residual: [tokens, nbits * dim / 8] packed residual codes
    seg-000001.scales.npy  int8 only: [tokens] float32 per-row scales (x = code * scale * dim_scale)
    seg-000001.cids.npy    residual only: [tokens] centroid ids (uint16, int32 past 65,536 centroids)
    seg-000001.ivf.npy     residual only: the segment's document positions grouped by centroid (each document
    seg-000001.ivfptr.npy  once per centroid it has a token of), and [centroids + 1] offsets into it
    codec.npz              residual only: the trained codec (centroids, transform, levels), from the first add
    seg-000001.docs.json   the call's ids (with their types), token offsets and metadata
    seg-000001.del-3.npy   the segment's deleted document positions as of manifest version 3

Durability: an `add` writes its segment files, fsyncs them, then commits a new manifest (written to a
temporary file, fsynced, renamed over the old one, directory fsynced). The manifest is the only source of
truth: a crash (kill -9) before the rename leaves the old manifest and unreferenced files, which `open`
deletes, so an index always holds all or none of an `add`. `delete` and the replacement part of an upsert
commit new deletion files the same way. Segments are never rewritten in place: compaction (`compact()`, and
automatically after an `add` once 4 segments of one size tier follow each other at the end) writes the live
documents of several segments into one new segment and commits a manifest that lists it instead of them, so
a crash leaves either the old segments or the new one; searches in flight keep reading the old ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenpool.index.cuda_maxsim import (centroid_maxsim_dense, centroid_maxsim_pairs, dense_kernels_ok, expand_ranges,
                                         maxsim_pairs)
from tokenpool.index.residual import NBITS, ResidualCodec, default_num_centroids
from tokenpool.kernels import maxsim as _maxsim_kernel

CODECS = ("float32", "float16", "int8", "residual")
_FORMAT = "tokenpool-multivector-index/1"
_MANIFEST = "manifest.json"
_SEGMENT_FILES = ("codes.npy", "scales.npy", "docs.json", "cids.npy", "ivf.npy", "ivfptr.npy")
logger = logging.getLogger(__name__)
# Document tokens scored per matrix product: bounds the [query rows, tokens] score block's memory.
_SCAN_TOKENS = 1 << 16
_NPROBE = 8  # residual codec: centroids probed per query row
_QUERY_GROUP = 16  # residual codec: queries whose candidates are found together
_BLOCK_ROWS = 128  # the GPU's candidate stages take queries in blocks of at most this many rows
_GRAPHS = 8  # CUDA: captured candidate searches kept per index
# ... and only searches that decode at most this many candidate rows (a graph keeps its buffers: ~100 MB at this
# size; larger groups are bound by the GPU's work, not by launches)
_GRAPH_ROWS = 1 << 17
_MERGE_FACTOR = 4  # automatic compaction: this many trailing segments of one size tier are merged into one
_MERGE_MIN_TOKENS = 4096  # segments smaller than this share the lowest tier
_BF16_ENV = "TOKENPOOL_INDEX_BF16"
RESIDUAL_TRAIN_TOKENS = 1 << 14  # a residual codec trained on fewer tokens warns (the server refuses it)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_durably(path: Path, write) -> None:
    """Write `path` through a temporary file: write(tmp_path), fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _as_matrix(vectors, dim: int, index: int, what: str = "vectors", item: str = "a document") -> np.ndarray:
    """One document's (or query's) `[n, dim]` float32 matrix from a numpy array, a torch tensor or nested lists."""
    if hasattr(vectors, "detach"):  # torch
        vectors = vectors.detach().to("cpu").float().numpy()
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}[{index}] is not an [n, {dim}] array of numbers ({e}).") from None
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"{what}[{index}] has shape {tuple(matrix.shape)}; expected [n, {dim}].")
    if matrix.shape[0] == 0:
        raise ValueError(f"{what}[{index}] has no rows: {item} needs at least one vector.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what}[{index}] holds NaN or infinite values.")
    return matrix


def check_codec(index: "MultiVectorIndex", codec: str | None, nbits: int | None, codec_flag: str = "codec",
                nbits_flag: str = "nbits") -> None:
    """An existing index asked for with a codec (or nbits) it does not have: a ValueError naming both (the
    options only apply to a new index)."""
    if codec is not None and codec != index.codec:
        raise ValueError(f"{index.path} holds a {index.codec} index; {codec_flag} {codec} applies to a new index "
                         f"only (leave it out, or choose a new folder).")
    have = index._manifest.get("nbits")
    if nbits is not None and index.codec == "residual" and nbits != have:
        raise ValueError(f"{index.path} holds a residual index of nbits={have}; {nbits_flag} {nbits} applies to a "
                         f"new index only (leave it out, or choose a new folder).")


def _matrix_list(values, dim: int, what: str, item: str) -> list:
    """A list of `[n, dim]` matrices; one bare matrix (2-D) is an error that says to wrap it in a list."""
    if getattr(values, "ndim", None) == 2:
        raise ValueError(f"{what} must be a list of [n, {dim}] matrices, one per {item.split()[-1]}; got one "
                         f"matrix of shape {tuple(values.shape)} (pass [matrix] for one).")
    return list(values)


_MAX_INT_ID = (1 << 63) - 1  # ids are also written as JSON and served over HTTP: a signed 64-bit range


def _check_id(value, index: int, new: bool = True):
    """An id as `add` takes it (`new`), or as `delete` does: of an id type only (an index written before the
    range rule may hold others)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"ids[{index}] must be an int or a str, got {type(value).__name__} {value!r}.")
    if not new:
        return value
    if isinstance(value, int) and not 0 <= value <= _MAX_INT_ID:
        raise ValueError(f"ids[{index}] = {value}: an int id must be in 0..2**63 - 1.")
    if isinstance(value, str) and not value:
        raise ValueError(f"ids[{index}] is an empty string: a str id needs at least one character.")
    return value


def check_ids(ids, new: bool = True) -> list:
    """`ids` as a list of checked ids; a bare str or int (whose characters would be taken as ids) is an error."""
    if isinstance(ids, (str, bytes, int)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"ids must be a list of ids (int or str), got {type(ids).__name__} {ids!r} "
                         f"(pass [{ids!r}] for one id).")
    if isinstance(ids, (set, frozenset, dict)):  # no order: which id would get which document?
        raise ValueError(f"ids must be a sequence in the documents' order (a list or tuple), got a "
                         f"{type(ids).__name__}.")
    return [_check_id(i, k, new) for k, i in enumerate(ids)]


@dataclass
class _Segment:
    name: str
    codes: np.ndarray  # [tokens, dim] (residual: [tokens, code bytes]), memory-mapped
    scales: np.ndarray | None  # [tokens] for int8
    dim_scales: np.ndarray | None  # [dim] for int8: the index's per-dimension scales
    ids: list
    offsets: np.ndarray  # [docs + 1] token offsets
    metadata: list | None
    deleted: np.ndarray  # bool [docs]
    residual: "_Residual | None" = None
    cache: dict = dataclasses.field(default_factory=dict)  # max_norm, per-device copies (shared by replaced segments)

    def max_norm(self) -> float:
        """The largest norm of a stored (decoded) row, computed once (a pass over the segment); for a merged
        segment, the largest of its sources' (an upper bound: the bf16 scan's rescoring bound stays safe)."""
        if "max_norm" not in self.cache:
            best, tokens = 0.0, len(self.codes)
            for start in range(0, tokens, _SCAN_TOKENS):
                block = self.decode(start, min(start + _SCAN_TOKENS, tokens))
                best = max(best, float(np.sqrt(np.einsum("ij,ij->i", block, block).max())))
            self.cache["max_norm"] = best
        return self.cache["max_norm"]

    def device_arrays(self, device: torch.device) -> dict:
        """The segment's codes, scales, offsets (and residual centroid ids) as tensors on `device`, copied once."""
        if device not in self.cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                arrays = {"codes": torch.from_numpy(np.asarray(self.codes)).to(device),
                          "offsets": torch.from_numpy(self.offsets).to(device)}
                if self.scales is not None:
                    arrays["scales"] = torch.from_numpy(self.scales).to(device)
                    arrays["dim_scales"] = torch.from_numpy(self.dim_scales).to(device)
                if self.residual is not None:
                    arrays["cids"] = torch.from_numpy(np.asarray(self.residual.cids).astype(np.int32)).to(device)
            self.cache[device] = arrays
        return self.cache[device]

    def ivf_arrays(self, device: torch.device) -> dict:
        """A residual segment's inverted lists ("ivf", "ivf_ptr") and deleted mask ("deleted") as tensors on
        `device` (the lists copied once; the mask again only when this version's deletions differ)."""
        key = ("ivf", device)
        if key not in self.cache:
            with warnings.catch_warnings():  # a read-only memory map: torch only reads it
                warnings.simplefilter("ignore", UserWarning)
                self.cache[key] = {"ivf": torch.from_numpy(np.asarray(self.residual.ivf)).to(device),
                                   "ivf_ptr": torch.from_numpy(self.residual.ivf_ptr.astype(np.int64)).to(device)}
        held = self.cache.get(("deleted", device))
        if held is None or held[0] is not self.deleted:  # the cache is shared with this segment's other versions
            held = self.cache[("deleted", device)] = (self.deleted, torch.from_numpy(self.deleted).to(device))
        return {**self.cache[key], "deleted": held[1]}

    def decode_torch(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop as a float32 torch tensor (a view for float32 codes, else a converted copy)."""
        with warnings.catch_warnings():  # a read-only memory map: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            if self.residual is not None:
                return self.residual.codec.decode(np.asarray(self.residual.cids[start:stop]),
                                                  torch.from_numpy(np.asarray(self.codes[start:stop])))
            block = torch.from_numpy(np.asarray(self.codes[start:stop])).float()
        if self.scales is not None:
            block = block * torch.from_numpy(self.scales[start:stop])[:, None]
            block *= torch.from_numpy(self.dim_scales)[None, :]
        return block

    def decode(self, start: int, stop: int) -> np.ndarray:
        if self.residual is not None:
            return self.decode_torch(start, stop).numpy()
        block = np.asarray(self.codes[start:stop], dtype=np.float32)
        if self.scales is not None:
            block *= self.scales[start:stop, None]
            block *= self.dim_scales[None, :]
        return block


@dataclass
class _Residual:
    """A residual segment's centroid ids and inverted lists (which documents have a token in each centroid)."""

    codec: ResidualCodec
    cids: np.ndarray  # [tokens], memory-mapped
    ivf: np.ndarray  # document positions grouped by centroid
    ivf_ptr: np.ndarray  # [centroids + 1]

    @staticmethod
    def inverted_lists(cids: np.ndarray, offsets: np.ndarray, centroids: int) -> tuple[np.ndarray, np.ndarray]:
        doc = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
        pairs = np.unique(cids.astype(np.int64) * (len(offsets) - 1) + doc)  # sorted by centroid, then doc
        ivf = (pairs % (len(offsets) - 1)).astype(np.int32)
        ptr = np.searchsorted(pairs // (len(offsets) - 1), np.arange(centroids + 1))
        return ivf, ptr.astype(np.int64)


def _token_runs(offsets: np.ndarray, docs: np.ndarray, max_rows: int = 1 << 20):
    """The token row ranges [lo, hi) of documents `docs` (sorted positions), consecutive documents joined,
    each range at most ~max_rows long (one copy each when compacting)."""
    if len(docs) == 0:
        return
    starts, stops = offsets[docs], offsets[docs + 1]
    breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1  # a deleted document in between
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(docs)]):
        lo, end = int(starts[a]), int(stops[b - 1])
        while lo < end:
            hi = min(end, lo + max_rows)
            yield lo, hi
            lo = hi


def _doc_bases(segments: list[_Segment]) -> np.ndarray:
    """Each segment's first position in the segments' documents laid end to end, and the total, `[segments + 1]`."""
    bases = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum([len(seg.ids) for seg in segments], out=bases[1:])
    return bases


def _probe(queries: torch.Tensor, centroids: torch.Tensor, q_offsets: np.ndarray, nprobe: int,
           owners: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage A's start: the stacked queries' centroid scores `[rows, centroids]` and, per query row, its `nprobe`
    best centroids as (query, centroid) keys query * centroids + centroid (repeats allowed: marking a document
    twice is harmless), built on the device without a host copy or a sort (each a sync point on the GPU).
    `owners` (blocks of rows, `_row_blocks`): key b is block b's, with the centroids of every row of its query,
    so that all blocks of a query probe the same documents."""
    n_centroids = len(centroids)
    scores = queries @ centroids.T
    probe = scores.topk(min(nprobe, n_centroids), dim=1).indices
    spans = range(len(q_offsets) - 1) if owners is None else owners.tolist()
    keys = torch.cat([(probe[q_offsets[q]:q_offsets[q + 1]] + b * n_centroids).flatten()
                      for b, q in enumerate(spans)])
    return scores, keys


def _device_ints(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Small host integers as an int64 tensor on `device` by fills (a copy from pageable host memory would be a
    sync point, and is refused while a CUDA graph is captured)."""
    return torch.cat([torch.full((1,), int(v), dtype=torch.int64, device=device) for v in values])


def _row_blocks(q_offsets: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's rows cut into blocks of at most `rows` -> (the blocks as offsets into the stacked rows, per
    block its query). MaxSim sums over a query's rows, so a query's score is the sum of its blocks'."""
    starts, owners = [], []
    for q in range(len(q_offsets) - 1):
        lo, hi = int(q_offsets[q]), int(q_offsets[q + 1])
        for start in range(lo, max(hi, lo + 1), rows):
            starts.append(start)
            owners.append(q)
    return np.array(starts + [int(q_offsets[-1])], dtype=np.int64), np.array(owners, dtype=np.int64)


def _kernel_table(segments: list[_Segment]) -> list[tuple]:
    """The segments as the CPU MaxSim kernel takes them (`maxsim_segments`): (codes, offsets, row scales)."""
    return [(seg.codes, seg.offsets, seg.scales) for seg in segments]


def _longest(seg: _Segment) -> int:
    """The segment's longest document, in tokens (computed once)."""
    if "longest" not in seg.cache:
        seg.cache["longest"] = int(np.diff(seg.offsets).max())
    return seg.cache["longest"]


def _probed_pairs(seg: "_Segment", pair_key: torch.Tensor, n_queries: int, n_centroids: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage A for one segment: the (query, document) pairs, grouped by query, of the live documents with a
    token in a centroid the query probes (`pair_key`: query * n_centroids + centroid; repeats allowed)."""
    arrays = seg.ivf_arrays(device)
    ivf, ptr = arrays["ivf"], arrays["ivf_ptr"]
    centroids = pair_key % n_centroids
    positions, which = expand_ranges(ptr[centroids], ptr[centroids + 1] - ptr[centroids])
    docs = ivf[positions]
    hit = torch.zeros(n_queries, len(seg.ids), dtype=torch.bool, device=device)
    hit[pair_key[which] // n_centroids, docs.long()] = True
    hit &= ~arrays["deleted"]
    pair_q, pair_doc = hit.nonzero(as_tuple=True)
    return pair_q, pair_doc


class _SearchGraphs:
    """CUDA graphs of `_dense_group` (the residual codec's candidate search, fixed shapes, no host sync), one per
    (query row offsets, k, candidates, nprobe) seen twice, for the index version they were captured on: a
    search of one query is ~90 kernel launches (~1.7 ms of host time on an H200's host), replayed as one.
    Only for groups that decode at most `_GRAPH_ROWS` rows (one or a few queries: where launches dominate).
    At most `_GRAPHS` kept (least recently used dropped); all dropped when the version changes (a graph holds
    its segments' GPU arrays). Replays are serialized (a graph's input and output buffers are shared)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.version = None
        self.entries: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.failed: set = set()  # keys whose capture raised (this version)

    def run(self, segments: list, key: tuple, stacked: np.ndarray, build: Callable) -> np.ndarray | None:
        """`build(queries)`'s output for the queries `stacked`, through the graph of `key` (captured now if
        `key` was seen before), copied to the host; None the first time a key is seen (run it eagerly)."""
        with self.lock:
            if self.version is not segments:
                self.entries.clear()
                self.seen.clear()
                self.failed.clear()
                self.version = segments
            entry = self.entries.get(key)
            if entry is None:
                if key in self.failed:
                    return None
                if key not in self.seen:
                    if len(self.seen) >= 1024:
                        self.seen.clear()
                    self.seen.add(key)
                    return None
                try:
                    entry = self.entries[key] = self._capture(stacked, build)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # run eagerly from now on
                    warnings.warn(f"tokenpool index: a search could not be captured as a CUDA graph ({exc}); "
                                  "searches of this shape run without one.", RuntimeWarning, stacklevel=4)
                    self.seen.discard(key)
                    self.failed.add(key)
                    return None
                while len(self.entries) > _GRAPHS:
                    self.entries.popitem(last=False)
            self.entries.move_to_end(key)
            graph, queries, out, _ = entry
            queries.copy_(torch.from_numpy(stacked))
            graph.replay()
            return out.cpu().numpy()

    @staticmethod
    def _capture(stacked: np.ndarray, build: Callable) -> tuple:
        queries = torch.from_numpy(stacked).to(build.args[1].centroids.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream (kernels compiled, cached arrays copied)
            build(queries)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = build(queries)
        # the GPU arrays the graph reads, held with it: a later version's search replaces a segment's cached
        # deleted mask (the cache is shared between a segment's versions) while a search of this version may
        # still be in flight
        device = queries.device
        held = [(seg.device_arrays(device), seg.ivf_arrays(device)) for seg in build.args[0]]
        return graph, queries, out, held


class MultiVectorIndex:
    """Token matrices under stable external ids, searched by exact MaxSim. See the module doc.

    Thread-safe: writers take a lock; a search works on the segments and deletions of one committed
    version, so it sees each add entirely or not at all.
    """

    def __init__(self, path: Path, manifest: dict, segments: list[_Segment], residual: ResidualCodec | None = None,
                 device: str | torch.device = "cpu"):
        self.path = path
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but this PyTorch has no CUDA device; use device='cpu'.")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}.")
        self.dim: int = manifest["dim"]
        self.codec: str = manifest["codec"]
        self._residual = residual  # the residual codec, once trained
        self._manifest = manifest
        # (segments, id -> (segment index, document position)) of the committed version, replaced as one
        # object so that a reader never pairs one version's positions with another's segments (a merge moves
        # documents between segments)
        self._state: tuple[list[_Segment], dict] = (segments, self._locations(segments))
        self._lock = threading.Lock()
        self._graphs = _SearchGraphs() if self.device.type == "cuda" else None
        # After an add, merge trailing runs of same-tier segments (see `compact`); off: adds never rewrite data.
        self.auto_compact = True

    @property
    def _segments(self) -> list[_Segment]:
        return self._state[0]

    @property
    def _where(self) -> dict:
        return self._state[1]

    @staticmethod
    def _locations(segments: list[_Segment]) -> dict:
        where = {}
        for s, seg in enumerate(segments):
            for d in np.flatnonzero(~seg.deleted).tolist():
                where[seg.ids[d]] = (s, d)
        return where

    # ----- create / open -----
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, *, codec: str = "float16", nbits: int = 2,
               num_centroids: int | None = None, device: str | torch.device = "cpu") -> "MultiVectorIndex":
        """A new, empty index in the folder `path` (which must not hold an index yet).

        codec: "float32", "float16", "int8" (exact search) or "residual" (compressed: `nbits` 1, 2 or 4 bits per
        dimension on average plus a centroid id per token; the codec is trained on a sample of the first
        `add`'s vectors, with `num_centroids` centroids, default 2^floor(log2(32 sqrt(tokens))), so make the
        first add representative of the corpus)."""
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}.")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}.")
        if codec == "residual" and nbits not in NBITS:
            raise ValueError(f"nbits must be one of {', '.join(map(str, NBITS))}, got {nbits!r}.")
        if num_centroids is not None and (not isinstance(num_centroids, int) or not 1 <= num_centroids <= 1 << 20):
            raise ValueError(f"num_centroids must be an int in 1..{1 << 20}, got {num_centroids!r}.")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file, not a folder: an index is a folder.")
        if (root / _MANIFEST).exists():
            raise ValueError(f"{root} already holds an index; open it with MultiVectorIndex.open.")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": _FORMAT, "dim": dim, "codec": codec, "version": 0, "next_segment": 1, "segments": [],
                    "dim_scales": None}
        if codec == "residual":
            manifest.update(nbits=nbits, num_centroids=num_centroids, codec_file=None)
        _write_durably(root / _MANIFEST, lambda p: p.write_text(json.dumps(manifest)))
        return cls(root, manifest, [], device=device)

    @classmethod
    def open(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MultiVectorIndex":
        """Open an index (memory-mapped: nothing is read into RAM but ids and offsets). Files of an interrupted
        write, not referenced by the manifest, are deleted.

        device="cuda": each segment's codes are copied to the GPU (once, at its first search) and scored there
        by a fused Triton MaxSim kernel (tokenpool/index/cuda_maxsim.py: no score matrix in GPU memory); the
        residual codec decodes on the GPU."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file, not an index (an index is a folder).")
        try:
            manifest = json.loads((root / _MANIFEST).read_text())
        except FileNotFoundError:
            raise ValueError(f"{root} holds no index (no {_MANIFEST}); create one with MultiVectorIndex.create.") \
                from None
        except (ValueError, UnicodeDecodeError) as e:  # not JSON
            raise ValueError(f"{root / _MANIFEST} is not a tokenpool multi-vector index ({e}).") from None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError(f"{root / _MANIFEST} is not a tokenpool multi-vector index.")
        dim_scales = manifest.get("dim_scales")
        dim_scales = None if dim_scales is None else np.asarray(dim_scales, dtype=np.float32)
        residual = ResidualCodec.load(root / manifest["codec_file"]) if manifest.get("codec_file") else None
        segments = [cls._load_segment(root, entry, dim_scales, residual) for entry in manifest["segments"]]
        referenced = {_MANIFEST, manifest.get("codec_file")}
        for entry in manifest["segments"]:
            referenced |= {f"{entry['name']}.{suffix}" for suffix in _SEGMENT_FILES}
            if entry.get("deleted"):
                referenced.add(entry["deleted"])
        for f in root.iterdir():
            if f.is_file() and f.name not in referenced and (f.name.startswith(("seg-", "codec")) or
                                                             f.name.endswith(".tmp")):
                f.unlink()  # left by a write that never committed
        return cls(root, manifest, segments, residual, device)

    @staticmethod
    def _load_segment(root: Path, entry: dict, dim_scales: np.ndarray | None,
                      codec: ResidualCodec | None = None) -> _Segment:
        name = entry["name"]
        docs = json.loads((root / f"{name}.docs.json").read_text())
        codes = np.load(root / f"{name}.codes.npy", mmap_mode="r")
        scales_file = root / f"{name}.scales.npy"
        scales = np.load(scales_file) if scales_file.exists() else None
        deleted = np.zeros(len(docs["ids"]), dtype=bool)
        if entry.get("deleted"):
            deleted[np.load(root / entry["deleted"])] = True
        residual = None
        if codec is not None:
            residual = _Residual(codec, np.load(root / f"{name}.cids.npy", mmap_mode="r"),
                                 np.load(root / f"{name}.ivf.npy", mmap_mode="r"), np.load(root / f"{name}.ivfptr.npy"))
        return _Segment(name, codes, scales, dim_scales, docs["ids"], np.asarray(docs["offsets"], dtype=np.int64),
                        docs.get("metadata"), deleted, residual)

    # ----- reads -----
    @property
    def untrained(self) -> bool:
        """A residual index whose codec is not trained yet: its next add trains it on that add's tokens."""
        return self.codec == "residual" and self._residual is None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, doc_id) -> bool:
        return doc_id in self._where

    def get(self, doc_id) -> np.ndarray:
        """The stored matrix of `doc_id`, decoded to float32 `[n, dim]`."""
        seg, d = self._locate(doc_id)
        return np.array(seg.decode(int(seg.offsets[d]), int(seg.offsets[d + 1])))  # a copy, writable

    def metadata(self, doc_id):
        seg, d = self._locate(doc_id)
        return None if seg.metadata is None else seg.metadata[d]

    def _locate(self, doc_id) -> tuple[_Segment, int]:
        segments, where = self._state  # one version
        try:
            s, d = where[doc_id]
        except (KeyError, TypeError):
            raise KeyError(f"No document with id {doc_id!r} in the index.") from None
        return segments[s], d

    def stats(self) -> dict:
        segments, where = self._state
        tokens = sum(int(seg.offsets[-1] - seg.offsets[0]) for seg in segments)
        live_tokens = sum(int(seg.offsets[d + 1] - seg.offsets[d]) for s, d in where.values()
                          for seg in (segments[s],))
        bytes_on_disk = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        if self.codec == "residual":
            per_token = self._residual.bytes_per_token if self._residual is not None else \
                (self._manifest["nbits"] * self.dim + 7) // 8 + 2
        else:
            per_token = {"float32": 4 * self.dim, "float16": 2 * self.dim, "int8": self.dim + 4}[self.codec]
        extra = {}
        if self.codec == "residual":
            extra = {"nbits": self._manifest["nbits"],
                     "centroids": None if self._residual is None else len(self._residual.centroids)}
        return {**extra, "documents": len(where), "tokens": live_tokens, "stored_tokens": tokens, "dim": self.dim,
                "codec": self.codec, "bytes_per_token": per_token, "bytes_on_disk": bytes_on_disk,
                "segments": len(segments)}

    # ----- writes -----
    def add(self, ids: Sequence, vectors: Sequence, metadata: Sequence | None = None) -> None:
        """Add documents (an id already in the index is replaced: upsert). All or nothing, durable on return.
        Ids: ints in 0..2**63 - 1 or non-empty strs. A new residual index trains its codec on its first add: give
        that add a representative sample (`RESIDUAL_TRAIN_TOKENS` tokens or more; fewer trains a poor codec and
        warns)."""
        ids = check_ids(ids)
        vectors = _matrix_list(vectors, self.dim, "vectors", "a document")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} vector matrices.")
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata entries.")
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata must be JSON-serializable (no NaN or infinity): {e}") from None
        if len(set(ids)) != len(ids):
            raise ValueError("ids repeat within one add call.")
        if not ids:
            return
        matrices = [_as_matrix(v, self.dim, k) for k, v in enumerate(vectors)]
        with self._lock:
            manifest = json.loads(json.dumps(self._manifest))  # the next version, committed below
            name = f"seg-{manifest['next_segment']:06d}"
            manifest["next_segment"] += 1
            manifest["version"] += 1
            flat = np.concatenate(matrices)
            offsets = np.zeros(len(matrices) + 1, dtype=np.int64)
            np.cumsum([m.shape[0] for m in matrices], out=offsets[1:])
            if self.codec == "int8" and manifest.get("dim_scales") is None:
                # per-dimension scales, fixed by the first add (token embeddings have a few dimensions of much
                # larger magnitude: one scale per row alone would quantize all the others coarsely)
                rms = np.sqrt(np.mean(flat.astype(np.float64) ** 2, axis=0))
                manifest["dim_scales"] = np.maximum(rms, rms.max() * 1e-3 + 1e-12).astype(np.float32).tolist()
            dim_scales = None if manifest.get("dim_scales") is None else np.asarray(manifest["dim_scales"], np.float32)
            root = self.path
            residual = self._residual
            if self.codec == "residual" and residual is None:
                if len(flat) < RESIDUAL_TRAIN_TOKENS:
                    warnings.warn(f"The residual codec of {self.path} is trained on this first add's {len(flat)} "
                                  f"tokens, fewer than {RESIDUAL_TRAIN_TOKENS:,}: its centroids and levels fit only "
                                  f"these documents, and later ones are coded poorly. Give the first add a "
                                  f"representative sample.", UserWarning, stacklevel=2)
                started = time.perf_counter()
                logger.info("%s: training the residual codec on the first add's %d tokens (%d centroids; once per "
                            "index)", self.path, len(flat), manifest.get("num_centroids") or
                            default_num_centroids(len(flat)))
                residual = ResidualCodec.train(flat, manifest["nbits"], manifest.get("num_centroids"),
                                               device=self.device)
                logger.info("%s: residual codec trained in %.1f s", self.path, time.perf_counter() - started)
                manifest["codec_file"] = f"codec-{manifest['version']}.npz"
                residual.save(root / manifest["codec_file"])
                _fsync_file(root / manifest["codec_file"])
            files = {"codes.npy": None, "docs.json": None}
            if residual is not None:
                cids, codes = residual.encode(flat, self.device)
                files["cids.npy"] = cids
                files["ivf.npy"], files["ivfptr.npy"] = _Residual.inverted_lists(cids, offsets, len(residual.centroids))
            else:
                codes, files["scales.npy"] = self._encode(flat, dim_scales)
            files["codes.npy"] = codes
            for suffix, array in files.items():
                if array is not None:
                    np.save(root / f"{name}.{suffix}", array)
            (root / f"{name}.docs.json").write_text(json.dumps({"ids": ids, "offsets": offsets.tolist(),
                                                                "metadata": metadata}))
            for suffix, array in files.items():
                if array is not None or suffix == "docs.json":
                    _fsync_file(root / f"{name}.{suffix}")
            replaced = {doc_id: self._where[doc_id] for doc_id in ids if doc_id in self._where}
            deletions = self._deletions(manifest, replaced.values())
            manifest["segments"].append({"name": name, "docs": len(ids), "tokens": int(offsets[-1]), "deleted": None})
            self._commit(manifest)
            self._residual = residual
            segment = self._load_segment(root, manifest["segments"][-1], dim_scales, residual)
            if self._bf16_prefilter(residual):
                segment.max_norm()  # here, while the rows are in the page cache, not in the next search
            self._apply(manifest, deletions, new_segment=segment)
            if self.auto_compact:
                self._merge_tail()

    def delete(self, ids: Sequence) -> int:
        """Remove documents; an unknown id is a ValueError and nothing of the call is applied. Durable on return.
        Returns how many documents were removed (an id given twice counts once)."""
        ids = list(dict.fromkeys(check_ids(ids, new=False)))
        with self._lock:
            unknown = [i for i in ids if i not in self._where]
            if unknown:
                raise ValueError(f"Unknown id(s) {unknown[:5]!r}{'...' if len(unknown) > 5 else ''}: nothing deleted.")
            if not ids:
                return 0
            manifest = json.loads(json.dumps(self._manifest))
            manifest["version"] += 1
            deletions = self._deletions(manifest, [self._where[i] for i in ids])
            self._commit(manifest)
            self._apply(manifest, deletions)
        return len(ids)

    def compact(self, progress: Callable[[int], None] | None = None) -> dict:
        """Rewrite every segment's live documents into one segment (deleted and replaced documents' tokens are
        dropped from disk); returns `stats()`. Durable and all-or-nothing like `add`; searches in flight keep
        reading the old segments. Adds merge small segments automatically (`auto_compact`), so this is for
        reclaiming the space of deletions, or for one segment before a benchmark. `progress(n)` is called as
        each run of n token rows is copied (`stats()["tokens"]` rows in all)."""
        with self._lock:
            if len(self._segments) > 1 or any(seg.deleted.any() for seg in self._segments):
                self._merge(0, len(self._segments), progress)
        return self.stats()

    @staticmethod
    def _tier(seg: _Segment) -> int:
        """A segment's size tier: live tokens in powers of _MERGE_FACTOR above _MERGE_MIN_TOKENS."""
        live = np.diff(seg.offsets)[~seg.deleted].sum()
        return int(np.log(max(live, 1) / _MERGE_MIN_TOKENS) // np.log(_MERGE_FACTOR)) if live > _MERGE_MIN_TOKENS else 0

    def _merge_tail(self) -> None:
        """Log-structured merging (the caller holds the lock): while the last _MERGE_FACTOR segments share a
        tier, merge them. Each token is rewritten about once per tier it climbs (log of the index size), and an
        index holds at most _MERGE_FACTOR - 1 segments per tier plus one, however small its adds."""
        while len(self._segments) >= _MERGE_FACTOR:
            tail = self._segments[-_MERGE_FACTOR:]
            if len({self._tier(seg) for seg in tail}) != 1:
                return
            self._merge(len(self._segments) - _MERGE_FACTOR, len(self._segments))

    def _merge(self, first: int, stop: int, progress: Callable[[int], None] | None = None) -> None:
        """Replace segments first..stop-1 by one segment of their live documents, in order (lock held)."""
        root, old = self.path, self._segments[first:stop]
        manifest = json.loads(json.dumps(self._manifest))
        manifest["version"] += 1
        keep = [np.flatnonzero(~seg.deleted) for seg in old]
        lengths = [np.diff(seg.offsets)[k] for seg, k in zip(old, keep)]
        docs, tokens = sum(map(len, keep)), int(sum(int(n.sum()) for n in lengths))
        entries = []
        if docs:
            name = f"seg-{manifest['next_segment']:06d}"
            manifest["next_segment"] += 1
            offsets = np.zeros(docs + 1, dtype=np.int64)
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
            ids = [seg.ids[d] for seg, k in zip(old, keep) for d in k.tolist()]
            metadata = None
            if any(seg.metadata is not None for seg in old):
                metadata = [None if seg.metadata is None else seg.metadata[d] for seg, k in zip(old, keep)
                            for d in k.tolist()]
            arrays = {"codes.npy": [seg.codes for seg in old]}
            if old[0].scales is not None:
                arrays["scales.npy"] = [seg.scales for seg in old]
            if old[0].residual is not None:
                arrays["cids.npy"] = [seg.residual.cids for seg in old]
            cids = None
            for suffix, sources in arrays.items():
                target = np.lib.format.open_memmap(root / f"{name}.{suffix}", mode="w+", dtype=sources[0].dtype,
                                                   shape=(tokens, *sources[0].shape[1:]))
                at = 0
                for seg, source, k in zip(old, sources, keep):
                    for lo, hi in _token_runs(seg.offsets, k):
                        target[at:at + hi - lo] = source[lo:hi]
                        at += hi - lo
                        if progress is not None and suffix == "codes.npy":
                            progress(hi - lo)
                target.flush()
                if suffix == "cids.npy":
                    cids = np.array(target)
                del target
            if cids is not None:
                arrays["ivf.npy"], arrays["ivfptr.npy"] = _Residual.inverted_lists(
                    cids, offsets, len(self._residual.centroids))
                np.save(root / f"{name}.ivf.npy", arrays["ivf.npy"])
                np.save(root / f"{name}.ivfptr.npy", arrays["ivfptr.npy"])
            (root / f"{name}.docs.json").write_text(json.dumps({"ids": ids, "offsets": offsets.tolist(),
                                                                "metadata": metadata}))
            for suffix in [*arrays, "docs.json"]:
                _fsync_file(root / f"{name}.{suffix}")
            entries = [{"name": name, "docs": docs, "tokens": tokens, "deleted": None}]
        replaced = manifest["segments"][first:stop]
        manifest["segments"][first:stop] = entries
        self._commit(manifest)
        dim_scales = None if manifest.get("dim_scales") is None else np.asarray(manifest["dim_scales"], np.float32)
        new = [self._load_segment(root, entry, dim_scales, self._residual) for entry in entries]
        if new and all("max_norm" in seg.cache for seg in old):
            new[0].cache["max_norm"] = max(seg.cache["max_norm"] for seg in old)
        segments = self._segments[:first] + new + self._segments[stop:]
        self._state, self._manifest = (segments, self._locations(segments)), manifest
        for entry in replaced:  # no longer referenced: searches in flight keep their memory maps open
            for suffix in _SEGMENT_FILES:
                (root / f"{entry['name']}.{suffix}").unlink(missing_ok=True)
            if entry.get("deleted"):
                (root / entry["deleted"]).unlink(missing_ok=True)

    def _encode(self, flat: np.ndarray, dim_scales: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if self.codec == "float32":
            return flat, None
        if self.codec == "float16":
            return flat.astype(np.float16), None
        y = flat / dim_scales[None, :]
        scales = np.abs(y).max(axis=1) / 127.0  # per row: x = code * scale * dim_scale
        scales[scales == 0] = 1.0
        return np.clip(np.rint(y / scales[:, None]), -127, 127).astype(np.int8), scales.astype(np.float32)

    def _deletions(self, manifest: dict, where) -> dict[int, np.ndarray]:
        """Write the new deletion files of the segments that lose documents (not yet committed)."""
        by_segment: dict[int, list[int]] = {}
        for s, d in where:
            by_segment.setdefault(s, []).append(d)
        result = {}
        for s, positions in by_segment.items():
            seg = self._segments[s]
            deleted = seg.deleted.copy()
            deleted[positions] = True
            name = f"{seg.name}.del-{manifest['version']}.npy"
            path = self.path / name
            np.save(path, np.flatnonzero(deleted))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            manifest["segments"][s]["deleted"] = name
            result[s] = deleted
        return result

    def _commit(self, manifest: dict) -> None:
        _write_durably(self.path / _MANIFEST, lambda p: p.write_text(json.dumps(manifest)))

    def _apply(self, manifest: dict, deletions: dict[int, np.ndarray], new_segment: _Segment | None = None) -> None:
        """The committed version in memory: new segment lists and id map (searches in flight keep the old)."""
        old_files = {self._manifest["segments"][s]["deleted"] for s in deletions}
        segments = list(self._segments)
        where = dict(self._where)
        for s, deleted in deletions.items():
            seg = segments[s]
            segments[s] = dataclasses.replace(seg, deleted=deleted)
            for d in np.flatnonzero(deleted & ~seg.deleted):
                where.pop(seg.ids[d], None)
        if new_segment is not None:
            segments.append(new_segment)
            for d, doc_id in enumerate(new_segment.ids):
                where[doc_id] = (len(segments) - 1, d)
        self._state, self._manifest = (segments, where), manifest
        for name in old_files - {None}:
            (self.path / name).unlink(missing_ok=True)

    # ----- search -----
    def search(self, queries: Sequence, k: int = 10, *, exact: bool | None = None, candidates: int | None = None,
               nprobe: int | None = None) -> list[list[tuple]]:
        """Per query (an `[m, dim]` matrix), the `k` best documents as (id, MaxSim score), best first.
        MaxSim = sum over query rows of the best dot product with the document's rows.

        Exact codecs score every document exactly. The residual codec, by default, generates candidates
        (PLAID's idea): each query row's `nprobe` nearest centroids (default 8) select the documents with a
        token in them; those are ranked by the centroids alone (MaxSim with each token replaced by its
        centroid) and the best `candidates` (default max(256, 16 k); at least k) are decoded and scored exactly.
        `exact=True` scores every document with its decoded vectors instead."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}.")
        for name, value in (("candidates", candidates), ("nprobe", nprobe)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        mats = [_as_matrix(q, self.dim, i, "queries", "a query")
                for i, q in enumerate(_matrix_list(queries, self.dim, "queries", "a query"))]
        if not mats:
            return []
        (segments, where), residual = self._state, self._residual  # one committed version
        live = len(where)
        if live == 0:
            return [[] for _ in mats]
        if residual is not None and not exact:
            width = max(candidates, k) if candidates else max(256, 16 * k)
            return self._search_candidates(segments, residual, mats, k, width, nprobe or _NPROBE, self.device,
                                           self._graphs)
        # every query at once: each block of stored tokens is decoded once per search, not once per query
        stacked = np.concatenate(mats)
        starts = np.zeros(len(mats), dtype=np.int64)
        np.cumsum([m.shape[0] for m in mats[:-1]], out=starts[1:])
        prefilter = self._bf16_prefilter(residual)
        if self.device.type == "cpu" and residual is None and (prefilter or _maxsim_kernel.available()):
            # the C kernel over every segment in one call (bf16 products on AMX tiles or with AVX512-BF16 when
            # prefilter: within a bound, rescored below; else fp32 products)
            pooled = _maxsim_kernel.maxsim_segments(
                stacked, starts, _kernel_table(segments), dim_scales=segments[0].dim_scales, bf16=prefilter,
                threads=torch.get_num_threads()).astype(np.float64)
            bases = _doc_bases(segments)
            all_scores = [pooled[:, bases[s]:bases[s + 1]] for s in range(len(segments))]
        elif self.device.type == "cuda":
            all_scores = [self._maxsim_segment_cuda(stacked, starts, seg) for seg in segments]
        else:
            all_scores = [self._maxsim_segment(stacked, starts, seg) for seg in segments]  # [queries, docs] each
        per_segment = []
        for seg, scores in zip(segments, all_scores):
            scores[:, seg.deleted] = -np.inf
            per_segment.append((seg, scores))
        if prefilter:
            table = _kernel_table(segments)
            return [self._rescore(per_segment, table, stacked, starts, qi, k, live) for qi in range(len(mats))]
        results = []
        for qi in range(len(mats)):
            ids, scores = [], []
            for seg, seg_scores in per_segment:
                row = seg_scores[qi]
                take = min(k, len(row))
                best = np.argpartition(-row, take - 1)[:take]
                ids += [seg.ids[i] for i in best if np.isfinite(row[i])]
                scores += [float(row[i]) for i in best if np.isfinite(row[i])]
            order = sorted(range(len(ids)), key=lambda i: -scores[i])[:min(k, live)]
            results.append([(ids[i], scores[i]) for i in order])
        return results

    def _bf16_prefilter(self, residual) -> bool:
        """Whether exact search scans in bf16 first (then rescores in fp32): CPU indexes of an exact codec whose dim
        is a multiple of 32, on CPUs with AMX or AVX512-BF16, where the fp32 scan is bound by arithmetic (32 FLOP
        per stored fp16 byte for a 32-row query), not by memory. TOKENPOOL_INDEX_BF16=0 turns it off."""
        return (self.device.type == "cpu" and residual is None and self.dim % 32 == 0
                and os.environ.get(_BF16_ENV, "1") != "0" and _maxsim_kernel.available(bf16=True))

    @staticmethod
    def _rescore(per_segment: list, table: list, stacked: np.ndarray, starts: np.ndarray, qi: int, k: int,
                 live: int) -> list:
        """Query qi's exact top k from bf16 scores, equal to the fp32 scan's. A bf16 dot product is within
        2^-8 (1 + 2^-7) |q| |x| of the exact one, so MaxSim's error is at most the sum of its rows' bounds, B.
        First the k best bf16 documents are rescored in fp32: the k-th best true score is at least T, the
        smallest of theirs. A document whose bf16 score is below T - B cannot reach T: every other document at
        or above it is rescored too, and the k best of all rescored ones are the answer. (The window is one
        bound wide, not two as around the k-th bf16 score: on random data ~7x fewer fp32 rescorings.)"""
        stop = starts[qi + 1] if qi + 1 < len(starts) else len(stacked)
        query = stacked[starts[qi]:stop]
        row_norms = float(np.linalg.norm(query.astype(np.float64), axis=1).sum())
        bound = 2.0 ** -8 * (1 + 2.0 ** -7) * row_norms * max(seg.max_norm() for seg, _ in per_segment) * 1.001
        segs = [seg for seg, _ in per_segment]
        pooled = np.concatenate([scores[qi] for _, scores in per_segment])  # every segment's documents in order
        finite = np.flatnonzero(np.isfinite(pooled))
        if not len(finite):
            return []
        take = min(k, len(finite))
        exact: dict[int, float] = {}  # pooled position -> fp32 MaxSim

        def rescore(positions: np.ndarray) -> None:  # one kernel call over the segments
            positions = np.sort(positions)
            got = _maxsim_kernel.maxsim_segments(query, np.zeros(1, dtype=np.int64), table,
                                                 dim_scales=segs[0].dim_scales, docs=positions,
                                                 threads=torch.get_num_threads())[0]
            exact.update(zip(positions.tolist(), got.astype(np.float64).tolist()))

        rescore(finite[np.argpartition(-pooled[finite], take - 1)[:take]])
        floor = min(exact.values()) - bound
        docs = np.flatnonzero(pooled >= floor)  # (-inf: deleted, never)
        rest = np.array([d for d in docs.tolist() if d not in exact], dtype=np.int64)
        if len(rest):
            rescore(rest)
        bases = _doc_bases(segs)
        owner = np.searchsorted(bases, docs, side="right") - 1
        ids = [segs[o].ids[d - bases[o]] for d, o in zip(docs.tolist(), owner.tolist())]
        scores = [exact[d] for d in docs.tolist()]
        order = sorted(range(len(ids)), key=lambda i: -scores[i])[:min(k, live)]
        return [(ids[i], scores[i]) for i in order]

    @staticmethod
    def _search_candidates(segments: list[_Segment], residual: ResidualCodec, mats: list[np.ndarray], k: int,
                           candidates: int, nprobe: int, device: torch.device,
                           graphs: "_SearchGraphs | None" = None) -> list[list[tuple]]:
        """Queries through the residual codec's candidates (see `search`), `_QUERY_GROUP` at a time, in three
        stages on `device`:
        A. per query, the documents with a token in one of its rows' `nprobe` best centroids (inverted lists);
        B. those ranked by MaxSim with each token replaced by its centroid (centroid ids only, no codes read);
        C. the best `candidates` of them decoded and scored exactly."""
        codec = residual.to(device)
        n_centroids = len(codec.centroids)
        results = []
        for g0 in range(0, len(mats), _QUERY_GROUP):
            group = mats[g0:g0 + _QUERY_GROUP]
            nq = len(group)
            q_offsets = np.zeros(nq + 1, dtype=np.int64)
            np.cumsum([m.shape[0] for m in group], out=q_offsets[1:])
            stacked = np.concatenate(group)
            if dense_kernels_ok(codec.centroids, _row_blocks(q_offsets, _BLOCK_ROWS)[0]):  # CUDA: fixed shapes,
                # replayed as a CUDA graph; queries over _BLOCK_ROWS rows in blocks
                run = functools.partial(MultiVectorIndex._dense_group, segments, codec, q_offsets, k, candidates,
                                        nprobe)
                rows = nq * min(candidates, int(_doc_bases(segments)[-1])) * max(map(_longest, segments))
                out = graphs.run(segments, (tuple(q_offsets), k, candidates, nprobe), stacked, run) \
                    if graphs is not None and device.type == "cuda" and rows <= _GRAPH_ROWS else None
                if out is None:
                    out = run(torch.from_numpy(stacked).to(device)).cpu().numpy()
                results += MultiVectorIndex._dense_hits(segments, out)
                continue
            queries = torch.from_numpy(stacked).to(device)
            scores, pair_key = _probe(queries, codec.centroids, q_offsets, nprobe)
            found = []  # (segment, pair queries, pair documents, centroid MaxSim)
            for s, seg in enumerate(segments):
                pair_q, pair_doc = _probed_pairs(seg, pair_key, nq, n_centroids, device)
                if len(pair_q):
                    if device.type == "cuda":
                        cids, offsets = seg.device_arrays(device)["cids"], seg.device_arrays(device)["offsets"]
                    else:  # the memory map: only the candidates' rows are read
                        cids, offsets = seg.residual.cids, torch.from_numpy(seg.offsets)
                    approx = centroid_maxsim_pairs(scores, q_offsets, cids, offsets, pair_q, pair_doc)
                    found.append((s, pair_q, pair_doc, approx))
            if not found:
                results += [[] for _ in group]
                continue
            # the best `candidates` pairs of each query: by score, then (stable) by query
            seg_of = torch.cat([torch.full_like(f[1], f[0]) for f in found])
            pair_q = torch.cat([f[1] for f in found])
            pair_doc = torch.cat([f[2] for f in found])
            approx = torch.cat([f[3] for f in found]).float()
            order = torch.argsort(approx, descending=True, stable=True)
            order = order[torch.argsort(pair_q[order], stable=True)]
            sorted_q = pair_q[order]
            first = torch.searchsorted(sorted_q, torch.arange(nq, device=device, dtype=sorted_q.dtype))
            rank = torch.arange(len(order), device=device) - first[sorted_q]
            keep = order[rank < candidates]
            per_query: list[list[tuple]] = [[] for _ in group]
            kept_segments = [found[0][0]] if len(found) == 1 else torch.unique(seg_of[keep]).tolist()
            for s in kept_segments:  # C, one segment at a time (`keep` is grouped by query, so is each part)
                mine = keep if len(found) == 1 else keep[seg_of[keep] == s]
                seg = segments[s]
                kq, kd = pair_q[mine], pair_doc[mine]
                offsets = seg.device_arrays(device)["offsets"] if device.type == "cuda" else \
                    torch.from_numpy(seg.offsets)
                lengths = offsets[kd + 1] - offsets[kd]
                rows, _ = expand_ranges(offsets[kd], lengths)
                t0 = torch.cumsum(lengths, 0) - lengths  # each pair's first row in `rows`
                if device.type == "cuda":
                    arrays = seg.device_arrays(device)
                    cids, codes = arrays["cids"].index_select(0, rows), arrays["codes"].index_select(0, rows)
                else:  # from the memory maps: only these rows are read
                    cids, codes = (torch.from_numpy(np.asarray(seg.residual.cids[rows.numpy()], dtype=np.int64)),
                                   torch.from_numpy(np.asarray(seg.codes[rows.numpy()])))
                vectors = codec.decode(cids, codes, device)
                exact = maxsim_pairs(queries, q_offsets, vectors, kq, t0, t0 + lengths)
                kq, kd, exact = torch.stack([kq.double(), kd.double(), exact.double()]).cpu().numpy()  # one copy
                for b, d, score in zip(kq.astype(np.int64).tolist(), kd.astype(np.int64).tolist(), exact.tolist()):
                    per_query[b].append((score, seg.ids[d]))
            for hits in per_query:
                hits.sort(key=lambda t: -t[0])
                results.append([(doc_id, score) for score, doc_id in hits[:k]])
        return results

    @staticmethod
    def _dense_group(segments: list[_Segment], codec: ResidualCodec, q_offsets: np.ndarray, k: int, candidates: int,
                     nprobe: int, queries: torch.Tensor) -> torch.Tensor:
        """`_search_candidates`' stages for one group of queries in fixed shapes: A and B fill a `[queries,
        documents of every segment]` table of centroid MaxSim (-inf where not probed or deleted:
        `centroid_maxsim_dense`); its `candidates` best per query are decoded once each, as `[candidates,
        longest document of any segment]` row blocks (each document's rows, its last row repeated), and scored
        exactly (`maxsim_pairs`' kernel, a pair's rows cut to its document); the best k of those come back. Where
        Triton runs (CUDA, or its interpreter); the CPU takes the pairs path, which reads only candidates' rows
        from the memory maps. Returns float64 `[2, queries, min(k, candidates)]`: the scores, best first (-inf:
        no hit), and the documents' positions in the segments laid end to end (`_dense_hits`). No host sync
        inside: a CUDA graph can capture it (`_SearchGraphs`)."""
        device = queries.device
        nq = len(q_offsets) - 1
        # queries over _BLOCK_ROWS rows (the kernels' limit) in blocks: every block of a query probes its whole
        # query's centroids, so their -inf cells agree and the sum over blocks is the query's centroid MaxSim
        blocks, owners = _row_blocks(q_offsets, _BLOCK_ROWS)
        split = len(owners) > nq
        scores, pair_key = _probe(queries, codec.centroids, q_offsets, nprobe, owners)
        bases = _doc_bases(segments)
        approx = torch.empty(len(owners), int(bases[-1]), dtype=torch.float32, device=device)
        for s, seg in enumerate(segments):
            arrays, ivf = seg.device_arrays(device), seg.ivf_arrays(device)
            centroid_maxsim_dense(scores, blocks, pair_key, ivf["ivf"], ivf["ivf_ptr"], arrays["cids"],
                                  arrays["offsets"], ivf["deleted"], approx[:, bases[s]:bases[s + 1]])
        if split:  # per query, its blocks summed in a fixed order (no atomics: the same sums every run)
            block0 = np.searchsorted(owners, np.arange(nq))
            count = np.bincount(owners, minlength=nq)
            approx = torch.stack([approx[f:f + c].sum(0) for f, c in zip(block0.tolist(), count.tolist())])
            # per level j, each query's j-th block (its last where it has fewer: masked out by `there`)
            level_block = [_device_ints(block0 + np.minimum(j, count - 1), device) for j in range(count.max())]
            level_there = [_device_ints(j < count, device).bool() for j in range(count.max())]
        width = min(candidates, int(bases[-1]))
        top, picked = approx.topk(width, dim=1)  # [queries, width]: -inf where fewer documents were probed
        exact = torch.full((nq * width,), float("-inf"), dtype=torch.float32, device=device)
        pair_q = torch.arange(nq * width, device=device) // width
        flat = picked.flatten()
        live = top.flatten() > float("-inf")
        longest = max(_longest(seg) for seg in segments)
        span = torch.arange(longest, device=device)
        # blocks of `chunk` pairs, so that the decoded rows stay bounded (2^19 rows of float32 up to 512 dims, at
        # most 1 GiB above); each pair's rows are gathered from the segment that holds its document (a select per
        # segment: the codes are small), then every pair is decoded and scored once
        chunk = max(1, ((1 << 19) * 512 // max(codec.dim, 512)) // longest)
        for c0 in range(0, nq * width, chunk):
            c1 = min(c0 + chunk, nq * width)
            doc, on = flat[c0:c1], live[c0:c1]
            lengths = torch.zeros(c1 - c0, dtype=torch.int64, device=device)
            cids = codes = None
            for s, seg in enumerate(segments):
                arrays = seg.device_arrays(device)
                offsets = arrays["offsets"]
                mine = on & (doc >= int(bases[s])) & (doc < int(bases[s + 1]))
                local = (doc - int(bases[s])).clamp_(0, len(seg.ids) - 1)
                t0, t1 = offsets[local], offsets[local + 1]
                rows = torch.minimum(t0[:, None] + span, t1[:, None] - 1).flatten()
                seg_cids, seg_codes = arrays["cids"].index_select(0, rows), arrays["codes"].index_select(0, rows)
                if cids is None:
                    cids, codes = seg_cids, seg_codes
                else:
                    take = mine.repeat_interleave(longest)
                    cids = torch.where(take, seg_cids, cids)
                    codes = torch.where(take[:, None], seg_codes, codes)
                lengths = torch.where(mine, t1 - t0, lengths)
            vectors = codec.decode(cids, codes, device)
            first = torch.arange(c1 - c0, device=device) * longest
            if not split:
                part = maxsim_pairs(queries, q_offsets, vectors, pair_q[c0:c1], first, first + lengths)
            else:  # each decoded candidate scored by every block of its query, the blocks' sums added
                part = torch.zeros(c1 - c0, dtype=torch.float32, device=device)
                for block, there in zip(level_block, level_there):
                    scored = maxsim_pairs(queries, blocks, vectors, block[pair_q[c0:c1]], first, first + lengths)
                    part = part + torch.where(there[pair_q[c0:c1]], scored, 0.0)
            exact[c0:c1] = torch.where(on, part, exact[c0:c1])
        best, where = exact.view(nq, width).topk(min(k, width), dim=1)
        return torch.stack([best.double(), picked.gather(1, where).double()])

    @staticmethod
    def _dense_hits(segments: list[_Segment], out: np.ndarray) -> list[list[tuple]]:
        """`_dense_group`'s output, copied to the host, as per query (id, score) lists."""
        best, docs = out
        bases = _doc_bases(segments)
        results = []
        for b in range(len(best)):
            hits = []
            for score, doc in zip(best[b].tolist(), docs[b].astype(np.int64).tolist()):
                if score == float("-inf"):
                    break
                s = int(np.searchsorted(bases, doc, side="right")) - 1
                hits.append((segments[s].ids[doc - int(bases[s])], score))
            results.append(hits)
        return results

    def _maxsim_segment_cuda(self, stacked: np.ndarray, starts: np.ndarray, seg: _Segment) -> np.ndarray:
        """`_maxsim_segment` on the GPU: the fused kernel over the segment's codes (residual: decoded blocks)."""
        from tokenpool.index.cuda_maxsim import maxsim_cuda

        arrays = seg.device_arrays(self.device)
        queries = torch.from_numpy(stacked).to(self.device)
        q_offsets = torch.from_numpy(np.append(starts, len(stacked)))
        if seg.residual is None:
            return maxsim_cuda(queries, q_offsets, arrays["codes"], arrays["offsets"], arrays.get("scales"),
                               arrays.get("dim_scales")).double().cpu().numpy()
        offsets, docs = seg.offsets, len(seg.offsets) - 1
        out = np.empty((len(starts), docs), dtype=np.float64)
        start_doc = 0
        while start_doc < docs:  # decoded in blocks of whole documents, scored as float16
            stop_doc = max(int(np.searchsorted(offsets, offsets[start_doc] + _SCAN_TOKENS * 16, side="right")) - 1,
                           start_doc + 1)
            t0, t1 = int(offsets[start_doc]), int(offsets[stop_doc])
            block = seg.residual.codec.decode(arrays["cids"][t0:t1], arrays["codes"][t0:t1], self.device)
            block_offsets = torch.from_numpy(offsets[start_doc:stop_doc + 1] - t0)
            out[:, start_doc:stop_doc] = maxsim_cuda(queries, q_offsets, block, block_offsets).double().cpu()
            start_doc = stop_doc
        return out

    def _maxsim_segment(self, stacked: np.ndarray, starts: np.ndarray, seg: _Segment) -> np.ndarray:
        """MaxSim of every query (rows `starts[i]`.. of `stacked`) against every document of `seg`: [queries, docs],
        in PyTorch over token blocks of whole documents, each decoded once (residual segments, and exact codecs
        where the C kernel is not built: `search` takes the kernel over all segments at once otherwise)."""
        offsets = seg.offsets
        docs = len(offsets) - 1
        out = np.empty((len(starts), docs), dtype=np.float64)
        queries_t = torch.from_numpy(stacked)
        start_doc = 0
        while start_doc < docs:
            stop_doc = int(np.searchsorted(offsets, offsets[start_doc] + _SCAN_TOKENS, side="right")) - 1
            stop_doc = max(stop_doc, start_doc + 1)
            t0, t1 = int(offsets[start_doc]), int(offsets[stop_doc])
            # torch: a multi-threaded fp16 -> fp32 conversion and product (numpy's conversion is single-threaded)
            scores = torch.mm(queries_t, seg.decode_torch(t0, t1).T).numpy()  # [all query rows, block tokens]
            best = np.maximum.reduceat(scores, offsets[start_doc:stop_doc] - t0, axis=1)  # [query rows, docs]
            out[:, start_doc:stop_doc] = np.add.reduceat(best.astype(np.float64), starts, axis=0)
            start_doc = stop_doc
        return out
