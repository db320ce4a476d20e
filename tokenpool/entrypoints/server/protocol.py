"""Request and response bodies of the HTTP API (vLLM's and OpenAI's field names and shapes).

Requests are validated by these models (a failure is a 400 with a readable message). Responses are built
as plain dicts and serialized with orjson for speed; the response models here describe them in the
OpenAPI schema that FastAPI publishes.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from tokenpool.tasks import PoolingTask, ScoreTask

EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]
EmbedDType = Literal["float32", "float16", "bfloat16"]
Endianness = Literal["native", "little", "big"]

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptInput = Union[
    NonEmptyStr,
    Annotated[list[NonEmptyStr], Field(min_length=1)],
    TokenIds,
    Annotated[list[TokenIds], Field(min_length=1)],
]
TextOrTexts = Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]]


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored, as vLLM and OpenAI do (clients send e.g. `user`, `cache_salt`). Strict
    # types: the schema says boolean / integer, so "true" or 5.0 are refused rather than coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def optional(description: str | None = None, **kwargs):
    """A field that may be left out but not sent as null (one of several alternatives, see `one_of`)."""
    return Field(None, description=description, json_schema_extra=_no_default, **kwargs)


def one_of(*groups: tuple[str, ...]) -> ConfigDict:
    """Schema: for each group, exactly one of its fields is present (the validators enforce the same)."""
    rules = [{"oneOf": [{"required": [name]} for name in group]} for group in groups]
    return ConfigDict(extra="ignore", strict=True,
                      json_schema_extra=rules[0] if len(rules) == 1 else {"allOf": rules})


# ----- chat-style inputs (`messages`) -----
class ImageURL(OpenAIBaseModel):
    url: NonEmptyStr = Field(description="http(s)://, data:image/...;base64,... or file:// URL of the image.")
    detail: str | None = None


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: StrictStr


class ImagePart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(OpenAIBaseModel):
    role: StrictStr
    content: Union[StrictStr, list[ContentPart]]


# ----- shared request fields -----
class _PoolingOptions(OpenAIBaseModel):
    model: str | None = Field(None, description="Must name the served model when given.")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep only the last k tokens of each prompt; -1 means the model's context length.")
    use_activation: bool | None = Field(
        None, description="Normalize (embed/token_embed) or apply the head's activation (token_classify). "
                          "Default: the model's.")
    normalize: bool | None = Field(None, description="Old name of `use_activation` (accepted as an alias).")
    request_id: str | None = Field(None, description="Echoed in the response id.")
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1,
                          description="Only 0 is accepted: this server schedules first come, first served.")
    user: str | None = None

    @model_validator(mode="after")
    def _alias(self):
        if self.normalize is not None:
            if self.use_activation is not None and self.use_activation != self.normalize:
                raise ValueError("`normalize` is an alias of `use_activation`; give one of them.")
            self.use_activation = self.normalize
        return self


class _Encoding(OpenAIBaseModel):
    encoding_format: EncodingFormat = Field(
        "float", description="float: nested JSON lists; base64: raw bytes of each item (with its `shape`); "
                             "bytes: the concatenated raw arrays as the body, a `metadata` header describes them; "
                             "bytes_only: the same without the header.")
    embed_dtype: EmbedDType = Field("float32", description="Element type of base64/bytes encodings.")
    endianness: Endianness = Field("native", description="Byte order of base64/bytes encodings.")


class _Inputs(OpenAIBaseModel):
    model_config = one_of(("input", "messages"))

    input: PromptInput = optional(
        "A string, a list of strings, a list of token ids or a list of lists of token ids.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = optional(
        "Chat-style input (one prompt); image parts need an image model.")
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (default: true for `input`, false for `messages`).")
    mm_processor_kwargs: dict | None = None
    input_type: Literal["query", "document"] | None = Field(
        None, description="ColBERT models: encode as a query (marker, expansion) or a document (marker, skiplist; "
                          "the default). Models without modes ignore it.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` or `messages`.")
        return self


# ----- requests -----
class PoolingRequest(_Inputs, _Encoding, _PoolingOptions):
    """POST /pooling (vLLM)."""

    task: PoolingTask | None = Field(
        None, description="embed | token_embed | token_classify; default token_embed when the model has it.")
    dimensions: int | None = Field(None, ge=1, description="Matryoshka truncation (embed only).")


class EmbeddingRequest(_Inputs, _Encoding, _PoolingOptions):
    """POST /v1/embeddings (OpenAI); always the `embed` task."""

    dimensions: int | None = Field(None, ge=1, description="Matryoshka truncation of the embedding.")


class ScoreRequest(_PoolingOptions):
    """POST /score, /v1/score: 1 x N, N x 1 or N x N (pairwise) scores."""

    model_config = one_of(("text_1", "data_1", "queries"), ("text_2", "data_2", "documents"))

    text_1: TextOrTexts = optional("The left side: one text or a list.")
    text_2: TextOrTexts = optional("The right side: one text or a list.")
    data_1: TextOrTexts = optional("Alias of text_1.")
    data_2: TextOrTexts = optional("Alias of text_2.")
    queries: TextOrTexts = optional("Alias of text_1.")
    documents: TextOrTexts = optional("Alias of text_2.")
    task: ScoreTask | None = Field(
        None, description="embed: cosine of pooled embeddings (default when the model has it); token_embed: "
                          "late interaction, MaxSim = sum over query tokens of the best dot product.")
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _sides(self):
        for side, names in ((1, ("text_1", "data_1", "queries")), (2, ("text_2", "data_2", "documents"))):
            given = [n for n in names if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of {', '.join(names)} (got {len(given)}).")
        return self

    def left(self) -> list[str]:
        value = self.text_1 if self.text_1 is not None else self.data_1 if self.data_1 is not None else self.queries
        return [value] if isinstance(value, str) else list(value)

    def right(self) -> list[str]:
        value = self.text_2 if self.text_2 is not None else self.data_2 if self.data_2 is not None else self.documents
        return [value] if isinstance(value, str) else list(value)


class RerankRequest(_PoolingOptions):
    """POST /rerank, /v1/rerank: documents sorted by relevance to the query."""

    query: NonEmptyStr
    documents: Annotated[list[NonEmptyStr], Field(min_length=1)]
    top_n: int = Field(0, ge=0, description="Return only the best n (0: all).")
    return_documents: bool = True
    task: ScoreTask | None = Field(None, description="As in /score: embed (cosine) or token_embed (MaxSim).")
    add_special_tokens: bool = True


class TokenizeRequest(OpenAIBaseModel):
    model_config = one_of(("prompt", "messages"))

    model: str | None = None
    prompt: StrictStr = optional("The text to tokenize.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = optional("Chat-style input.")
    add_special_tokens: bool | None = Field(None, description="Default: true for `prompt`, false for `messages`.")
    return_token_strs: bool = False
    input_type: Literal["query", "document"] | None = Field(
        None, description="ColBERT models: encode as a query (marker, expansion) or a document (marker, skiplist; "
                          "the default). Models without modes ignore it.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`.")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[TokenId]


class BgeM3Request(_Encoding, _PoolingOptions):
    """POST /v1/bge_m3: dense + sparse + multi-vector outputs of each input from one call (BGE-M3 models)."""

    input: PromptInput
    add_special_tokens: bool = True
    return_dense: bool = True
    return_sparse: bool = True
    return_colbert_vecs: bool = True
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON lists; base64: raw bytes of each array (see `*_shape`).")


# ----- responses (documentation of the dicts the routes send) -----
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict | None = None


class PoolingResponseData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str
    shape: list[int] | None = Field(None, description="Shape of the item (base64 only; a tokenpool extension).")


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class EmbeddingResponseData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    shape: list[int] | None = None


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class ScoreResponseData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None
    relevance_score: float


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenpool"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str


class LexicalWeight(BaseModel):
    token_id: int
    token: str
    weight: float


class BgeM3ResponseData(BaseModel):
    index: int
    object: Literal["bge_m3"] = "bge_m3"
    dense_vecs: list[float] | str | None = Field(None, description="CLS embedding, normalized: [dim].")
    dense_shape: list[int] | None = None
    lexical_weights: list[LexicalWeight] | None = Field(
        None, description="Sparse weights by token id (special tokens and zeros dropped, max over repeats), "
                          "in order of first appearance.")
    colbert_vecs: list[list[float]] | str | None = Field(
        None, description="Multi-vector: one normalized row per token but the first: [num_tokens - 1, dim].")
    colbert_shape: list[int] | None = None


class BgeM3Response(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[BgeM3ResponseData]
    usage: UsageInfo


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----- the multi-vector index (tokenpool serve --index DIR) -----
# the offline index's rule (tokenpool/index/multivector.py `_check_id`): ints in a signed 64-bit range, non-empty strs
DocumentId = Union[Annotated[StrictInt, Field(ge=0, le=(1 << 63) - 1)], Annotated[StrictStr, Field(min_length=1)]]
_TRUNCATE = "Keep only the last n tokens of each text (as /pooling's truncate_prompt_tokens)."


class IndexDocumentsRequest(OpenAIBaseModel):
    """POST /v1/index/documents: embed `input` in document mode and add it under `ids` (upsert)."""

    model: str | None = Field(None, description="Must name the served model when given.")
    ids: list[DocumentId] = Field(min_length=1, description="The caller's ids (int in 0..2^63-1, or a non-empty "
                                                           "str), one per input.")
    input: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(description="The documents' texts.")
    metadata: list[dict[str, Any] | None] | None = Field(None, description="Optional JSON object per document.")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description=_TRUNCATE)


class IndexDeleteRequest(OpenAIBaseModel):
    """POST /v1/index/delete: remove documents (all or nothing: an unknown id is a 404)."""

    model: str | None = Field(None, description="Must name the served model when given.")
    ids: list[DocumentId] = Field(min_length=1)


class SearchRequest(OpenAIBaseModel):
    """POST /v1/search: the `k` best documents per query, by MaxSim (queries embedded in query mode)."""

    model: str | None = None
    query: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(description="One query or a list.")
    k: int = Field(10, ge=1, le=10000)
    truncate_prompt_tokens: int | None = Field(None, ge=1, description=_TRUNCATE)
    exact: bool | None = Field(None, description="Residual index: score every document with its decoded vectors "
                                                 "instead of generating candidates.")
    candidates: int | None = Field(None, ge=1, le=1_000_000, description="Residual index: documents scored exactly "
                                                                        "per query (default max(256, 16 k)).")
    nprobe: int | None = Field(None, ge=1, le=65536, description="Residual index: centroids probed per query row "
                                                                "(default 8).")
