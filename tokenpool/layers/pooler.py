"""Poolers: a pooling method over each request's rows of the packed batch + a head + activation.

All pooling is computed from each request's (start, length) in the flat `[total_tokens, hidden]` batch;
outputs are float32 (heads may run in the model's dtype; reductions and normalization run in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class PoolingSlot:
    """One request's place in the packed batch and what it asks for."""

    start: int
    length: int
    task: str
    use_activation: bool | None
    dimensions: int | None = None


def _row_index(slots: list[PoolingSlot], skip_first: int, skip_last: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Flat row indices of the kept tokens of every slot, and how many rows each slot keeps."""
    counts = np.array([max(s.length - skip_first - skip_last, 0) for s in slots], dtype=np.int64)
    firsts = np.array([s.start + skip_first for s in slots], dtype=np.int64)
    # Row i of slot j is firsts[j] + i: repeat each slot's first row, add the running index within the slot.
    ends = np.cumsum(counts)
    idx = np.repeat(firsts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
    return torch.from_numpy(idx).to(device, non_blocking=True), counts.tolist()


def _contiguous_span(slots: list[PoolingSlot]) -> tuple[int, int] | None:
    """(start, end) when the slots tile one contiguous range of rows in order, else None."""
    for a, b in zip(slots, slots[1:]):
        if a.start + a.length != b.start:
            return None
    return slots[0].start, slots[-1].start + slots[-1].length


class EmbedPooler(nn.Module):
    """`embed`: sentence-transformers pooling modes (concatenated) -> Dense layers -> Matryoshka -> normalize."""

    task = "embed"

    def __init__(self, modes: list[str], dense: list[nn.Module] | None = None, default_activation: bool = True):
        super().__init__()
        self.modes = modes
        self.dense = nn.Sequential(*dense) if dense else None
        self.default_activation = default_activation

    def forward(self, hidden: torch.Tensor, slots: list[PoolingSlot]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """Returns the outputs of all slots as one flat float32 tensor, and each slot's shape."""
        device = hidden.device
        starts = torch.tensor([s.start for s in slots], device=device)
        lengths = torch.tensor([s.length for s in slots], device=device)
        parts = []
        needs_rows = any(m in ("mean", "max", "mean_sqrt_len") for m in self.modes)
        if needs_rows:
            span = _contiguous_span(slots)
            if span is not None:
                rows = hidden[span[0]:span[1]].float()
            else:
                idx, _ = _row_index(slots, 0, 0, device)
                rows = hidden.index_select(0, idx).float()
            segment = torch.repeat_interleave(torch.arange(len(slots), device=device), lengths)
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden.index_select(0, starts).float())
            elif mode == "lasttoken":
                parts.append(hidden.index_select(0, starts + lengths - 1).float())
            elif mode in ("mean", "mean_sqrt_len"):
                sums = torch.zeros(len(slots), hidden.shape[1], device=device).index_add_(0, segment, rows)
                denom = lengths.unsqueeze(1).float()
                parts.append(sums / (denom if mode == "mean" else denom.sqrt()))
            elif mode == "max":
                init = torch.full((len(slots), hidden.shape[1]), float("-inf"), device=device)
                index = segment.unsqueeze(1).expand_as(rows)
                parts.append(init.scatter_reduce_(0, index, rows, reduce="amax"))
            else:
                raise ValueError(f"Pooling mode {mode!r} is not supported.")
        pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.dense is not None:
            pooled = self.dense(pooled)
        flags = [self.default_activation if s.use_activation is None else s.use_activation for s in slots]
        if all(s.dimensions is None for s in slots):
            if all(flags):
                pooled = F.normalize(pooled, p=2, dim=-1)
            elif any(flags):
                mask = torch.tensor(flags, device=device).unsqueeze(1)
                pooled = torch.where(mask, F.normalize(pooled, p=2, dim=-1), pooled)
            return pooled.reshape(-1), [(pooled.shape[1],)] * len(slots)
        vectors = []
        for vec, slot, flag in zip(pooled, slots, flags):
            if slot.dimensions is not None:
                if slot.dimensions > vec.shape[0]:
                    raise ValueError(f"dimensions={slot.dimensions} is larger than the embedding size {vec.shape[0]}.")
                vec = vec[: slot.dimensions]
            vectors.append(F.normalize(vec, p=2, dim=-1) if flag else vec)
        return torch.cat(vectors), [tuple(v.shape) for v in vectors]


class TokenPooler(nn.Module):
    """Per-token outputs (`token_embed`, `token_classify`): optional projection, then activation.

    activation: "normalize" (L2 per token) or "relu". skip_first/skip_last drop rows at each end
    (BGE-M3 drops CLS for colbert vectors, CLS and EOS for sparse weights). squeeze: `[n, 1]` -> `[n]`.
    """

    def __init__(self, task: str, proj: nn.Module | None = None, activation: str = "normalize",
                 skip_first: int = 0, skip_last: int = 0, squeeze: bool = False):
        super().__init__()
        self.task = task
        self.proj = proj
        self.activation = activation
        self.skip_first = skip_first
        self.skip_last = skip_last
        self.squeeze = squeeze

    def forward(self, hidden: torch.Tensor, slots: list[PoolingSlot]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """Returns the outputs of all slots as one flat float32 tensor, and each slot's shape."""
        span = _contiguous_span(slots) if self.skip_first == self.skip_last == 0 else None
        if span is not None:
            rows = hidden[span[0]:span[1]]
            counts = [s.length for s in slots]
        else:
            idx, counts = _row_index(slots, self.skip_first, self.skip_last, hidden.device)
            rows = hidden.index_select(0, idx)
        if self.proj is not None:
            rows = self.proj(rows)
        rows = rows.float()
        flags = [True if s.use_activation is None else s.use_activation for s in slots]
        if all(flags):
            rows = self._activate(rows)
        elif any(flags):
            rows = rows.clone()
            for piece, flag in zip(rows.split(counts), flags):
                if flag:
                    piece.copy_(self._activate(piece))
        width = () if self.squeeze else (rows.shape[1],)
        return rows.reshape(-1), [(n, *width) for n in counts]

    def _activate(self, rows: torch.Tensor) -> torch.Tensor:
        if self.activation == "normalize":
            return F.normalize(rows, p=2, dim=-1)
        if self.activation == "relu":
            return torch.relu(rows)
        raise ValueError(f"Unknown activation {self.activation!r}")
