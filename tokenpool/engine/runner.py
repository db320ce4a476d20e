"""Model runner: a `Batch` -> flat device tensors -> backbone -> poolers -> host tensors (one copy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenpool.engine.scheduler import Batch
from tokenpool.layers.attention import AttentionMetadata
from tokenpool.layers.pooler import PoolingSlot
from tokenpool.models.pooling_model import PoolingModel


@dataclass(slots=True)
class ModelInput:
    """The packed batch: `input_ids` and `positions` are `[total_tokens]`."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    slots: list[PoolingSlot]


class ModelRunner:
    def __init__(self, model: PoolingModel, device: torch.device, default_activation: bool | None = None):
        self.model = model
        self.device = device
        self.default_activation = default_activation
        self._pin = device.type == "cuda"

    def prepare(self, batch: Batch) -> ModelInput:
        seq_lens = [r.num_tokens for r in batch.requests]
        flat_ids: list[int] = []
        for r in batch.requests:
            flat_ids.extend(r.prompt_token_ids)
        input_ids = torch.tensor(flat_ids, dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        if self._pin:
            input_ids, positions = input_ids.pin_memory(), positions.pin_memory()
        slots, start = [], 0
        for r, n in zip(batch.requests, seq_lens):
            use_activation = r.params.use_activation
            if use_activation is None:
                use_activation = self.default_activation
            slots.append(PoolingSlot(start, n, r.task, use_activation, r.params.dimensions))
            start += n
        return ModelInput(
            input_ids.to(self.device, non_blocking=True),
            positions.to(self.device, non_blocking=True),
            AttentionMetadata.from_seq_lens(seq_lens, self.device),
            slots,
        )

    @torch.inference_mode()
    def execute(self, batch: Batch) -> list[torch.Tensor]:
        """Run one batch; returns one float32 CPU tensor per request, in batch order."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn)
        outputs = self.model.pool(hidden, inputs.slots)
        return _to_host(outputs)


def _to_host(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One device-to-host copy for the whole batch, then views per request."""
    if outputs[0].device.type == "cpu":
        return [o.contiguous() for o in outputs]
    shapes = [o.shape for o in outputs]
    flat = torch.cat([o.reshape(-1) for o in outputs])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    return [piece.view(shape) for piece, shape in zip(host.split([s.numel() for s in shapes]), shapes)]
