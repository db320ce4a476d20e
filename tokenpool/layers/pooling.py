"""Pooling methods: which rows of the packed batch each request's output is made of.

All pooling is computed from each request's (start, length) in the flat `[total_tokens, hidden]` batch.
A batch's requests reach the poolers as columns (`PoolingSlots`: numpy starts and lengths, one list per
option), and each pooler describes its outputs' shapes compactly (`RowShapes`), so that per-request Python
work stays small: the outputs of a batch are split into per-request views by one C call.

A method returns `(values, counts)`: one pooled row per request (`[n, width]` in fp32, counts None), or the
request's kept token rows (`[sum of counts, hidden]` in the hidden dtype, and each request's row count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(slots=True)
class PoolingSlots:
    """The slots of a batch as columns: slot i starts at row `starts[i]` and has `lengths[i]` rows.

    starts, lengths: int64 numpy arrays; tasks, use_activation: one entry per slot; dimensions: one entry
    per slot, or None when no slot truncates its embedding; keep: per slot, the rows (offsets in the slot)
    that per-token outputs are made of (a ColBERT document without its skiplist tokens) or None for all of
    them; None when every slot keeps all its rows.
    """

    starts: np.ndarray
    lengths: np.ndarray
    tasks: list[str]
    use_activation: list[bool | None]
    dimensions: list[int | None] | None = None
    keep: list[list[int] | None] | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def select(self, indices: list[int], task: str) -> "PoolingSlots":
        """The slots at `indices`, all asking for `task`."""
        acts = self.use_activation
        dims = None if self.dimensions is None else [self.dimensions[i] for i in indices]
        keep = None if self.keep is None else [self.keep[i] for i in indices]
        return PoolingSlots(self.starts[indices], self.lengths[indices], [task] * len(indices),
                            [acts[i] for i in indices], None if dims is None or dims.count(None) == len(dims) else dims,
                            None if keep is None or keep.count(None) == len(keep) else keep)

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


def row_index(slots: PoolingSlots, skip_first: int, skip_last: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Flat row indices of the kept tokens of every slot, and how many rows each slot keeps."""
    counts = np.maximum(slots.lengths - (skip_first + skip_last), 0)
    firsts = slots.starts + skip_first
    # Row i of slot j is firsts[j] + i: repeat each slot's first row, add the running index within the slot.
    ends = np.cumsum(counts)
    idx = np.repeat(firsts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
    return torch.from_numpy(idx).to(device, non_blocking=True), counts.tolist()


class SequencePooling(nn.Module):
    """One vector per request: sentence-transformers' pooling modes, concatenated in the order given
    (cls, lasttoken, mean, mean_sqrt_len, max), reduced in fp32."""

    MODES = ("cls", "lasttoken", "mean", "mean_sqrt_len", "max")

    def __init__(self, modes: list[str]):
        super().__init__()
        unsupported = [m for m in modes if m not in self.MODES]
        if unsupported:
            raise ValueError(f"Pooling mode(s) {unsupported} are not supported; supported: {', '.join(self.MODES)}.")
        self.modes = modes

    def width(self, hidden_size: int) -> int:
        return hidden_size * len(self.modes)

    def forward(self, hidden: torch.Tensor, slots: PoolingSlots) -> tuple[torch.Tensor, None]:
        device = hidden.device
        num = len(slots)
        starts = torch.from_numpy(slots.starts).to(device)
        lengths = torch.from_numpy(slots.lengths).to(device)
        parts = []
        if any(m in ("mean", "max", "mean_sqrt_len") for m in self.modes):
            span = slots.contiguous_span()
            if span is not None:
                rows = hidden[span[0]:span[1]].float()
            else:
                idx, _ = row_index(slots, 0, 0, device)
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
            else:  # max
                init = torch.full((num, hidden.shape[1]), float("-inf"), device=device)
                index = segment.unsqueeze(1).expand_as(rows)
                parts.append(init.scatter_reduce_(0, index, rows, reduce="amax"))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


class TokenPooling(nn.Module):
    """Every token's row, but `skip_first` / `skip_last` rows at each end of a request (BGE-M3 drops CLS for
    its colbert vectors, CLS and EOS for its sparse weights)."""

    def __init__(self, skip_first: int = 0, skip_last: int = 0):
        super().__init__()
        self.skip_first = skip_first
        self.skip_last = skip_last

    def width(self, hidden_size: int) -> int:
        return hidden_size

    def forward(self, hidden: torch.Tensor, slots: PoolingSlots) -> tuple[torch.Tensor, list[int]]:
        if slots.keep is not None:
            return self._kept_rows(hidden, slots)
        span = slots.contiguous_span() if self.skip_first == self.skip_last == 0 else None
        if span is not None:
            return hidden[span[0]:span[1]], slots.lengths.tolist()
        idx, counts = row_index(slots, self.skip_first, self.skip_last, hidden.device)
        return hidden.index_select(0, idx), counts

    def _kept_rows(self, hidden: torch.Tensor, slots: PoolingSlots) -> tuple[torch.Tensor, list[int]]:
        """Slots with a `keep` list (the skip counts apply to the others)."""
        parts, counts = [], []
        for start, length, keep in zip(slots.starts.tolist(), slots.lengths.tolist(), slots.keep):
            if keep is None:
                rows = np.arange(start + self.skip_first, start + max(length - self.skip_last, self.skip_first))
            else:
                rows = start + np.asarray(keep, dtype=np.int64)
            parts.append(rows)
            counts.append(len(rows))
        idx = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(hidden.device, non_blocking=True)
        return hidden.index_select(0, idx), counts
