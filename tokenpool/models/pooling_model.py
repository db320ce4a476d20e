"""A backbone plus one pooler per supported task: the object the runner executes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenpool.layers.attention import AttentionMetadata
from tokenpool.layers.pooling import PoolingSlots, RowShapes, split_views
from tokenpool.multimodal.types import BatchImages
from tokenpool.tasks import COMBINED_TASK as ALL_TASKS


class PoolingModel(nn.Module):
    """`forward` runs the backbone over a packed batch; `pool` applies each request's task pooler.

    lexical_head: True when `token_classify` is a sparse lexical-weight head (BGE-M3), whose outputs are
    also returned keyed by token id (it gates only that, not the combined task). colbert: a ColBERT
    checkpoint's settings (`tokenpool.loader.colbert.ColbertSettings`: query / document modes), else None.
    """

    def __init__(self, backbone: nn.Module, poolers: dict[str, nn.Module], max_model_len: int,
                 lexical_head: bool = False, name: str = "", colbert=None):
        super().__init__()
        self.colbert = colbert
        self.backbone = backbone
        self.poolers = nn.ModuleDict(poolers)
        self.max_model_len = max_model_len
        self.lexical_head = lexical_head
        self.name = name

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        # The combined task: every pooler's output from one forward pass, for any model with several heads
        # (BGE-M3: dense + colbert + sparse; a sentence-transformers model: embed + token_embed).
        tasks = tuple(self.poolers.keys())
        return (*tasks, ALL_TASKS) if len(tasks) > 1 else tasks

    def output_dims(self) -> dict[str, int]:
        """The width of each task's output rows (0: one scalar per token)."""
        return {task: pooler.width(self.backbone.hidden_size) for task, pooler in self.poolers.items()}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                images: BatchImages | None = None) -> torch.Tensor:
        if images is not None:
            return self.backbone(input_ids, positions, meta, images)
        return self.backbone(input_ids, positions, meta)

    def pool(self, hidden: torch.Tensor, slots: PoolingSlots) -> "PooledBatch":
        """Every slot's output, packed into one flat float32 tensor on the model's device.

        A slot of task "all" is pooled once per task over the same rows; it unpacks to a dict.
        """
        tasks = slots.tasks
        num = len(tasks)
        first = tasks[0]
        if first != ALL_TASKS and tasks.count(first) == num:  # one task: one pooler call, in order
            flat, shapes = self.poolers[first](hidden, slots)
            return PooledBatch(flat, [_Segment(0, flat.numel(), shapes)], num)
        # Slots grouped by pooler task in order of first appearance, "all" slots expanded to every task.
        groups: dict[str, tuple[list[int], list[str | None]]] = {}
        for i, task in enumerate(tasks):
            for sub, key in ([(t, t) for t in self.poolers] if task == ALL_TASKS else [(task, None)]):
                indices, keys = groups.setdefault(sub, ([], []))
                indices.append(i)
                keys.append(key)
        has_all = ALL_TASKS in tasks
        flats, segments, offset = [], [], 0
        for task, (indices, keys) in groups.items():
            flat, shapes = self.poolers[task](hidden, slots.select(indices, task))
            segments.append(_Segment(offset, flat.numel(), shapes, indices, keys if has_all else None))
            offset += flat.numel()
            flats.append(flat)
        flat = flats[0] if len(flats) == 1 else torch.cat(flats)
        return PooledBatch(flat, segments, num, tuple(self.poolers) if has_all else None)



@dataclass(slots=True)
class _Segment:
    """The output of one pooler call: `numel` values at `offset` of the flat tensor, laid out as `shapes`.

    indices: the request each pooled slot belongs to (None: requests 0..n-1 in order); keys: for batches
    with "all" requests, the task of each pooled slot of such a request (None for the other requests).
    """

    offset: int
    numel: int
    shapes: RowShapes | list[tuple[int, ...]]
    indices: list[int] | None = None
    keys: list[str | None] | None = None


@dataclass(slots=True)
class PooledBatch:
    """All outputs of a batch in one flat tensor, as segments (one per pooler call).

    all_tasks: for batches with "all" requests, the tasks of their dicts, in order; None otherwise.
    """

    flat: torch.Tensor
    segments: list[_Segment]
    num_requests: int = 0
    all_tasks: tuple[str, ...] | None = None

    def unpack(self, flat: torch.Tensor | None = None) -> list:
        """Per request: a view of `flat` (default: this batch's own tensor), or a dict of views for "all"."""
        flat = self.flat if flat is None else flat
        segments = self.segments
        if len(segments) == 1 and segments[0].indices is None:
            seg = segments[0]
            return split_views(flat if seg.numel == flat.numel() else flat[:seg.numel], seg.shapes)
        results: list = [None] * self.num_requests
        if self.all_tasks is not None:
            for seg in segments:
                for i, key in zip(seg.indices, seg.keys):
                    if key is not None and results[i] is None:
                        results[i] = dict.fromkeys(self.all_tasks)
        for seg in segments:
            views = split_views(flat[seg.offset:seg.offset + seg.numel], seg.shapes)
            if seg.keys is None:
                for i, view in zip(seg.indices, views):
                    results[i] = view
            else:
                for i, key, view in zip(seg.indices, seg.keys, views):
                    if key is None:
                        results[i] = view
                    else:
                        results[i][key] = view
        return results
