"""/tokenize, /detokenize, /v1/models, /health, /version, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from tokenpool.entrypoints.server.encoding import json_response
from tokenpool.entrypoints.server.errors import APIError, error_response
from tokenpool.entrypoints.server.media import parse_messages
from tokenpool.entrypoints.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from tokenpool.entrypoints.server.routes_pooling import error_responses
from tokenpool.entrypoints.server.serving import ServingState
from tokenpool.version import __version__

router = APIRouter()
_TOKEN_ERRORS = error_responses(400, 401, 404, 413, 429)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_TOKEN_ERRORS,
             summary="Tokenize a prompt (no length limit is applied: compare `count` with `max_model_len`)")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> Response:
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    tokenizer = s.processor.tokenizer
    images = False
    if request.messages is not None:
        chat = await s.engine.run_in_tokenizer_thread(
            parse_messages, request.messages, s.media, s.supports_images, tokenizer, s.image_placeholder)
        text, default_add, images = chat.text, not getattr(tokenizer, "chat_template", None), bool(chat.image_urls)
    else:
        text, default_add = request.prompt, True
    add = default_add if request.add_special_tokens is None else request.add_special_tokens
    # With images the placeholders are expanded as for pooling (the images are read and preprocessed).
    expanded = (await s.tokenize_input(None, request.messages, None, add))[0] if images else None

    def run() -> tuple[list[int], list[str] | None]:
        if expanded is not None:
            ids = expanded.token_ids
        elif s.input_types:  # a ColBERT model: the ids of the mode (markers, expansion)
            ids = s.processor.process([text], None, add, 0, [request.input_type])[0].token_ids
        else:
            ids = s.processor.tokenize([text], None, add)[0]
        return ids, tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None

    ids, strs = await s.engine.run_in_tokenizer_thread(run)
    return json_response({"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids, "token_strs": strs})


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_TOKEN_ERRORS,
             summary="Token ids back to text")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> Response:
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    vocab = s.core.info.vocab_size
    bad = [t for t in request.tokens if t >= vocab]
    if bad:
        raise APIError(f"Token id {bad[0]} is out of the vocabulary (size {vocab}).", param="tokens")
    text = await s.engine.run_in_tokenizer_thread(s.processor.tokenizer.decode, request.tokens)
    return json_response({"prompt": text})


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401), summary="The served model")
async def list_models(raw_request: Request) -> Response:
    s: ServingState = raw_request.app.state.serving
    cards = [{"id": name, "object": "model", "created": s.created, "owned_by": "tokenpool", "root": s.model_root,
              "parent": None, "max_model_len": s.max_model_len} for name in s.served_names]
    return json_response({"object": "list", "data": cards})


@router.get("/health", responses={200: {"description": "The engine is alive (empty body)"},
                                  **error_responses(503)},
            summary="Liveness: 200 with an empty body, 503 when the engine is dead (no API key needed)",
            response_class=Response)
async def health(raw_request: Request) -> Response:
    s: ServingState = raw_request.app.state.serving
    if s.engine.is_healthy:
        return Response(status_code=200)
    error = s.engine.dead_error
    return error_response(503, f"The engine is dead: {type(error).__name__}: {error}" if error else
                          "The engine is not running.")


@router.get("/version", response_model=VersionResponse, responses=error_responses(401), summary="Server version")
async def version() -> Response:
    return json_response({"version": __version__})


@router.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                                         "description": "Prometheus text format"}, **error_responses(401)},
            summary="Prometheus metrics", response_class=Response)
async def metrics(raw_request: Request) -> Response:
    s: ServingState = raw_request.app.state.serving
    return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)
