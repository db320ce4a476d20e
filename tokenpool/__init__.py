"""tokenpool: an inference engine and server for pooling models (token embeddings first)."""

from tokenpool.config import EngineArgs, PoolerConfig
from tokenpool.entrypoints.llm import LLM
from tokenpool.inputs.data import TextPrompt, TokensPrompt
from tokenpool.outputs import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from tokenpool.pooling_params import PoolingParams
from tokenpool.version import __version__

__all__ = [
    "LLM",
    "EngineArgs",
    "PoolerConfig",
    "PoolingParams",
    "TextPrompt",
    "TokensPrompt",
    "PoolingOutput",
    "PoolingRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
    "__version__",
]
