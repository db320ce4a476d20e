"""A backbone plus one pooler per supported task: the object the runner executes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

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
        # "all": every pooler's output from one forward pass (BGE-M3: dense + colbert + sparse).
        return (*self.poolers.keys(), ALL_TASKS) if self.lexical_head else tuple(self.poolers.keys())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                images: list | None = None) -> torch.Tensor:
        if images:
            return self.backbone(input_ids, positions, meta, images)
        return self.backbone(input_ids, positions, meta)

    def pool(self, hidden: torch.Tensor, slots: list[PoolingSlot]) -> "PooledBatch":
        """Every slot's output, packed into one flat float32 tensor on the model's device.

        A slot of task "all" is pooled once per task over the same rows; it unpacks to a dict.
        """
        expanded: list[PoolingSlot] = []
        owners: list[tuple[int, str | None]] = []
        for i, slot in enumerate(slots):
            if slot.task == ALL_TASKS:
                for task in self.poolers:
                    expanded.append(replace(slot, task=task))
                    owners.append((i, task))
            else:
                expanded.append(slot)
                owners.append((i, None))
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, slot in enumerate(expanded):
            by_task[slot.task].append(i)
        flats = []
        places: list[tuple[int, tuple[int, ...]]] = [(0, ())] * len(expanded)
        offset = 0
        for task, indices in by_task.items():
            flat, shapes = self.poolers[task](hidden, [expanded[i] for i in indices])
            for i, shape in zip(indices, shapes):
                places[i] = (offset, shape)
                offset += math.prod(shape)
            flats.append(flat)
        flat = flats[0] if len(flats) == 1 else torch.cat(flats)
        return PooledBatch(flat, places, owners if len(expanded) != len(slots) else None, len(slots))


ALL_TASKS = "all"


@dataclass(slots=True)
class PooledBatch:
    """All outputs of a batch in one flat tensor; `places[i]` = (offset, shape) of pooled slot i.

    owners: for batches with "all" slots, (request index, task) of each pooled slot; None otherwise.
    """

    flat: torch.Tensor
    places: list[tuple[int, tuple[int, ...]]]
    owners: list[tuple[int, str | None]] | None = None
    num_requests: int = 0

    def unpack(self, flat: torch.Tensor | None = None) -> list:
        """Per request: a view of `flat` (default: this batch's own tensor), or a dict of views for "all"."""
        flat = self.flat if flat is None else flat
        views = [flat[o:o + math.prod(shape)].view(shape) for o, shape in self.places]
        if self.owners is None:
            return views
        results: list = [None] * self.num_requests
        for view, (i, task) in zip(views, self.owners):
            if task is None:
                results[i] = view
            else:
                if results[i] is None:
                    results[i] = {}
                results[i][task] = view
        return results
