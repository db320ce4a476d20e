"""Model runner: a `Batch` -> flat device tensors -> backbone -> poolers -> host tensors.

On CUDA a batch is launched asynchronously (`launch`) and collected later (`finish`), so the host prepares
batch N+1 while the GPU runs batch N. All outputs of a batch leave the device in ONE copy, made on a side
stream into a reused pinned buffer, so it overlaps the next batch's compute.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tokenpool.engine.scheduler import Batch
from tokenpool.layers.attention import AttentionMetadata
from tokenpool.layers.pooling import PoolingSlots
from tokenpool.models.pooling_model import PooledBatch, PoolingModel
from tokenpool.multimodal.types import BatchImages


@dataclass(slots=True)
class ModelInput:
    """The packed batch: `input_ids` `[total_tokens]`; `positions` `[total_tokens]`, or `[3, total_tokens]`
    multimodal rotary positions when the batch has images; `images`: the batch's images, if any."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    slots: PoolingSlots
    images: BatchImages | None = None


@dataclass(slots=True)
class InFlight:
    """A launched batch whose outputs are still on their way to the host."""

    batch: Batch
    pooled: PooledBatch
    # CUDA: the host copy of the outputs, made by the copier thread once the device-to-host copy is done.
    host: Future | None = None


_CPU_ROW_BUCKET = 64


class ModelRunner:
    def __init__(self, model: PoolingModel, device: torch.device, default_activation: bool | None = None,
                 default_dimensions: int | None = None):
        self.model = model
        self.device = device
        self.default_activation = default_activation
        self.default_dimensions = default_dimensions  # PoolerConfig.dimensions: embed's default truncation
        self._cuda = device.type == "cuda"
        # CUDA: whether batches launched now are copied out per request (False: as one tensor; see finish_batch)
        self.owned_outputs = True
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            # Copies outputs out of the reused pinned staging buffer into their own memory (~4 ms for a
            # 65k-token MiniLM batch) while the main thread prepares and launches the next batch; torch
            # releases the GIL during the event wait and the copy.
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="tokenpool-d2h")
            self._staging: list[torch.Tensor] = [torch.empty(0, pin_memory=True), torch.empty(0, pin_memory=True)]
            self._turn = 0

    def prepare(self, batch: Batch) -> ModelInput:
        requests = batch.requests
        seq_lens = [r.num_tokens for r in requests]
        lens_np = np.array(seq_lens, dtype=np.int64)
        ends = np.cumsum(lens_np)
        total = int(ends[-1])
        # One copy of every request's int64 ids into one buffer (a bytearray: writable, for torch).
        chunks = [r.tokens for r in requests]
        rows = total
        if not self._cuda and not any(r.images is not None for r in requests):
            # CPU: rows rounded up to a multiple of _CPU_ROW_BUCKET (padding ids 0, position 0, attended by no
            # sequence, pooled by none). oneDNN builds a kernel for every new GEMM row count it sees, which
            # doubled a bf16 layer's GEMM time for batches of unseen sizes (bench/cpu_kernels.py).
            rows = -(-total // _CPU_ROW_BUCKET) * _CPU_ROW_BUCKET
            chunks.append(bytes(8 * (rows - total)))
        ids = np.frombuffer(bytearray().join(chunks), dtype=np.int64)
        host_ids, host_lens = torch.from_numpy(ids), torch.from_numpy(lens_np.astype(np.int32))
        if self._cuda:
            host_ids, host_lens = host_ids.pin_memory(), host_lens.pin_memory()
        input_ids = host_ids.to(self.device, non_blocking=True)
        lens = host_lens.to(self.device, non_blocking=True)
        cu_seqlens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(lens, 0, out=cu_seqlens[1:])
        # Position of each token inside its sequence, computed on the device (no sync: output_size given).
        images = None
        if any(r.images is not None for r in requests):
            # Text-only prompts count 0..n-1 on all three rotary axes; image prompts bring their own ids.
            rows = [r.images.positions if r.images is not None else np.broadcast_to(np.arange(n), (3, n))
                    for r, n in zip(requests, seq_lens)]
            positions = torch.from_numpy(np.concatenate(rows, axis=1)).to(self.device, non_blocking=True)
            with_images = [(r.images, start) for r, start in zip(requests, (ends - lens_np).tolist())
                           if r.images is not None]
            images = BatchImages([im for im, _ in with_images],
                                 np.concatenate([im.token_index + start for im, start in with_images]))
        else:
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=total)
            positions = torch.arange(total, device=self.device) - starts
            if rows > total:
                positions = torch.cat([positions, positions.new_zeros(rows - total)])
        # The pooling slots as columns (no per-request objects).
        params = [r.params for r in requests]
        default = self.default_activation
        acts = [p.use_activation for p in params]
        if default is not None and None in acts:
            acts = [default if a is None else a for a in acts]
        dims = [p.dimensions for p in params]
        if self.default_dimensions is not None:
            dims = [self.default_dimensions if d is None else d for d in dims]
        slots = PoolingSlots(ends - lens_np, lens_np, [r.task for r in requests], acts,
                             None if dims.count(None) == len(dims) else dims)
        attn = AttentionMetadata(cu_seqlens, seq_lens, max(seq_lens))
        return ModelInput(input_ids, positions, attn, slots, images)

    @torch.inference_mode()
    def launch(self, batch: Batch) -> InFlight:
        """Queue the forward pass and the pooling of `batch` (returns at once on CUDA)."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, inputs.images)
        pooled = self.model.pool(hidden, inputs.slots)
        if not self._cuda:
            return InFlight(batch, pooled)
        flat = pooled.flat
        staging = self._staging[self._turn]
        if staging.numel() < flat.numel():
            staging = torch.empty(int(flat.numel() * 1.25), dtype=torch.float32, pin_memory=True)
            self._staging[self._turn] = staging
        self._turn ^= 1
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            staging[: flat.numel()].copy_(flat, non_blocking=True)
            flat.record_stream(self._copy_stream)
            done = torch.cuda.Event()
            done.record()
        # The staging buffer is rewritten two launches later, after `finish` has waited for this copy.
        return InFlight(batch, pooled, self._copier.submit(_copy_out, done, staging[: flat.numel()], pooled,
                                                           self.owned_outputs))

    def finish(self, inflight: InFlight) -> list:
        """Wait for a launched batch; per request, in batch order, a float32 host tensor (or a dict of them for
        the combined task) that owns its memory: keeping or pickling one output keeps only its own bytes."""
        if inflight.host is None:
            return _owned(inflight.pooled.unpack())
        result = inflight.host.result()
        return _owned(inflight.pooled.unpack(result)) if isinstance(result, torch.Tensor) else result

    def finish_batch(self, inflight: InFlight) -> tuple[torch.Tensor | None, list]:
        """Wait for a launched batch; its flat float32 host tensor and per-request views of it: no per-request
        copies (on CUDA, launched with `owned_outputs = False`: one copy out of the staging buffer)."""
        if inflight.host is None:
            return inflight.pooled.flat, inflight.pooled.unpack()
        result = inflight.host.result()
        if isinstance(result, torch.Tensor):
            return result, inflight.pooled.unpack(result)
        return None, result


def _owned(results: list) -> list:
    """Each view cloned into its own memory (one copy of the batch's bytes in all)."""
    return [{k: v.clone() for k, v in r.items()} if isinstance(r, dict) else r.clone() for r in results]


def _copy_out(done: torch.cuda.Event, staging: torch.Tensor, pooled: PooledBatch, owned: bool):
    """On the copier thread: wait for the device-to-host copy, then copy the outputs out of the reused staging
    buffer: each request's into its own memory (owned), else the batch's in one tensor. clone releases the GIL."""
    done.synchronize()
    return _owned(pooled.unpack(staging)) if owned else staging.clone()
