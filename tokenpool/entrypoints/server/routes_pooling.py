"""POST /pooling (vLLM), /v1/embeddings (OpenAI) and /v1/bge_m3 (tokenpool: dense + sparse + colbert)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tokenpool.entrypoints.server.encoding import bytes_response, encode_item, json_response
from tokenpool.entrypoints.server.errors import APIError
from tokenpool.entrypoints.server.protocol import (
    BgeM3Request,
    BgeM3Response,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    PoolingRequest,
    PoolingResponse,
)
from tokenpool.entrypoints.server.serving import ServingState
from tokenpool.outputs import PoolingOutput, PoolingRequestOutput
from tokenpool.tasks import COMBINED_TASK

router = APIRouter()


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of the error answers a route can give (every one has the same body)."""
    text = {400: "Invalid request (validation, unsupported task, prompt too long, ...)",
            401: "Missing or invalid API key (when the server has one)", 404: "Unknown model",
            413: "Request body too large", 429: "Too many concurrent requests",
            501: "The model cannot serve this API", 503: "The engine is dead"}
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


WORK_ERRORS = error_responses(400, 401, 404, 413, 429, 503)
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _state(raw_request: Request) -> ServingState:
    return raw_request.app.state.serving


def _usage(n: int) -> dict[str, Any]:
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}


def _list_response(s: ServingState, prefix: str, request: Any, route: str, outputs: list[PoolingRequestOutput],
                   object_name: str, value_key: str) -> Response:
    """The JSON (float/base64) or binary (bytes) answer of /pooling and /v1/embeddings."""
    n = s.count_tokens(route, outputs)
    rid = s.response_id(prefix, request.request_id)
    created = int(time.time())
    model = request.model or s.model_name
    fmt = request.encoding_format
    if fmt in ("bytes", "bytes_only"):
        meta = None if fmt == "bytes_only" else {"id": rid, "created": created, "model": model, "usage": _usage(n)}
        return bytes_response([o.outputs.data for o in outputs], request.embed_dtype, request.endianness, meta)
    data = []
    for index, out in enumerate(outputs):
        value, shape = encode_item(out.outputs.data, fmt, request.embed_dtype, request.endianness)
        item = {"index": index, "object": object_name, value_key: value}
        if shape is not None:
            item["shape"] = shape
        data.append(item)
    return json_response({"id": rid, "object": "list", "created": created, "model": model, "data": data,
                          "usage": _usage(n)})


@router.post(
    "/pooling", response_model=PoolingResponse,
    responses={200: {"content": _BINARY, "description": "JSON, or raw arrays for encoding_format=bytes"},
               **WORK_ERRORS},
    summary="Pool inputs with any task the model supports (vLLM's pooling API)",
)
async def create_pooling(request: PoolingRequest, raw_request: Request) -> Response:
    """`task` picks the output: `token_embed` ([num_tokens, dim] per input; the default when the model has
    it), `embed` ([dim]), `token_classify` ([num_tokens], e.g. BGE-M3's sparse weights)."""
    s = _state(raw_request)
    s.check_model(request.model)
    s.check_common(request.priority)
    task = request.task or s.default_task
    s.check_task(task)
    params = s.pooling_params(task, request.use_activation, request.dimensions, request.input_type)
    token_ids = await s.tokenize_input(request.input, request.messages, request.truncate_prompt_tokens,
                                       request.add_special_tokens, request.mm_processor_kwargs, request.input_type)
    outputs = await s.encode(raw_request, token_ids, task, params)
    return _list_response(s, "pooling", request, "/pooling", outputs, "pooling", "data")


@router.post(
    "/v1/embeddings", response_model=EmbeddingResponse,
    responses={200: {"content": _BINARY, "description": "JSON, or raw arrays for encoding_format=bytes"},
               **WORK_ERRORS, **error_responses(501)},
    summary="OpenAI embeddings (the `embed` task)",
)
async def create_embeddings(request: EmbeddingRequest, raw_request: Request) -> Response:
    s = _state(raw_request)
    s.check_model(request.model)
    s.check_common(request.priority)
    s.require_task("embed", "Embeddings API")
    params = s.pooling_params("embed", request.use_activation, request.dimensions, request.input_type)
    token_ids = await s.tokenize_input(request.input, request.messages, request.truncate_prompt_tokens,
                                       request.add_special_tokens, request.mm_processor_kwargs, request.input_type)
    outputs = await s.encode(raw_request, token_ids, "embed", params)
    return _list_response(s, "embd", request, "/v1/embeddings", outputs, "embedding", "embedding")


@router.post(
    "/v1/bge_m3", response_model=BgeM3Response, responses={**WORK_ERRORS, **error_responses(501)},
    summary="BGE-M3: dense + sparse (lexical weights) + multi-vector (colbert) per input, in one call",
)
async def create_bge_m3(request: BgeM3Request, raw_request: Request) -> Response:
    """FlagEmbedding's `BGEM3FlagModel.encode(..., return_dense, return_sparse, return_colbert_vecs)` over HTTP."""
    s = _state(raw_request)
    s.check_model(request.model)
    s.check_common(request.priority)
    if not s.lexical_head or not s.has_combined_task:
        raise APIError(f"The model `{s.model_name}` has no BGE-M3 heads (colbert_linear.pt + sparse_linear.pt); "
                       "/v1/bge_m3 needs them.", status=501)
    wanted = [task for flag, task in ((request.return_dense, "embed"), (request.return_colbert_vecs, "token_embed"),
                                      (request.return_sparse, "token_classify")) if flag]
    if not wanted:
        raise APIError("Nothing to return: set at least one of return_dense, return_sparse, return_colbert_vecs.")
    token_ids = await s.tokenize_input(request.input, None, request.truncate_prompt_tokens,
                                       request.add_special_tokens)
    parts = await _bge_m3_parts(s, raw_request, token_ids, wanted, request.use_activation)
    n = s.add_prompt_tokens("/v1/bge_m3", sum(len(ids) for ids in token_ids))
    tokens: dict[int, str] = {}
    if request.return_sparse:
        ids = sorted({tid for p in parts for tid in p["token_classify"].lexical_weights or {}})
        strs = await s.engine.run_in_tokenizer_thread(s.processor.tokenizer.convert_ids_to_tokens, ids)
        tokens = dict(zip(ids, strs))
    data = []
    fmt, dtype, order = request.encoding_format, request.embed_dtype, request.endianness
    for index, p in enumerate(parts):
        item: dict[str, Any] = {"index": index, "object": "bge_m3"}
        if request.return_dense:
            dense = p["embed"].data
            item["dense_vecs"], _ = encode_item(dense, fmt, dtype, order)
            item["dense_shape"] = list(dense.shape)
        if request.return_sparse:
            weights = p["token_classify"].lexical_weights or {}
            item["lexical_weights"] = [{"token_id": t, "token": tokens[t], "weight": w} for t, w in weights.items()]
        if request.return_colbert_vecs:
            colbert = p["token_embed"].data
            item["colbert_vecs"], _ = encode_item(colbert, fmt, dtype, order)
            item["colbert_shape"] = list(colbert.shape)
        data.append(item)
    return json_response({"id": s.response_id("bgem3", request.request_id), "object": "list",
                          "created": int(time.time()), "model": request.model or s.model_name, "data": data,
                          "usage": _usage(n)})


async def _bge_m3_parts(s: ServingState, raw_request: Request, prompts: list, wanted: list[str],
                        use_activation: bool | None) -> list[dict[str, PoolingOutput]]:
    """Per input, {task: PoolingOutput} (`.data`, and `.lexical_weights` for token_classify), from the engine's
    combined task: one request and one forward pass per input (`outputs.data` a dict of the three outputs)."""
    params = s.pooling_params(COMBINED_TASK, use_activation, None)
    outputs = await s.encode(raw_request, prompts, COMBINED_TASK, params)
    return [{"embed": PoolingOutput(out.outputs.data["embed"]),
             "token_embed": PoolingOutput(out.outputs.data["token_embed"]),
             "token_classify": PoolingOutput(out.outputs.data["token_classify"], out.outputs.lexical_weights)}
            for out in outputs]
