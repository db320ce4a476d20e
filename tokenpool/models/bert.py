"""BERT and RoBERTa / XLM-RoBERTa encoders (one implementation) over packed variable-length batches.

embeddings (word + position + token type, LayerNorm) -> N x [fused QKV -> varlen attention -> out proj ->
add & LayerNorm -> FFN -> add & LayerNorm] -> `[total_tokens, hidden]`. The RoBERTa family differs only in
its position ids, which start after the padding index (`padding_idx + 1 + i`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokenpool.layers.attention import AttentionMetadata, varlen_attention
from tokenpool.layers.linear import Linear
from tokenpool.loader.mapping import WeightMap, load_weights
from tokenpool.layers.norm import add_layer_norm_cast

# config.hidden_act -> `Linear` activation (fused into the FFN-in GEMM on the CPU)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


class BertEmbeddings(nn.Module):
    def __init__(self, config, position_offset: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(config.type_vocab_size, 1), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: every token has token type 0.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        try:
            act = _ACTIVATIONS[config.hidden_act]
        except KeyError:
            raise ValueError(f"Unsupported hidden_act {config.hidden_act!r}") from None
        self.qkv = Linear(hidden, 3 * hidden)
        self.qkv.packed_sizes = (hidden, hidden, hidden)  # q, k, v
        self.attn_out = Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = Linear(hidden, config.intermediate_size, activation=act)
        self.ffn_out = Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, x_gemm: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream `[T, hidden]`, wider than the GEMMs' dtype under bf16 on the CPU (fp32);
        x_gemm: x in the GEMMs' dtype. Returns both for the next layer (x may be updated in place)."""
        tokens = x.shape[0]
        gemm_dtype = self.qkv.weight.dtype
        q, k, v = self.qkv(x_gemm).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)  # 3 x [T, heads, head_dim]
        ctx = varlen_attention(q, k, v, meta).reshape(tokens, -1)
        x, x_gemm = add_layer_norm_cast(self.attn_out(ctx), x, self.attn_norm, gemm_dtype)
        return add_layer_norm_cast(self.ffn_out(self.ffn_in(x_gemm)), x, self.ffn_norm, gemm_dtype)


class BertModel(nn.Module):
    """The encoder backbone: token ids + per-sequence positions -> last hidden states `[T, hidden]`."""

    def __init__(self, config, position_offset: int = 0):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, position_offset)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embeddings(input_ids, positions)
        x_gemm = x.to(self.layers[0].qkv.weight.dtype) if len(self.layers) else x
        for layer in self.layers:
            x, x_gemm = layer(x, x_gemm, meta)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a Hugging Face checkpoint into this module (q, k, v stacked into the fused qkv)."""
        load_weights(self, weights, BERT_WEIGHTS)


# Hugging Face names -> ours. Prefixes of task models are stripped first; old TF-style LayerNorm names too.
BERT_WEIGHTS = WeightMap(
    prefixes=(("bert.", ""), ("roberta.", ""), ("model.", ""), ("encoder_model.", "")),
    skip=("pooler.", "cls.", "lm_head.", "classifier.", "embeddings.position_ids"),
    renames=(
        ("LayerNorm.gamma", "LayerNorm.weight", None), ("LayerNorm.beta", "LayerNorm.bias", None),
        ("encoder.layer.", "layers.", None),
        (".attention.self.query.", ".qkv.", 0), (".attention.self.key.", ".qkv.", 1),
        (".attention.self.value.", ".qkv.", 2),
        (".attention.output.dense.", ".attn_out.", None), (".attention.output.LayerNorm.", ".attn_norm.", None),
        (".intermediate.dense.", ".ffn_in.", None), (".output.dense.", ".ffn_out.", None),
        (".output.LayerNorm.", ".ffn_norm.", None),
    ),
)


def position_offset_for(config) -> int:
    """RoBERTa-style models number positions from `pad_token_id + 1`; BERT from 0."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "xlm_roberta"):
        return config.pad_token_id + 1
    return 0
