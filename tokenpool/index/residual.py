"""The `residual` codec: a token vector as its nearest centroid plus a quantized residual, `nbits` per dimension
on average.

PLAID's idea (k-means centroids, the residual quantized per dimension), with three changes that halve the
error at the same size (measured on all-MiniLM-L6-v2 token embeddings: bench/NOTES.md):

1. **A transform fitted to the data.** Residuals are rotated into the principal axes of the residuals as the
   queries see them: the error that moves a MaxSim score is `q . (x_hat - x)`, so the residuals are first
   weighted by the square root of the token vectors' second moment (a proxy for the queries', which come
   from the same model), then rotated by the principal axes of the weighted residuals.
2. **Bits where the variance is.** `nbits * dim` bits per token are allocated greedily over the transformed
   dimensions (each bit to the dimension whose error it reduces most, 0..8 bits each): axes with little
   variance get 0-1 bits, the large ones 3-4.
3. **Lloyd-Max levels per dimension** (cutoffs and levels fitted to each dimension's distribution), and
   decoded vectors renormalized to unit length when the indexed vectors were unit length.

A token costs `nbits * dim / 8` bytes of codes plus 2 bytes of centroid id (4 with more than 65,536
centroids): 34 bytes at 128 dimensions and nbits=2. Everything is trained on a sample (`train_tokens`, or 16
rows per centroid where that is more), so the corpus never needs to fit in RAM for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenpool.kernels import residual_unpack as unpack_kernel

NBITS = (1, 2, 4)
_MAX_BITS = 8  # per dimension
_LLOYD_ITERS = 8
_KMEANS_ITERS = 10
_KMEANS_CHUNK = 1 << 14  # rows per assignment product
_LEVEL_TOKENS = 1 << 16  # training rows for the per-axis levels
_DECODE_ROWS = 2048  # rows per decoded block (stays in the cache)
_ENCODE_ROWS = 1 << 16  # rows per encoded block
_POINTS_PER_CENTROID = 16  # k-means samples at least this many rows per centroid


def default_num_centroids(tokens: int) -> int:
    """2^floor(log2(32 sqrt(tokens))), at most 65,536 (two-byte ids) and the tokens: twice PLAID's rule (16 sqrt),
    which measured 0.907 recall@10 at nbits=2 where this gave 0.925 (bench/NOTES.md)."""
    k = 2 ** int(math.floor(math.log2(32 * math.sqrt(max(tokens, 1)))))
    return max(1, min(k, 1 << 16, tokens))


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centroid (largest dot product: the centroids are unit length)."""
    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), _KMEANS_CHUNK):
        out[start:start + _KMEANS_CHUNK] = (x[start:start + _KMEANS_CHUNK] @ centroids.T).argmax(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = _KMEANS_ITERS, seed: int = 0) -> torch.Tensor:
    """Spherical k-means: `k` unit-length centroids of the rows of `x` (float32 `[n, dim]`)."""
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(x[torch.randperm(len(x), generator=g)[:k].to(x.device)], dim=1)
    for _ in range(iters):
        a = _assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
        empty = int((~filled).sum())
        if empty:  # restart empty clusters on random rows
            centroids[~filled] = F.normalize(x[torch.randint(len(x), (empty,), generator=g).to(x.device)], dim=1)
    return centroids


def _allocate_bits(variance: torch.Tensor, total: int) -> torch.Tensor:
    """Greedy bit allocation: each bit to the dimension whose quantization error (~ variance * 4^-bits) it
    reduces most."""
    bits = torch.zeros(len(variance), dtype=torch.int64)
    gain = variance.double().clone()
    for _ in range(total):
        d = int(gain.argmax())
        bits[d] += 1
        gain[d] = -1.0 if bits[d] >= _MAX_BITS else gain[d] / 4
    return bits


def _lloyd_max(y: torch.Tensor, bits: int) -> torch.Tensor:
    """2^bits levels minimizing the squared error of quantizing the samples `y` (started at the quantiles)."""
    n = 1 << bits
    levels = torch.quantile(y, (torch.arange(n, dtype=torch.float32, device=y.device) + 0.5) / n)
    for _ in range(_LLOYD_ITERS):
        cut = (levels[1:] + levels[:-1]) / 2
        a = torch.bucketize(y, cut)
        sums = torch.zeros(n, device=y.device).index_add_(0, a, y)
        counts = torch.bincount(a, minlength=n)
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
    return levels.sort().values


@dataclass
class ResidualCodec:
    """The trained codec (see the module doc). `transform` maps a residual to the quantized axes, `inverse`
    back; `bits[d]` bits for axis d; `levels[d, :2^bits[d]]` its levels; dims are packed in `order`
    (ascending bits)."""

    nbits: int
    centroids: torch.Tensor  # [K, dim] float32, unit length
    transform: torch.Tensor  # [dim, dim]
    inverse: torch.Tensor  # [dim, dim]
    bits: torch.Tensor  # [dim] int64
    levels: torch.Tensor  # [dim, 256] float32 (levels[d, :2^bits[d]] used)
    normalize: bool

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def code_bytes(self) -> int:
        return (self.nbits * self.dim + 7) // 8

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if len(self.centroids) <= 1 << 16 else np.int32)

    @property
    def bytes_per_token(self) -> int:
        return self.code_bytes + self.id_dtype.itemsize

    # ----- training -----
    @classmethod
    def train(cls, vectors: np.ndarray, nbits: int, num_centroids: int | None = None,
              train_tokens: int = 1 << 18, seed: int = 0, device: torch.device | str = "cpu") -> "ResidualCodec":
        """Fit the codec to `vectors` `[n, dim]` float32 (k-means on a sample of max(`train_tokens`, 16 per
        centroid) rows; `num_centroids` default `default_num_centroids(n)`), computing
        on `device` (the codec's tensors are returned on the CPU; a GPU's rounding differs from the CPU's, so
        the centroids may differ slightly)."""
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {', '.join(map(str, NBITS))}, got {nbits!r}.")
        g = torch.Generator().manual_seed(seed)
        n, dim = vectors.shape
        k = num_centroids or default_num_centroids(n)
        sample = max(train_tokens, _POINTS_PER_CENTROID * k)
        pick = torch.randperm(n, generator=g)[:sample].sort().values.numpy() if n > sample else slice(None)
        x = torch.from_numpy(np.ascontiguousarray(vectors[pick], dtype=np.float32)).to(device)
        if not 1 <= k <= len(x):
            raise ValueError(f"num_centroids must be in 1..{len(x)} (the training tokens), got {k}.")
        norms = x.norm(dim=1)
        normalize = bool(((norms - 1).abs() < 1e-3).all())
        centroids = kmeans(x, k, seed=seed)
        residuals = x - centroids[_assign(x, centroids)]
        # weight by the square root of the vectors' second moment (the queries' proxy), then rotate into the
        # principal axes of the weighted residuals
        second = (x.T.double() @ x.double()).cpu() / len(x)
        ew, ev = torch.linalg.eigh(second)
        ew = ew.clamp(min=float(ew.max()) * 1e-6) ** 0.25  # (second moment)^(1/2), as its square root
        weight, unweight = (ev * ew) @ ev.T, (ev / ew) @ ev.T
        z = residuals.double() @ weight.to(x.device)
        _, axes = torch.linalg.eigh((z.T @ z).cpu() / len(z))
        transform, inverse = (weight @ axes).float(), (axes.T @ unweight).float()
        y = residuals[torch.randperm(len(x), generator=g)[:_LEVEL_TOKENS].to(x.device)] @ transform.to(x.device)
        bits = _allocate_bits(y.var(0).cpu(), nbits * dim)
        levels = torch.zeros(dim, 1 << _MAX_BITS)
        for d in range(dim):
            b = int(bits[d])
            levels[d, :1 << b] = (_lloyd_max(y[:, d].contiguous(), b) if b else y[:, d].mean()).cpu()
        return cls(nbits, centroids.cpu(), transform, inverse, bits, levels, normalize)

    # ----- encode / decode -----
    def _layout(self):
        """Per bit width w > 0: (w, the axes with w bits, their bit offset in a token's code)."""
        groups, offset = [], 0
        for w in range(1, _MAX_BITS + 1):
            dims = torch.nonzero(self.bits == w).flatten()
            if len(dims):
                groups.append((w, dims, offset))
                offset += w * len(dims)
        return groups

    def encode(self, vectors: np.ndarray, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """`[n, dim]` float32 -> (centroid ids `[n]`, codes `[n, code_bytes]` uint8), computed on `device` in
        blocks of `_ENCODE_ROWS` rows."""
        params = self.to(device)
        layout = params._layout()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        cids_out = np.empty(len(vectors), dtype=self.id_dtype)
        codes_out = np.empty((len(vectors), self.code_bytes), dtype=np.uint8)
        weights = 1 << torch.arange(7, -1, -1, device=device, dtype=torch.int32)  # big-endian bits, as np.packbits
        for start in range(0, len(vectors), _ENCODE_ROWS):
            x = torch.from_numpy(vectors[start:start + _ENCODE_ROWS]).to(device)
            cids = _assign(x, params.centroids)
            y = (x - params.centroids[cids]) @ params.transform
            bitfield = torch.zeros(len(x), self.code_bytes * 8, dtype=torch.int32, device=device)
            for w, dims, offset in layout:
                lv = params.levels[dims, :1 << w]  # [g, 2^w]
                cut = (lv[:, 1:] + lv[:, :-1]) / 2
                idx = torch.searchsorted(cut.contiguous(), y[:, dims].T.contiguous()).T  # [n, g]
                shifts = torch.arange(w - 1, -1, -1, device=device)
                bitfield[:, offset:offset + w * len(dims)] = ((idx[..., None] >> shifts) & 1).reshape(len(x), -1)
            codes = (bitfield.view(len(x), self.code_bytes, 8) * weights).sum(dim=2).to(torch.uint8)
            cids_out[start:start + len(x)] = cids.cpu().numpy()
            codes_out[start:start + len(x)] = codes.cpu().numpy()
        return cids_out, codes_out

    def _unpack_plan(self):
        """Per axis (in axis order, as `[dim, 1]` columns): the byte holding its field's first bit and the next
        byte, the shift that brings the field to the bottom of the 16-bit word of the two, and its mask."""
        plan = getattr(self, "_plan", None)
        if plan is None:
            first = torch.zeros(self.dim, dtype=torch.int64)
            shift = torch.zeros(self.dim, 1, dtype=torch.int32)
            mask = torch.zeros(self.dim, 1, dtype=torch.int32)
            for w, dims, offset in self._layout():
                starts = offset + w * torch.arange(len(dims))
                first[dims] = starts // 8
                shift[dims, 0] = (16 - starts % 8 - w).int()
                mask[dims, 0] = (1 << w) - 1
            # the next byte is past the end only for a field that ends within the last byte: masked out
            second = (first + 1).clamp(max=max(self.code_bytes - 1, 0))
            plan = self._plan = tuple(t.to(self.centroids.device) for t in (first, second, shift, mask))
        return plan

    def decode(self, cids: np.ndarray | torch.Tensor, codes: np.ndarray | torch.Tensor,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """(centroid ids, codes) -> `[n, dim]` float32 vectors on `device`."""
        params = self.to(device)
        cids = torch.as_tensor(np.asarray(cids, dtype=np.int64) if isinstance(cids, np.ndarray) else cids,
                               device=device).long()
        codes = torch.as_tensor(codes, device=device)
        first, second, shift, mask = params._unpack_plan()
        out = torch.empty(len(cids), self.dim, device=device)
        on_cpu = cids.device.type == "cpu"
        block = _DECODE_ROWS if on_cpu else 1 << 18  # CPU: blocks that stay in the cache
        unpack = on_cpu and codes.dtype == torch.uint8 and unpack_kernel.available()
        if unpack:
            y_block = np.empty((min(block, len(cids)), self.dim), dtype=np.float32)
            plan = [t.numpy() for t in (first, second, shift, mask)]
            levels = params.levels.numpy()
        for start in range(0, len(cids), block):
            part = codes[start:start + block]
            if unpack:  # the C kernel: codes -> [n, dim] levels in one pass
                y = torch.from_numpy(unpack_kernel.residual_unpack(part.numpy(), *plan, levels, y_block[:len(part)],
                                                                   torch.get_num_threads()))
            else:  # axes as rows
                part = part.T.contiguous()  # [code bytes, n]
                word = (part.index_select(0, first).int() << 8).bitwise_or_(part.index_select(0, second))
                idx = word.bitwise_right_shift_(shift).bitwise_and_(mask).long()  # [dim, n]
                y = torch.gather(params.levels, 1, idx).T  # 0-bit axes: mask 0, their level 0 (the mean)
            x = torch.addmm(params.centroids.index_select(0, cids[start:start + block]), y, params.inverse,
                            out=out[start:start + block])
            if self.normalize:
                x.div_(x.norm(dim=1, keepdim=True).clamp_(min=1e-12))
        return out

    def to(self, device) -> "ResidualCodec":
        device = torch.device(device)
        if self.centroids.device == device:
            return self
        cached = getattr(self, "_on", {})
        if device not in cached:
            cached[device] = ResidualCodec(self.nbits, *(t.to(device) for t in (
                self.centroids, self.transform, self.inverse, self.bits, self.levels)), self.normalize)
            self._on = cached
        return cached[device]

    # ----- files -----
    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, nbits=self.nbits, centroids=self.centroids.numpy(), transform=self.transform.numpy(),
                     inverse=self.inverse.numpy(), bits=self.bits.numpy(), levels=self.levels.numpy(),
                     normalize=self.normalize)

    @classmethod
    def load(cls, path: Path) -> "ResidualCodec":
        with np.load(path) as z:
            return cls(int(z["nbits"]), torch.from_numpy(z["centroids"]), torch.from_numpy(z["transform"]),
                       torch.from_numpy(z["inverse"]), torch.from_numpy(z["bits"]), torch.from_numpy(z["levels"]),
                       bool(z["normalize"]))
