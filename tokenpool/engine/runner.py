"""Model runner: a `Batch` -> flat device tensors -> backbone -> poolers -> host tensors.

On CUDA a batch is launched asynchronously (`launch`) and collected later (`finish`): `inflight_depth` batches
stay launched ahead of the one being collected (2 by default, `TOKENPOOL_CUDA_INFLIGHT`), so the host's work
for a batch (its launch, then taking its outputs apart) never leaves the GPU without queued work. All outputs
of a batch leave the device in ONE copy, made on a side stream into a reused pinned buffer, so it overlaps
the next batches' compute.
"""

from __future__ import annotations

import os
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
    # CUDA: the host copy of the outputs, made by the copier thread once the device-to-host copy is done,
    # and the pinned staging buffer it is made from (free again once `host` is done).
    host: Future | None = None
    staging: torch.Tensor | None = None


_CPU_ROW_BUCKET = 64


def cuda_inflight_depth() -> int:
    """Batches kept launched on CUDA ahead of the one being collected (`TOKENPOOL_CUDA_INFLIGHT`, 1..4)."""
    raw = os.environ.get("TOKENPOOL_CUDA_INFLIGHT", "2")
    if raw.strip() not in ("1", "2", "3", "4"):
        raise ValueError(f"TOKENPOOL_CUDA_INFLIGHT={raw!r}: expected 1, 2, 3 or 4 (batches kept in flight).")
    return int(raw)


class ModelRunner:
    def __init__(self, model: PoolingModel, device: torch.device, default_activation: bool | None = None,
                 default_dimensions: int | None = None):
        self.model = model
        self.device = device
        self.default_activation = default_activation
        self.default_dimensions = default_dimensions  # PoolerConfig.dimensions: embed's default truncation
        self._cuda = device.type == "cuda"
        # CPU: launching is running, so nothing stays in flight.
        self.inflight_depth = cuda_inflight_depth() if self._cuda else 0
        if self._cuda:
            threads = copy_threads()  # a bad TOKENPOOL_COPY_THREADS fails here, at start
            # The threads that split each batch's copy out of staging (None: the copier thread copies alone).
            self._copy_parts = threads
            self._copy_pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenpool-copy") if threads > 1 else None
            self._copy_stream = torch.cuda.Stream(device)
            # Copies a batch's outputs out of the reused pinned staging buffer into their own memory (~4 ms for
            # a 65k-token MiniLM batch) while the main thread prepares and launches the next batch; torch
            # releases the GIL during the event wait and the copy.
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="tokenpool-d2h")
            # Pinned staging buffers not in use: a launch takes one (or makes one), `finish` gives it back once
            # the copy out of it is done, so a buffer is never rewritten while a batch still reads it (as many
            # exist as batches were ever between launch and collection at once).
            self._free_staging: list[torch.Tensor] = []

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
        keep = [r.prompt.keep_rows for r in requests]
        slots = PoolingSlots(ends - lens_np, lens_np, [r.task for r in requests], acts,
                             None if dims.count(None) == len(dims) else dims,
                             None if keep.count(None) == len(keep) else keep)
        attn = AttentionMetadata(cu_seqlens, seq_lens, max(seq_lens))
        if any(r.prompt.num_keys is not None for r in requests):
            attn = attn.with_key_lens([r.prompt.num_keys or n for r, n in zip(requests, seq_lens)])
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
        staging = self._free_staging.pop() if self._free_staging else None
        if staging is None or staging.numel() < flat.numel():
            staging = torch.empty(int(flat.numel() * 1.25), dtype=torch.float32, pin_memory=True)
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            staging[: flat.numel()].copy_(flat, non_blocking=True)
            flat.record_stream(self._copy_stream)
            done = torch.cuda.Event()
            done.record()
        return InFlight(batch, pooled, self._copier.submit(_copy_out, done, staging[: flat.numel()], self._copy_pool,
                                                                self._copy_parts),
                        staging)

    def finish(self, inflight: InFlight) -> list:
        """Wait for a launched batch; per request, in batch order, a float32 host tensor (or a dict of them for
        the combined task) with a storage of its own: pickling one output writes only its own bytes."""
        flat = self._host_flat(inflight)
        return _own_storages(inflight.pooled.unpack(flat), flat)

    def finish_batch(self, inflight: InFlight) -> tuple[torch.Tensor, list]:
        """Wait for a launched batch; its flat float32 host tensor and per-request views of it."""
        flat = self._host_flat(inflight)
        return flat, inflight.pooled.unpack(flat)

    def _host_flat(self, inflight: InFlight) -> torch.Tensor:
        if inflight.host is None:
            return inflight.pooled.flat
        flat = inflight.host.result()
        self._free_staging.append(inflight.staging)
        return flat


def copy_threads() -> int:
    """Threads that copy a batch's outputs out of pinned staging (`TOKENPOOL_COPY_THREADS`, 1..32; default a
    quarter of the CPUs, at most 4: on a 16-core GPU host 4 threads took MiniLM from 4.63M to 5.37M tok/s
    end to end, bench/NOTES.md)."""
    raw = os.environ.get("TOKENPOOL_COPY_THREADS") or str(min(4, max(1, (os.cpu_count() or 1) // 4)))
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 32:
        raise ValueError(f"TOKENPOOL_COPY_THREADS={raw!r}: expected an int in 1..32 (threads copying outputs).")
    return int(raw)


def _copy_out(done: torch.cuda.Event, staging: torch.Tensor, pool: ThreadPoolExecutor | None = None,
              parts: int = 1) -> torch.Tensor:
    """On the copier thread: wait for the device-to-host copy, then copy the batch out of the reused staging
    buffer into memory of its own (numpy's allocation: huge pages for large arrays, so that the first touch of
    a 100 MB+ batch costs 2 MB page faults, not 4 KB ones). The copy releases the GIL; with a `pool` of
    `parts` threads (TOKENPOOL_COPY_THREADS) it is split into `parts` parts copied at once (a 65k-token batch of
    a 768-wide model is 200 MB: one thread's memory copy can take longer than the GPU's batch)."""
    done.synchronize()
    out = np.empty(staging.numel(), dtype=np.float32)
    if pool is None or parts == 1 or out.size < parts * (1 << 20):
        return torch.from_numpy(out).copy_(staging)
    source = staging.numpy()
    step = -(-out.size // parts)
    futures = [pool.submit(np.copyto, out[lo:lo + step], source[lo:lo + step]) for lo in range(0, out.size, step)]
    for future in futures:
        future.result()
    return torch.from_numpy(out)


def _own_storages(results: list, flat: torch.Tensor) -> list:
    """Per-request views of `flat` re-made as tensors with storages of their own over the same memory, no copy.

    torch pickles a tensor with its whole storage, so a plain view pickles its batch (4 MB for a 4 KB MiniLM
    result, ~268 MB for a 65k-token BGE-M3 batch). The memory itself is shared: it is freed when every output
    of the batch is (an output kept on its own: `.clone()`). A per-request clone instead cost BGE-M3 ~10% of its
    GPU throughput (4 KB page faults on 18 GB of fresh memory).
    """
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        return [{k: v.clone() for k, v in r.items()} if isinstance(r, dict) else r.clone() for r in results]
    base = flat.numpy()  # shares flat's memory, and keeps it alive for the tensors made from it
    start = flat.storage_offset()

    def own(view: torch.Tensor) -> torch.Tensor:
        offset = view.storage_offset() - start
        return torch.from_numpy(base[offset:offset + view.numel()]).view(view.shape)

    return [{k: own(v) for k, v in r.items()} if isinstance(r, dict) else own(r) for r in results]
