"""Qwen2.5-VL (jina-embeddings-v4's backbone) over packed variable-length batches.

Text: the Qwen2 decoder (RMSNorm, causal attention with grouped KV heads, SwiGLU MLP) with multimodal
rotary positions: every token has three position ids (temporal, height, width); the rotary frequencies are
split into `mrope_section` groups, each rotated by one of the three. Text tokens have three equal ids
(plain 1-D rotary); image tokens get (t, row, column) of their merged patch, offset by the text before them.

Vision: a ViT over 14-px patches (the patch embedding is a linear map of the flattened `[C, T, 14, 14]`
pixels), 2-D rotary positions (row, column) of each patch, blocks attending inside windows of
`window_size` px except the `fullatt_block_indexes` blocks that attend over the whole image, and a merger that
concatenates each 2x2 group of patches and projects it to the text width. The image processor emits patches
grouped by 2x2 merge unit; the tower reorders merge units window by window (so each window is a contiguous
run for varlen attention) and restores the order after the merger.

The image embeddings replace the `<|image_pad|>` tokens' embeddings; the backbone returns the final-norm
hidden state of every token, image tokens included (`[total_tokens, hidden]`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from tokenpool.layers.attention import AttentionMetadata, varlen_attention
from tokenpool.layers.fused import FusedOps
from tokenpool.layers.linear import Linear
from tokenpool.layers.norm import RMSNorm
from tokenpool.layers.rotary import RotaryEmbedding, inverse_frequencies, rotate_heads_cuda_
from tokenpool.loader.mapping import WeightMap, load_weights
from tokenpool.multimodal.types import BatchImages


# ----------------------------------------------------------------------------- text decoder
class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg, ops: FusedOps):
        super().__init__()
        self.ops = ops
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hidden // self.num_heads
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = (q, kv, kv)
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.qkv = Linear(hidden, q + 2 * kv, bias=True)
        self.qkv.packed_sizes = self.sizes
        self.o_proj = Linear(q, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.gate_up = Linear(hidden, 2 * cfg.intermediate_size, bias=False)
        self.gate_up.packed_sizes = (cfg.intermediate_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, hidden, bias=False)
        _check_silu(cfg)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (residual stream, this layer's MLP output): the caller adds the two in the next norm."""
        tokens = x.shape[0]
        dtype = self.qkv.weight.dtype
        ops, norm = self.ops, self.input_layernorm
        if delta is None:
            h = ops.rms_norm(x, norm.weight, norm.eps).to(dtype)
        else:
            x, h = ops.add_rms_norm(delta, x, norm.weight, norm.eps, dtype)
        qkv = self.qkv(h)
        q, k, v = (t.view(tokens, -1, self.head_dim) for t in qkv.split(self.sizes, dim=-1))
        if not rotate_heads_cuda_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim):  # in place
            q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
        ctx = varlen_attention(q, k, v, meta).reshape(tokens, -1)
        norm = self.post_attention_layernorm
        x, h = ops.add_rms_norm(self.o_proj(ctx), x, norm.weight, norm.eps, dtype)
        return x, self.down_proj(ops.silu_mul(self.gate_up(h)))


class Qwen2TextModel(nn.Module):
    def __init__(self, cfg, ops: FusedOps):
        super().__init__()
        self.ops = ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rope = _rope_parameters(cfg)
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise ValueError(f"Qwen2.5-VL rope_type {rope.get('rope_type')!r} is not supported (only the default).")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 1e6))
        self.rotary = RotaryEmbedding(head_dim, theta, rope.get("mrope_section"))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cos, sin = self.rotary(positions)
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, cos, sin, meta)
        return self.ops.add_rms_norm(delta, x, self.norm.weight, self.norm.eps, x.dtype)[1]


# ----------------------------------------------------------------------------- vision tower
class VisionBlock(nn.Module):
    def __init__(self, vcfg, ops: FusedOps):
        super().__init__()
        self.ops = ops
        dim = vcfg.hidden_size
        self.num_heads = vcfg.num_heads
        self.head_dim = dim // self.num_heads
        self.norm1 = RMSNorm(dim)
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)
        self.norm2 = RMSNorm(dim)
        self.gate_up = Linear(dim, 2 * vcfg.intermediate_size, bias=True)
        self.gate_up.packed_sizes = (vcfg.intermediate_size, vcfg.intermediate_size)
        self.down_proj = Linear(vcfg.intermediate_size, dim, bias=True)
        _check_silu(vcfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        dtype, ops = self.qkv.weight.dtype, self.ops
        q, k, v = self.qkv(ops.rms_norm(x, self.norm1.weight, self.norm1.eps).to(dtype)).view(
            tokens, 3, self.num_heads, self.head_dim).unbind(1)
        ctx = varlen_attention(ops.rotate(q, cos, sin), ops.rotate(k, cos, sin), v, meta)
        x, h = ops.add_rms_norm(self.proj(ctx.reshape(tokens, -1)), x, self.norm2.weight, self.norm2.eps, dtype)
        return x + self.down_proj(ops.silu_mul(self.gate_up(h)))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, context_dim: int, merge: int):
        super().__init__()
        self.width = context_dim * merge * merge
        self.ln_q = RMSNorm(context_dim)
        self.fc1 = Linear(self.width, self.width, bias=True, activation="gelu")
        self.fc2 = Linear(self.width, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.ln_q(x).to(self.fc1.weight.dtype).view(-1, self.width)))


class VisionTransformer(nn.Module):
    def __init__(self, vcfg, out_dim: int, ops: FusedOps):
        super().__init__()
        self.patch = vcfg.patch_size
        self.merge = vcfg.spatial_merge_size
        self.window = vcfg.window_size
        self.full_blocks = frozenset(vcfg.fullatt_block_indexes)
        dim = vcfg.hidden_size
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * self.patch * self.patch
        self.patch_embed = Linear(patch_dim, dim, bias=False)  # the Conv3d with stride = kernel, as a GEMM
        self.blocks = nn.ModuleList(VisionBlock(vcfg, ops) for _ in range(vcfg.depth))
        self.merger = PatchMerger(out_dim, dim, self.merge)
        head_dim = dim // vcfg.num_heads
        theta = (getattr(vcfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.theta, self.rotary_dim = theta, head_dim // 2  # rows rotate one half of each head, columns the other

    def layout(self, grid_thw: list[tuple[int, int, int]]):
        """Host-side index work for a batch of images: merge-unit order by window, each patch's (row, col),
        and the lengths of the windows and of whole frames (both in window order)."""
        m, unit = self.merge, self.merge * self.merge
        ws = self.window // self.merge // self.patch  # window side in merge units
        order, rows, cols, windows, frames = [], [], [], [], []
        base = 0
        for t, h, w in grid_thw:
            lh, lw = h // m, w // m
            # Patch (row, col) in the processor's order: merge unit by merge unit, 2x2 inside each.
            r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            r = r.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
            c = c.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
            nh, nw = -(-lh // ws), -(-lw // ws)
            for f in range(t):
                grid = np.arange(lh * lw).reshape(lh, lw) + base + f * lh * lw
                for wi in range(nh):
                    for wj in range(nw):
                        block = grid[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(-1)
                        order.append(block)
                        windows.append(block.size * unit)
                frames.append(lh * lw * unit)
                rows.append(r)
                cols.append(c)
            base += t * lh * lw
        order = np.concatenate(order)
        return order, np.concatenate(rows), np.concatenate(cols), windows, frames

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        device = pixel_values.device
        unit = self.merge * self.merge
        order, rows, cols, windows, frames = self.layout(grid_thw)
        patch_order = torch.from_numpy((order[:, None] * unit + np.arange(unit)).reshape(-1)).to(device)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).index_select(0, patch_order)
        pos = torch.from_numpy(np.stack([rows, cols], 1)).to(device).index_select(0, patch_order)
        freqs = pos.float()[:, :, None] * inverse_frequencies(self.theta, self.rotary_dim, device)  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # rows' frequencies, then columns'
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if x.device.type == "cpu" and x.dtype != torch.float32:
            x = x.float()  # the CPU's mixed precision: fp32 residual stream, GEMMs in the weights' dtype
        window_meta = AttentionMetadata.from_seq_lens(windows, device)
        frame_meta = AttentionMetadata.from_seq_lens(frames, device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_meta if i in self.full_blocks else window_meta)
        merged = self.merger(x)
        restore = torch.from_numpy(np.argsort(order)).to(device)
        return merged.index_select(0, restore)


def _check_silu(cfg) -> None:
    if cfg.hidden_act != "silu":
        raise ValueError(f"Qwen2.5-VL with hidden_act={cfg.hidden_act!r} is not supported (only silu).")


# ----------------------------------------------------------------------------- the backbone
class Qwen2_5_VLModel(nn.Module):
    """Token ids (+ images) -> the last hidden state of every token, `[T, hidden]`."""

    causal = True
    compiles_fused_ops = True  # takes `compile_fused`

    def __init__(self, config, position_offset: int = 0, compile_fused: bool = True):
        """compile_fused: compile the elementwise chains for CUDA (`FusedOps`); False under enforce_eager."""
        super().__init__()
        self.config = config
        self.text_config = config.get_text_config()
        ops = FusedOps(compile_fused)
        self.text = Qwen2TextModel(self.text_config, ops)
        self.visual = VisionTransformer(config.vision_config, self.text_config.hidden_size, ops)
        self.image_token_id = config.image_token_id

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                images: BatchImages | None = None) -> torch.Tensor:
        x = self.text.embed_tokens(input_ids)
        if images is not None:
            pixels = torch.cat([im.pixel_values for im in images.inputs]).to(x.device, non_blocking=True)
            grids = [g for im in images.inputs for g in im.grid_thw]
            merge = self.visual.merge
            expected = sum(t * h * w // (merge * merge) for t, h, w in grids)
            if len(images.rows) != expected:
                raise ValueError(f"{len(images.rows)} image tokens in the batch but {expected} image embeddings.")
            embeds = self.visual(pixels, grids).to(x.dtype)
            x = x.index_copy(0, torch.from_numpy(images.rows).to(x.device, non_blocking=True), embeds)
        meta = AttentionMetadata(meta.cu_seqlens, meta.seq_lens, meta.max_seqlen, causal=True)
        return self.text(x, positions, meta)

    # ----- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a `Qwen2_5_VLForConditionalGeneration` checkpoint (old `model.layers` / `visual` names or
        transformers 5's `model.language_model` / `model.visual`); q/k/v and gate/up are stacked."""
        load_weights(self, weights, QWEN2_5_VL_WEIGHTS)


QWEN2_5_VL_WEIGHTS = WeightMap(
    prefixes=(("model.language_model.", "text."), ("model.visual.", "visual."), ("visual.", "visual."),
              ("language_model.model.", "text."), ("model.", "text.")),
    skip=("lm_head.",),
    renames=(
        (".self_attn.q_proj.", ".qkv.", 0), (".self_attn.k_proj.", ".qkv.", 1), (".self_attn.v_proj.", ".qkv.", 2),
        (".self_attn.o_proj.", ".o_proj.", None),
        (".mlp.gate_proj.", ".gate_up.", 0), (".mlp.up_proj.", ".gate_up.", 1), (".mlp.down_proj.", ".down_proj.", None),
        (".attn.qkv.", ".qkv.", None), (".attn.proj.", ".proj.", None),
        ("visual.patch_embed.proj.", "visual.patch_embed.", None),
        ("visual.merger.mlp.0.", "visual.merger.fc1.", None), ("visual.merger.mlp.2.", "visual.merger.fc2.", None),
    ),
    # The Conv3d patch embedding with stride = kernel is a GEMM over the flattened [C, T, 14, 14] patch.
    transforms={"visual.patch_embed.weight": lambda w: w.reshape(w.shape[0], -1)},
)


def _rope_parameters(cfg) -> dict:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None) or {}
    for key in ("mrope_section", "rope_type"):
        if key not in rope and key in legacy:
            rope[key] = legacy[key]
    if rope.get("rope_type") == "mrope":
        rope["rope_type"] = "default"
    return rope
