"""Poolers: a pooling method over each request's rows of the packed batch + a head + activation.

All pooling is computed from each request's (start, length) in the flat `[total_tokens, hidden]` batch;
outputs are float32 (heads may run in the model's dtype; reductions and normalization run in fp32).
A batch's requests reach the poolers as columns (`PoolingSlots`: numpy starts and lengths, one list per
option), and each pooler describes its outputs' shapes compactly (`RowShapes`), so that per-request Python
work stays small: the outputs of a batch are split into per-request views by one C call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class PoolingSlots:
    """The slots of a batch as columns: slot i starts at row `starts[i]` and has `lengths[i]` rows.

    starts, lengths: int64 numpy arrays; tasks, use_activation: one entry per slot; dimensions: one entry
    per slot, or None when no slot truncates its embedding.
    """

    starts: np.ndarray
    lengths: np.ndarray
    tasks: list[str]
    use_activation: list[bool | None]
    dimensions: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def select(self, indices: list[int], task: str) -> "PoolingSlots":
        """The slots at `indices`, all asking for `task`."""
        acts = self.use_activation
        dims = None if self.dimensions is None else [self.dimensions[i] for i in indices]
        return PoolingSlots(self.starts[indices], self.lengths[indices], [task] * len(indices),
                            [acts[i] for i in indices], None if dims is None or dims.count(None) == len(dims) else dims)

    def contiguous_span(self) -> tuple[int, int] | None:
        """(start, end) when the slots tile one contiguous range of rows in order, else None."""
        starts, lengths = self.starts, self.lengths
        if len(starts) > 1 and not np.array_equal(starts[1:], starts[:-1] + lengths[:-1]):
            return None
        return int(starts[0]), int(starts[-1] + lengths[-1])


@dataclass(slots=True)
class RowShapes:
    """The output shapes of `num` slots, packed back to back: slot i is `(counts[i], *width)`, or `width`
    for every slot when counts is None."""

    width: tuple[int, ...]
    num: int
    counts: list[int] | None = None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view of `flat` per slot (one C call)."""
        if self.counts is None:
            return list(flat.view(self.num, *self.width).unbind(0))
        return list(flat.view(-1, *self.width).split(self.counts))

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        if self.counts is None:
            return iter([self.width] * self.num)
        return ((n, *self.width) for n in self.counts)


def split_views(flat: torch.Tensor, shapes: RowShapes | Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Per-slot views of `flat`, laid out as `shapes` (a `RowShapes`, or a list of shapes)."""
    if isinstance(shapes, RowShapes):
        return shapes.views(flat)
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset:offset + size].view(shape))
        offset += size
    return views


def _row_index(slots: PoolingSlots, skip_first: int, skip_last: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Flat row indices of the kept tokens of every slot, and how many rows each slot keeps."""
    counts = np.maximum(slots.lengths - (skip_first + skip_last), 0)
    firsts = slots.starts + skip_first
    # Row i of slot j is firsts[j] + i: repeat each slot's first row, add the running index within the slot.
    ends = np.cumsum(counts)
    idx = np.repeat(firsts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
    return torch.from_numpy(idx).to(device, non_blocking=True), counts.tolist()


class EmbedPooler(nn.Module):
    """`embed`: sentence-transformers pooling modes (concatenated) -> Dense layers -> Matryoshka -> normalize."""

    task = "embed"
    MODES = ("cls", "lasttoken", "mean", "mean_sqrt_len", "max")

    def __init__(self, modes: list[str], dense: list[nn.Module] | None = None, default_activation: bool = True):
        super().__init__()
        self.modes = modes
        self.dense = nn.Sequential(*dense) if dense else None
        self.default_activation = default_activation

    def width(self, hidden_size: int) -> int:
        """The length of the pooled vector for a backbone of `hidden_size`."""
        if self.dense is not None:
            return [m for m in self.dense.modules() if isinstance(m, nn.Linear)][-1].out_features
        return hidden_size * len(self.modes)

    def forward(self, hidden: torch.Tensor, slots: PoolingSlots
                ) -> tuple[torch.Tensor, RowShapes | list[tuple[int, ...]]]:
        """Returns the outputs of all slots as one flat float32 tensor, and each slot's shape."""
        device = hidden.device
        num = len(slots)
        starts = torch.from_numpy(slots.starts).to(device)
        lengths = torch.from_numpy(slots.lengths).to(device)
        parts = []
        needs_rows = any(m in ("mean", "max", "mean_sqrt_len") for m in self.modes)
        if needs_rows:
            span = slots.contiguous_span()
            if span is not None:
                rows = hidden[span[0]:span[1]].float()
            else:
                idx, _ = _row_index(slots, 0, 0, device)
                rows = hidden.index_select(0, idx).float()
            segment = torch.repeat_interleave(torch.arange(num, device=device), lengths)
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden.index_select(0, starts).float())
            elif mode == "lasttoken":
                parts.append(hidden.index_select(0, starts + lengths - 1).float())
            elif mode in ("mean", "mean_sqrt_len"):
                sums = torch.zeros(num, hidden.shape[1], device=device).index_add_(0, segment, rows)
                denom = lengths.unsqueeze(1).float()
                parts.append(sums / (denom if mode == "mean" else denom.sqrt()))
            elif mode == "max":
                init = torch.full((num, hidden.shape[1]), float("-inf"), device=device)
                index = segment.unsqueeze(1).expand_as(rows)
                parts.append(init.scatter_reduce_(0, index, rows, reduce="amax"))
            else:
                raise ValueError(f"Pooling mode {mode!r} is not supported.")
        pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.dense is not None:
            pooled = self.dense(pooled)
        default = self.default_activation
        flags = [default if f is None else f for f in slots.use_activation]
        if slots.dimensions is None:
            if all(flags):
                pooled = F.normalize(pooled, p=2, dim=-1)
            elif any(flags):
                mask = torch.tensor(flags, device=device).unsqueeze(1)
                pooled = torch.where(mask, F.normalize(pooled, p=2, dim=-1), pooled)
            return pooled.reshape(-1), RowShapes((pooled.shape[1],), num)
        vectors = []
        for vec, dims, flag in zip(pooled, slots.dimensions, flags):
            if dims is not None:
                if dims > vec.shape[0]:
                    raise ValueError(f"dimensions={dims} is larger than the embedding size {vec.shape[0]}.")
                vec = vec[:dims]
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

    def forward(self, hidden: torch.Tensor, slots: PoolingSlots) -> tuple[torch.Tensor, RowShapes]:
        """Returns the outputs of all slots as one flat float32 tensor, and each slot's shape."""
        span = slots.contiguous_span() if self.skip_first == self.skip_last == 0 else None
        if span is not None:
            rows = hidden[span[0]:span[1]]
            counts = slots.lengths.tolist()
        else:
            idx, counts = _row_index(slots, self.skip_first, self.skip_last, hidden.device)
            rows = hidden.index_select(0, idx)
        if self.proj is not None:
            rows = self.proj(rows)
        rows = rows.float()
        acts = slots.use_activation
        flags = [True if f is None else f for f in acts] if None in acts else acts
        if all(flags):
            rows = self._activate(rows)
        elif any(flags):
            rows = rows.clone()
            for piece, flag in zip(rows.split(counts), flags):
                if flag:
                    piece.copy_(self._activate(piece))
        width = () if self.squeeze else (rows.shape[1],)
        return rows.reshape(-1), RowShapes(width, len(counts), counts)

    def _activate(self, rows: torch.Tensor) -> torch.Tensor:
        if self.activation == "normalize":
            return F.normalize(rows, p=2, dim=-1)
        if self.activation == "relu":
            return torch.relu(rows)
        raise ValueError(f"Unknown activation {self.activation!r}")
