"""A backbone plus one pooler per supported task: the object the runner executes."""

from __future__ import annotations

from collections import defaultdict

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

    def pool(self, hidden: torch.Tensor, slots: list[PoolingSlot]) -> list[torch.Tensor]:
        """Outputs for each slot, in slot order (float32, on the model's device)."""
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, slot in enumerate(slots):
            by_task[slot.task].append(i)
        outputs: list[torch.Tensor | None] = [None] * len(slots)
        for task, indices in by_task.items():
            results = self.poolers[task](hidden, [slots[i] for i in indices])
            for i, result in zip(indices, results):
                outputs[i] = result
        return outputs  # type: ignore[return-value]
