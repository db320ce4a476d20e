"""ModernBERT over packed variable-length batches (answerdotai/ModernBERT-base and the ColBERT / dense models
built on it: GTE-ModernColBERT, gte-modernbert-base, ...).

Pre-norm encoder without biases (by default):

    h = LayerNorm_emb(tok_embeddings[ids])                       no position or token-type embeddings
    layer i: h = h + Wo(Attention(i == 0 ? h : LayerNorm_attn(h)))  rotary q/k, per-layer theta and window
             h = h + Wo_mlp(gelu(input) * gate), (input, gate) = Wi(LayerNorm_mlp(h))
    out = LayerNorm_final(h)

Layers alternate between global attention (the whole sequence, theta `global`) and local attention (a token
sees `local_attention // 2` tokens either side, theta `local`): FlashAttention's window on CUDA, the C
kernel's window (or a band mask) on the CPU. The config's two forms are read: transformers 4
(`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) and transformers 5 (`layer_types`,
`rope_parameters`), the latter deciding where both are present.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from torch import nn

from tokenpool.layers.activation import exact_gelu_mul_cuda
from tokenpool.layers import triton_attention
from tokenpool.layers.attention import AttentionMetadata, takes_triton, varlen_attention
from tokenpool.layers.fused import FusedOps
from tokenpool.layers.linear import Linear
from tokenpool.layers.rotary import RotaryEmbedding, rotate_heads_cuda_
from tokenpool.loader.mapping import WeightMap, load_weights

# config.hidden_activation -> F.gelu's `approximate`
_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclasses.dataclass(frozen=True)
class ModernBertLayout:
    """Which layers are local (sliding window) and the rotary theta of each kind, from either config form."""

    local: tuple[bool, ...]
    window: int  # local_attention: a local layer's token sees window // 2 tokens on each side
    global_theta: float
    local_theta: float

    @classmethod
    def from_config(cls, config) -> "ModernBertLayout":
        layers = config.num_hidden_layers
        types = getattr(config, "layer_types", None)
        if types:  # transformers 5: the list decides (a save may still carry the old integer)
            if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
                raise ValueError(f"ModernBERT layer_types {types} must name {layers} layers, each "
                                 "'full_attention' or 'sliding_attention'.")
            local = tuple(t == "sliding_attention" for t in types)
        else:  # transformers 4: layer i is global when i % n == 0
            every = getattr(config, "global_attn_every_n_layers", None) or 3
            local = tuple(i % every != 0 for i in range(layers))
        rope = getattr(config, "rope_parameters", None) or {}
        if "full_attention" in rope:
            global_theta = rope["full_attention"]["rope_theta"]
            local_theta = rope.get("sliding_attention", rope["full_attention"])["rope_theta"]
        else:
            global_theta = getattr(config, "global_rope_theta", None) or 160000.0
            # transformers 4: a null local theta means the global one
            local_theta = getattr(config, "local_rope_theta", None) or global_theta
        window = int(getattr(config, "local_attention", 128))
        if any(local) and window < 2:
            raise ValueError(f"ModernBERT local_attention {window} must be at least 2.")
        return cls(local, window, float(global_theta), float(local_theta))


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class ModernBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.Wqkv = Linear(hidden, 3 * hidden, bias=config.attention_bias)
        self.Wo = Linear(hidden, hidden, bias=config.attention_bias)


class ModernBertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.Wi = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)  # (input, gate)
        self.Wo = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)


class ModernBertLayer(nn.Module):
    def __init__(self, config, index: int, ops: FusedOps):
        super().__init__()
        hidden = config.hidden_size
        # Layer 0 reads the embedding norm's output directly (transformers: an Identity attention norm).
        self.attn_norm = nn.LayerNorm(hidden, eps=config.norm_eps, bias=config.norm_bias) if index else None
        self.attn = ModernBertAttention(config)
        self.mlp_norm = nn.LayerNorm(hidden, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernBertMLP(config)
        try:
            self.approximate = _GELU[config.hidden_activation]
        except KeyError:
            raise ValueError(f"Unsupported ModernBERT hidden_activation {config.hidden_activation!r}; "
                             f"supported: {', '.join(_GELU)}.") from None
        self.ops = ops

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor, triton_attention.Rotary | None],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream `[T, hidden]` (fp32 under bf16 GEMMs on the CPU); delta: the previous layer's
        MLP output, not yet added (None for layer 0 and where it was added in a GEMM); rope: per-token cos / sin
        and, on CUDA, the tables with which the Triton attention kernel rotates q itself. Returns (x, this
        layer's MLP output not yet added, or None where it was added in the GEMM).

        On CUDA (residual stream in the GEMM dtype, no biases on the output projections) the residual adds
        happen in the output projections' GEMMs (`x.addmm_`: cuBLAS reads x as its C operand), so only the
        LayerNorm is a pass of its own: 4 bytes per element moved instead of 8 (bench/NOTES.md).
        """
        ops, attn, mlp, dtype = self.ops, self.attn, self.mlp, self.attn.Wqkv.weight.dtype
        in_gemm = (x.is_cuda and x.dtype == dtype and attn.Wo.bias is None and mlp.Wo.bias is None
                   and GEMM_RESIDUAL)
        if self.attn_norm is None:  # layer 0
            a = x.to(dtype)
        elif delta is None:
            a = ops.layer_norm(x, self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps, dtype)
        else:
            x, a = ops.add_pre_layer_norm(delta, x, self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps,
                                          dtype)
        tokens = x.shape[0]
        qkv = attn.Wqkv(a)
        cos, sin, rotary = rope
        heads, head_dim = attn.num_heads, attn.head_dim
        q, k, v = qkv.view(tokens, 3, heads, head_dim).unbind(1)
        if (rotary is not None and takes_triton(q, k, v, meta)
                and rotate_heads_cuda_(qkv[:, heads * head_dim:], cos, sin, heads, head_dim)):  # k only
            ctx = triton_attention.varlen_attention(q, k, v, meta.seq_lens, meta.window_bounds, meta.tiles,
                                                    rotary=rotary)
        else:
            if not rotate_heads_cuda_(qkv, cos, sin, 2 * heads, head_dim):  # q and k, in place on CUDA
                q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
            ctx = varlen_attention(q, k, v, meta)
        ctx = ctx.reshape(tokens, -1)
        norm = self.mlp_norm
        if in_gemm:
            x = x.addmm_(ctx, attn.Wo.weight.t())
            m = ops.layer_norm(x, norm.weight, norm.bias, norm.eps, dtype)
        else:
            x, m = ops.add_pre_layer_norm(attn.Wo(ctx), x, norm.weight, norm.bias, norm.eps, dtype)
        h = mlp.Wi(m)
        act = exact_gelu_mul_cuda(h) if self.approximate == "none" else None
        if act is None:
            act = ops.gelu_mul(h, self.approximate)
        if in_gemm:
            return x.addmm_(act, mlp.Wo.weight.t()), None
        return x, mlp.Wo(act)


# TOKENPOOL_GEMM_RESIDUAL=0: the residual adds as separate passes on CUDA too (for A/B measurements).
GEMM_RESIDUAL = os.environ.get("TOKENPOOL_GEMM_RESIDUAL", "1") != "0"


class ModernBertModel(nn.Module):
    """The encoder backbone: token ids + per-sequence positions -> final-normed hidden states `[T, hidden]`."""

    compiles_fused_ops = True

    def __init__(self, config, position_offset: int = 0, compile_fused: bool = True):
        super().__init__()
        if position_offset:
            raise ValueError("ModernBERT numbers positions from 0 (rotary); a position offset is not supported.")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}.")
        self.config = config
        self.layout = ModernBertLayout.from_config(config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_global = RotaryEmbedding(head_dim, self.layout.global_theta)
        self.rotary_local = RotaryEmbedding(head_dim, self.layout.local_theta)
        ops = FusedOps(compile=compile_fused)
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertLayer(config, i, ops) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def local_window(self) -> int | None:
        """Tokens a local layer's token sees on each side, or None without local layers."""
        return self.layout.window // 2 if any(self.layout.local) else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        half = self.layout.window // 2
        local_meta = dataclasses.replace(meta, window=(half, half))
        tables = input_ids.is_cuda and triton_attention.enabled()  # q rotated inside the attention kernel

        def rope(rotary: RotaryEmbedding):
            cos, sin = rotary(positions)
            return cos, sin, triton_attention.Rotary(
                positions, *rotary.table(self.config.max_position_embeddings, positions.device)) if tables else None

        ropes = {False: rope(self.rotary_global)}
        if any(self.layout.local):
            ropes[True] = rope(self.rotary_local) if self.layout.local_theta != self.layout.global_theta \
                else ropes[False]
        x, delta = self.embeddings(input_ids), None
        for layer, local in zip(self.layers, self.layout.local):
            x, delta = layer(x, delta, ropes[local], local_meta if local else meta)
        if delta is not None:
            x = x + delta
        return self.final_norm(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a ModernBertModel or ModernBertForMaskedLM checkpoint into this module (the MLM head is skipped)."""
        load_weights(self, weights, MODERNBERT_WEIGHTS)


# Our module names are the checkpoint's: only task-model prefixes and heads differ.
MODERNBERT_WEIGHTS = WeightMap(
    prefixes=(("model.", ""), ("0.auto_model.", "")),
    skip=("head.", "decoder.", "classifier.", "drop."),
)
