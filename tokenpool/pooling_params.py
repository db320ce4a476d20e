"""Per-request pooling options, vLLM-compatible (`PoolingParams`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """Options for one pooling request.

    Args:
        use_activation: normalize (embed, token_embed) or apply the head's activation (token_classify:
            ReLU for BGE-M3's sparse weights). ``None`` means the model's default.
        dimensions: Matryoshka truncation of `embed` vectors (renormalized when the activation is on).
        normalize: old name of ``use_activation``, still used by many scripts; accepted as an alias.
        activation: another old alias of ``use_activation``.
        truncate_prompt_tokens: keep at most this many tokens (``-1``: the model's context length).
        task: the pooling task; filled in by `LLM.encode` / the server, rarely set by hand.
        input_type: "query" or "document" for ColBERT models (markers, query expansion, the document
            skiplist); ``None`` means "document". Models without modes accept it and ignore it.
    """

    use_activation: bool | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    input_type: str | None = None

    def __post_init__(self) -> None:
        if self.input_type not in (None, "query", "document"):
            raise ValueError(f"input_type must be 'query' or 'document', got {self.input_type!r}.")
        for alias_name in ("normalize", "activation"):
            alias = getattr(self, alias_name)
            if alias is None:
                continue
            if self.use_activation is not None and self.use_activation != alias:
                raise ValueError(
                    f"PoolingParams got use_activation={self.use_activation} and {alias_name}={alias}; "
                    f"`{alias_name}` is an alias of `use_activation`, give one of them."
                )
            self.use_activation = alias
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}.")

    def clone(self) -> "PoolingParams":
        return PoolingParams(
            use_activation=self.use_activation,
            dimensions=self.dimensions,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            task=self.task,
            input_type=self.input_type,
        )
