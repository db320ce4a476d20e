"""A backbone plus one pooler per supported task: the object the runner executes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from tokenpool.layers.attention import AttentionMetadata
from tokenpool.layers.pooler import PoolingSlot


class PoolingModel(nn.Module):
    """`forward` runs the backbone over a packed batch; `pool` applies each request's task pooler.

    lexical_head: True when `token_classify` is a sparse lexical-weight head (BGE-M3), whose outputs are
    also returned keyed by token id.
    """

    def __init__(self, backbone: nn.Module, poolers: dict[str, nn.Module], max_model_len: int,
                 lexical_head: bool = False, name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.poolers = nn.ModuleDict(poolers)
        self.max_model_len = max_model_len
        self.lexical_head = lexical_head
        self.name = name

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return tuple(self.poolers.keys())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.backbone(input_ids, positions, meta)

    def pool(self, hidden: torch.Tensor, slots: list[PoolingSlot]) -> "PooledBatch":
        """Every slot's output, packed into one flat float32 tensor on the model's device."""
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, slot in enumerate(slots):
            by_task[slot.task].append(i)
        flats = []
        places: list[tuple[int, tuple[int, ...]]] = [(0, ())] * len(slots)
        offset = 0
        for task, indices in by_task.items():
            flat, shapes = self.poolers[task](hidden, [slots[i] for i in indices])
            for i, shape in zip(indices, shapes):
                places[i] = (offset, shape)
                offset += math.prod(shape)
            flats.append(flat)
        return PooledBatch(flats[0] if len(flats) == 1 else torch.cat(flats), places)


@dataclass(slots=True)
class PooledBatch:
    """All outputs of a batch in one flat tensor; `places[i]` = (offset, shape) of slot i."""

    flat: torch.Tensor
    places: list[tuple[int, tuple[int, ...]]]

    def unpack(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Views of `flat` (default: this batch's own tensor) per slot."""
        flat = self.flat if flat is None else flat
        return [flat[o:o + math.prod(shape)].view(shape) for o, shape in self.places]
