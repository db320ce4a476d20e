"""The multi-vector index over HTTP (`tokenpool serve MODEL --index DIR`): add documents, delete, search, stats.

    POST /v1/index/documents {"ids": [...], "input": [...texts], "metadata": [...]?}   embed (document mode), add
    POST /v1/index/delete    {"ids": [...]}                                             all or nothing
    POST /v1/search          {"query": str | [str], "k": 10}                            MaxSim top-k per query
                             (residual index: "exact", "candidates", "nprobe" as MultiVectorIndex.search)
    GET  /v1/index                                                                       documents, dim, codec, ...

Writes go to the index in a worker thread (they fsync); the index serializes them, and a search reads one
committed version, so it sees each add entirely or not at all.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from tokenpool.entrypoints.server.encoding import json_response
from tokenpool.entrypoints.server.errors import APIError
from tokenpool.entrypoints.server.protocol import IndexDeleteRequest, IndexDocumentsRequest, SearchRequest
from tokenpool.entrypoints.server.routes_pooling import WORK_ERRORS, error_responses
from tokenpool.entrypoints.server.serving import ServingState

router = APIRouter()
INDEX_PATHS = frozenset({"/v1/index/documents", "/v1/index/delete", "/v1/search"})


def _index(s: ServingState):
    if s.index is None:
        raise APIError("This server has no index: start it with `tokenpool serve MODEL --index DIR`.", status=404)
    return s.index


def _usage(n: int) -> dict:
    return {"prompt_tokens": n, "total_tokens": n}


async def _embed(s: ServingState, raw_request: Request, texts: list[str], side: str, truncate: int | None):
    mode = side if s.input_types else None
    token_ids = await s.tokenize(texts, truncate, True, mode)
    outputs = await s.encode(raw_request, token_ids, "token_embed", s.pooling_params("token_embed", None, None, mode))
    return [o.outputs.data for o in outputs], sum(len(p.token_ids) for p in token_ids)


@router.post("/v1/index/documents", responses=WORK_ERRORS, summary="Embed documents and add them to the index")
async def add_documents(request: IndexDocumentsRequest, raw_request: Request) -> Response:
    """Embeds `input` with token_embed (document mode for ColBERT models) and adds the matrices under `ids`;
    an id already in the index is replaced. Durable when the answer comes."""
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    index = _index(s)
    if len(request.ids) != len(request.input):
        raise APIError(f"{len(request.ids)} ids but {len(request.input)} inputs.", param="ids")
    if request.metadata is not None and len(request.metadata) != len(request.ids):
        raise APIError(f"{len(request.ids)} ids but {len(request.metadata)} metadata entries.", param="metadata")
    if len(set(request.ids)) != len(request.ids):
        raise APIError("ids repeat within the request.", param="ids")
    matrices, tokens = await _embed(s, raw_request, request.input, "document", request.truncate_prompt_tokens)
    from tokenpool.index import RESIDUAL_TRAIN_TOKENS

    stored = sum(len(m) for m in matrices)
    if index.untrained and stored < RESIDUAL_TRAIN_TOKENS:
        raise APIError(f"This residual index's codec is trained on its first add, which needs at least "
                       f"{RESIDUAL_TRAIN_TOKENS:,} tokens (a representative sample); this request has {stored:,}. "
                       f"Send more documents in the first request, or build the index with `tokenpool index build`.",
                       param="input")
    try:
        await asyncio.to_thread(index.add, request.ids, matrices, request.metadata)
    except ValueError as e:
        raise APIError(str(e)) from None
    n = s.add_prompt_tokens("/v1/index/documents", tokens)
    return json_response({"object": "index.documents", "added": len(request.ids), "documents": len(index),
                          "usage": _usage(n)})


@router.post("/v1/index/delete", responses=WORK_ERRORS, summary="Delete documents from the index")
async def delete_documents(request: IndexDeleteRequest, raw_request: Request) -> Response:
    """Removes `ids`; if one is unknown nothing is removed and the answer is a 404 naming it."""
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    index = _index(s)
    try:
        deleted = await asyncio.to_thread(index.delete, request.ids)
    except ValueError as e:
        raise APIError(str(e), status=404, param="ids") from None
    return json_response({"object": "index.delete", "deleted": deleted, "documents": len(index)})


@router.post("/v1/search", responses=WORK_ERRORS, summary="Search the index")
async def search(request: SearchRequest, raw_request: Request) -> Response:
    """Per query: the `k` best documents by MaxSim (queries embedded in query mode for ColBERT models), best
    first, each `{"id", "score", "metadata"}`."""
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    index = _index(s)
    queries = [request.query] if isinstance(request.query, str) else list(request.query)
    matrices, tokens = await _embed(s, raw_request, queries, "query", request.truncate_prompt_tokens)
    found = await asyncio.to_thread(index.search, matrices, request.k, exact=request.exact,
                                    candidates=request.candidates, nprobe=request.nprobe)
    data = []
    for i, hits in enumerate(found):
        results = []
        for doc_id, score in hits:
            try:
                meta = index.metadata(doc_id)
            except KeyError:  # deleted since the search's snapshot
                meta = None
            results.append({"id": doc_id, "score": score, "metadata": meta})
        data.append({"index": i, "results": results})
    n = s.add_prompt_tokens("/v1/search", tokens)
    return json_response({"id": s.response_id("search", None), "object": "list", "created": int(time.time()),
                          "model": request.model or s.model_name, "data": data, "usage": _usage(n)})


@router.get("/v1/index", responses=error_responses(401, 404), summary="The index's statistics")
async def index_stats(raw_request: Request) -> Response:
    """Documents, tokens, dim, codec, bytes per token and on disk."""
    s: ServingState = raw_request.app.state.serving
    return json_response({"object": "index", **_index(s).stats()})
