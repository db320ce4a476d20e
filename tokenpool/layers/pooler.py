"""Poolers = a pooling method (which rows: `tokenpool.layers.pooling`) + a head (how they become outputs).

The head: an optional projection (sentence-transformers' Dense stack, BGE-M3's colbert / sparse linear), fp32
from there on, the activation per request (L2 normalize, or relu for sparse weights; `use_activation`
picks per request, its default is the model's), Matryoshka truncation of pooled vectors (renormalized when the
activation is on), and the output layout (`squeeze`: `[n, 1]` -> `[n]`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpool.layers.pooling import PoolingSlots, RowShapes, SequencePooling, TokenPooling


class PoolerHead(nn.Module):
    def __init__(self, proj: nn.Module | None = None, activation: str = "normalize", default_activation: bool = True,
                 squeeze: bool = False):
        super().__init__()
        if activation not in ("normalize", "relu"):
            raise ValueError(f"Unknown activation {activation!r}")
        self.proj = proj
        self.activation = activation
        self.default_activation = default_activation
        self.squeeze = squeeze

    def out_features(self) -> int | None:
        """The projection's output width, or None without a projection."""
        if self.proj is None:
            return None
        return [m for m in self.proj.modules() if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, values: torch.Tensor, counts: list[int] | None, slots: PoolingSlots
                ) -> tuple[torch.Tensor, RowShapes | list[tuple[int, ...]]]:
        """values: pooled `[n, width]` (counts None) or token rows `[sum(counts), hidden]` -> the outputs of all
        slots as one flat float32 tensor, and each slot's shape."""
        if self.proj is not None:
            values = self.proj(values)
        values = values.float()
        default = self.default_activation
        acts = slots.use_activation
        flags = [default if f is None else f for f in acts] if None in acts else acts
        if counts is None and slots.dimensions is not None:  # Matryoshka: per request
            vectors = []
            for vec, dims, flag in zip(values, slots.dimensions, flags):
                if dims is not None:
                    vec = vec[:dims]
                vectors.append(self._activate(vec) if flag else vec)
            return torch.cat(vectors), [tuple(v.shape) for v in vectors]
        if all(flags):
            values = self._activate(values)
        elif any(flags):
            values = values.clone()
            pieces = values.split(counts) if counts is not None else values.unbind(0)
            for piece, flag in zip(pieces, flags):
                if flag:
                    piece.copy_(self._activate(piece))
        if counts is None:
            return values.reshape(-1), RowShapes((values.shape[1],), len(slots))
        return values.reshape(-1), RowShapes(() if self.squeeze else (values.shape[1],), len(counts), counts)

    def _activate(self, values: torch.Tensor) -> torch.Tensor:
        return F.normalize(values, p=2, dim=-1) if self.activation == "normalize" else torch.relu(values)


class Pooler(nn.Module):
    """A task's pooler: `head(*method(hidden, slots), slots)`."""

    def __init__(self, task: str, method: nn.Module, head: PoolerHead):
        super().__init__()
        self.task = task
        self.method = method
        self.head = head

    def width(self, hidden_size: int) -> int:
        """The width of this task's output rows (0: one scalar per token)."""
        if self.head.squeeze:
            return 0
        return self.head.out_features() or self.method.width(hidden_size)

    def forward(self, hidden: torch.Tensor, slots: PoolingSlots) -> tuple[torch.Tensor, RowShapes | list]:
        return self.head(*self.method(hidden, slots), slots)


def embed_pooler(modes: list[str], dense: list[nn.Module] | None = None, normalize: bool = True) -> Pooler:
    """`embed`: sentence-transformers pooling modes -> Dense layers -> Matryoshka -> normalize (by default
    where the model normalizes)."""
    proj = nn.Sequential(*dense) if dense else None
    return Pooler("embed", SequencePooling(modes), PoolerHead(proj, "normalize", default_activation=normalize))


def token_pooler(task: str, proj: nn.Module | None = None, activation: str = "normalize", skip_first: int = 0,
                 skip_last: int = 0, squeeze: bool = False) -> Pooler:
    """Per-token outputs (`token_embed`, `token_classify`): the kept rows -> projection -> activation."""
    return Pooler(task, TokenPooling(skip_first, skip_last), PoolerHead(proj, activation, True, squeeze))
