"""Request outputs, shaped like vLLM's (`PoolingRequestOutput`, `EmbeddingRequestOutput`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch


@dataclass
class PoolingOutput:
    """What a pooling task produced for one request.

    `data` is `[dim]` for embed, `[num_tokens, dim]` for token_embed, `[num_tokens]` for token_classify,
    and for the combined task "all" (models with a sparse head, i.e. BGE-M3) a dict of those three, computed
    from one forward pass.
    `lexical_weights` is set for sparse heads (BGE-M3 token_classify): the weight of each token id in the
    prompt, special tokens dropped, max over repeated ids, only weights > 0 (FlagEmbedding's format, with
    int keys).
    """

    data: torch.Tensor | dict[str, torch.Tensor]
    lexical_weights: dict[int, float] | None = None


@dataclass
class EmbeddingOutput:
    """One pooled embedding as a list of floats (`llm.embed`)."""

    embedding: list[float]

    @classmethod
    def from_base(cls, output: PoolingOutput) -> "EmbeddingOutput":
        if output.data.ndim != 1:
            raise ValueError(f"embed output must be 1-D, got shape {tuple(output.data.shape)}")
        return cls(output.data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ScoringOutput:
    """A relevance score between two inputs (`llm.score`)."""

    score: float


_O = TypeVar("_O")


@dataclass
class PoolingRequestOutput(Generic[_O]):
    """The finished result of one request."""

    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput[PoolingOutput]) -> "EmbeddingRequestOutput":
        return cls(
            request_id=out.request_id,
            outputs=EmbeddingOutput.from_base(out.outputs),
            prompt_token_ids=out.prompt_token_ids,
            finished=out.finished,
        )


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    pass


@dataclass
class BatchOutput:
    """The outputs of one finished batch without per-request copies (`LLMEngine.step_batch`).

    flat: every output's values in one float32 tensor; outputs: the finished requests, whose `outputs.data`
    are views of `flat` (a dict of views for the combined task). Aborted requests are left out.
    """

    flat: torch.Tensor
    outputs: list[PoolingRequestOutput]

    @property
    def request_ids(self) -> list[str]:
        return [o.request_id for o in self.outputs]

    @property
    def offsets(self) -> list[int]:
        """Where each request's values start in `flat` (elements; requests with tensor outputs)."""
        base = self.flat.storage_offset()
        return [o.outputs.data.storage_offset() - base for o in self.outputs if isinstance(o.outputs.data, torch.Tensor)]
