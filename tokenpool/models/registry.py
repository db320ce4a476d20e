"""Architecture name -> backbone, and the poolers a model folder provides."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tokenpool.config import PoolerConfig
from tokenpool.layers.norm import RMSNorm
from tokenpool.layers.pooler import embed_pooler, token_pooler
from tokenpool.layers.pooling import TokenPooling
from tokenpool.loader.colbert import read_colbert_settings, stanford_projection
from tokenpool.loader.st_config import SentenceTransformerConfig
from tokenpool.loader.weights import checkpoint_files, iterate_weights
from tokenpool.models.bert import BertModel, position_offset_for
from tokenpool.models.bge_m3 import build_bge_m3_poolers, has_bge_m3_heads
from tokenpool.models.modernbert import ModernBertModel
from tokenpool.models.pooling_model import PoolingModel
from tokenpool.models.qwen2_5_vl import Qwen2_5_VLModel

logger = logging.getLogger("tokenpool")

# config.architectures -> backbone class. Heads of task models (MLM, pretraining) are not used.
ARCHITECTURES = {
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "BertForPreTraining": BertModel,
    "RobertaModel": BertModel,
    "RobertaForMaskedLM": BertModel,
    "XLMRobertaModel": BertModel,
    "XLMRobertaForMaskedLM": BertModel,
    "BgeM3EmbeddingModel": BertModel,
    "HF_ColBERT": BertModel,  # Stanford ColBERT
    "ModernBertModel": ModernBertModel,
    "ModernBertForMaskedLM": ModernBertModel,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLModel,
    "Qwen2_5_VLModel": Qwen2_5_VLModel,
}

_POOLING_TYPE_TO_MODE = {"CLS": "cls", "MEAN": "mean", "LAST": "lasttoken", "MAX": "max"}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def build_model(model_dir: Path, hf_config, st_config: SentenceTransformerConfig,
                pooler_config: PoolerConfig | None, dtype: torch.dtype, device: torch.device,
                compile_fused: bool = True) -> PoolingModel:
    """Instantiate the backbone on `device` in `dtype`, load its weights, and attach the task poolers.

    compile_fused: backbones with compiled elementwise chains (`FusedOps`) compile them; False keeps eager ops.
    """
    architectures = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in architectures if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"Model architecture {architectures or '(none in config.json)'} is not supported. "
            f"Supported: {', '.join(supported_architectures())}."
        )
    colbert = read_colbert_settings(model_dir, hf_config, st_config)
    backbone_cls = ARCHITECTURES[arch]
    decoder = getattr(backbone_cls, "causal", False)
    offset = 0 if decoder else position_offset_for(hf_config)
    with torch.device("meta"):
        extra = {"compile_fused": compile_fused} if getattr(backbone_cls, "compiles_fused_ops", False) else {}
        backbone = backbone_cls(hf_config, position_offset=offset, **extra)
    if colbert is not None:
        _check_expansion_window(colbert, backbone)
    backbone = backbone.to(dtype)
    hidden_dtype = dtype
    if device.type == "cpu" and dtype != torch.float32:
        # Mixed precision with the casts done once: GEMMs in `dtype`, the residual stream (embeddings, residual
        # adds, LayerNorms) in fp32. Free on the CPU, and it keeps every token's cosine to the fp32 model
        # >= 0.999 (bf16 residuals: min 0.998 on bench/cpu_token_embed.py's corpus).
        for module in backbone.modules():
            if isinstance(module, (torch.nn.LayerNorm, RMSNorm, torch.nn.Embedding)):
                module.float()
        hidden_dtype = torch.float32
    backbone = backbone.to_empty(device=device)
    stanford: dict[str, torch.Tensor] = {}
    backbone.load_weights(_set_aside(iterate_weights(checkpoint_files(model_dir)),
                                     ("linear.weight",) if arch == "HF_ColBERT" else (),
                                     stanford))
    backbone.eval().requires_grad_(False)

    bge_m3 = has_bge_m3_heads(model_dir)
    if arch == "BgeM3EmbeddingModel" and not bge_m3:
        raise ValueError(f"BgeM3EmbeddingModel needs colbert_linear.pt and sparse_linear.pt in {model_dir}.")
    if colbert is not None:
        if colbert.format == "stanford" and "linear.weight" not in stanford:
            raise ValueError(f"{model_dir}: a Stanford ColBERT checkpoint (HF_ColBERT) without linear.weight.")
        dense = colbert.dense or [stanford_projection(stanford)]
        logger.info("ColBERT checkpoint (%s format): token_embed in query and document modes", colbert.format)
        poolers = {"token_embed": token_pooler("token_embed", torch.nn.Sequential(*(d.build() for d in dense)))}
    elif bge_m3:
        logger.info("BGE-M3 heads found in %s: embed (dense), token_embed (colbert), token_classify (sparse)", model_dir)
        poolers = build_bge_m3_poolers(model_dir)
    else:
        # Without a pooling config, vLLM pools encoders by CLS and decoders by their last token.
        poolers = _sentence_transformer_poolers(st_config, "lasttoken" if decoder else "cls")
    if pooler_config is not None and pooler_config.pooling_type is not None and "embed" in poolers:
        poolers["embed"].method.modes = [_POOLING_TYPE_TO_MODE[pooler_config.pooling_type]]
    for pooler in poolers.values():
        pooler.to(device)
        if isinstance(pooler.method, TokenPooling) and pooler.head.proj is not None:
            pooler.head.proj.to(hidden_dtype)  # per-token heads run in the precision of the hidden states
    max_model_len = hf_config.get_text_config().max_position_embeddings - offset
    model = PoolingModel(backbone, poolers, max_model_len, lexical_head=bge_m3, name=arch, colbert=colbert)
    return model.eval().requires_grad_(False)


def _check_expansion_window(colbert, backbone) -> None:
    """Query expansion positions that are not keys must each see a key in local (windowed) layers. Supported:
    queries no longer than the window's reach (every query row then sees every key row, as in every released
    ModernBERT ColBERT: query_length 32, window 64 either side); longer ones have no reference behaviour."""
    reach = getattr(backbone, "local_window", None)
    if reach is not None and colbert.expansion and not colbert.attend_expansion and colbert.query_length - 1 > reach:
        raise ValueError(
            f"query_length {colbert.query_length} with non-attended query expansion is longer than the local "
            f"attention window reaches ({reach} tokens each side): expansion positions far from the text would "
            f"see no key. Supported: query_length <= {reach + 1}, or attend_to_expansion_tokens true.")


def _set_aside(weights, names: tuple[str, ...], into: dict):
    """`weights` without the tensors named in `names`, which go into `into` (heads stored in the backbone's file)."""
    for name, tensor in weights:
        if name in names:
            into[name] = tensor
        else:
            yield name, tensor


def _sentence_transformer_poolers(st: SentenceTransformerConfig, default_mode: str = "cls") -> dict:
    """embed follows modules.json (pooling, Dense, Normalize); token_embed = normalized hidden states."""
    modes = st.pooling_modes or [default_mode]
    dense = [spec.build() for spec in st.dense]
    # Without modules.json vLLM normalizes by default; with it, the folder's Normalize module decides.
    normalize = st.normalize if st.has_modules else True
    return {
        "embed": embed_pooler(modes, dense, normalize),
        "token_embed": token_pooler("token_embed"),
    }
