"""POST /score, /v1/score and /rerank, /v1/rerank.

Scores come from the model's embeddings: cosine of the pooled `embed` vectors by default, or late
interaction (`"task": "token_embed"`): MaxSim = the sum over query tokens of the best dot product with any
document token (vLLM's and PyLate's score; BGE-M3's own colbert score divides it by the query length).
Every distinct text is encoded once.
"""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Request
from starlette.responses import Response

from tokenpool.entrypoints.server.encoding import json_response
from tokenpool.entrypoints.server.errors import APIError
from tokenpool.entrypoints.server.protocol import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from tokenpool.entrypoints.server.routes_pooling import WORK_ERRORS, error_responses
from tokenpool.entrypoints.server.serving import ServingState
from tokenpool.scoring import pair_inputs, score_pairs

router = APIRouter()
SCORE_ERRORS = {**WORK_ERRORS, **error_responses(501)}


def _score_task(s: ServingState, asked: str | None) -> str:
    if asked is not None:
        s.check_task(asked)
        return asked
    for task in ("embed", "token_embed"):
        if task in s.tasks:
            return task
    raise APIError(f"The model `{s.model_name}` cannot score: it has neither 'embed' nor 'token_embed'.", status=501)


async def _encode_texts(s: ServingState, raw_request: Request, texts: list[str], task: str,
                        request: ScoreRequest | RerankRequest) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """{text: output} and {text: token count} for each distinct text."""
    unique = list(dict.fromkeys(texts))
    token_ids = await s.tokenize(unique, request.truncate_prompt_tokens, request.add_special_tokens)
    params = s.pooling_params(task, request.use_activation, None)
    outputs = await s.encode(raw_request, token_ids, task, params)
    return ({t: o.outputs.data for t, o in zip(unique, outputs)},
            {t: len(ids) for t, ids in zip(unique, token_ids)})


def _pairs(left: list[str], right: list[str]) -> list[tuple[str, str]]:
    try:
        return pair_inputs(left, right)
    except ValueError as e:
        raise APIError(str(e)) from None


@router.post("/score", response_model=ScoreResponse, responses=SCORE_ERRORS, summary="Score pairs of texts")
@router.post("/v1/score", response_model=ScoreResponse, responses=SCORE_ERRORS, summary="Score pairs of texts")
async def create_score(request: ScoreRequest, raw_request: Request) -> Response:
    """`text_1` (or `data_1` / `queries`) against `text_2` (or `data_2` / `documents`): 1 x N, N x 1 or
    N x N pairwise. `task`: `embed` (cosine, the default when the model has it) or `token_embed` (MaxSim)."""
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    s.check_common(request.priority)
    task = _score_task(s, request.task)
    pairs = _pairs(request.left(), request.right())
    vectors, lengths = await _encode_texts(s, raw_request, [t for pair in pairs for t in pair], task, request)
    scores = score_pairs(pairs, vectors, "cosine" if task == "embed" else "maxsim")
    data = [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)]
    n = s.add_prompt_tokens("/score", sum(lengths.values()))
    return json_response({"id": s.response_id("score", request.request_id), "object": "list",
                          "created": int(time.time()), "model": request.model or s.model_name, "data": data,
                          "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                    "prompt_tokens_details": None}})


@router.post("/rerank", response_model=RerankResponse, responses=SCORE_ERRORS, summary="Rerank documents")
@router.post("/v1/rerank", response_model=RerankResponse, responses=SCORE_ERRORS, summary="Rerank documents")
async def create_rerank(request: RerankRequest, raw_request: Request) -> Response:
    """`documents` sorted by relevance to `query` (best first); `top_n` > 0 keeps the best n. Scores as in
    /score (`task`: `embed` cosine by default, `token_embed` MaxSim)."""
    s: ServingState = raw_request.app.state.serving
    s.check_model(request.model)
    s.check_common(request.priority)
    task = _score_task(s, request.task)
    vectors, lengths = await _encode_texts(s, raw_request, [request.query, *request.documents], task, request)
    scores = score_pairs([(request.query, doc) for doc in request.documents], vectors,
                         "cosine" if task == "embed" else "maxsim")
    scored = sorted(((score, i, doc) for i, (score, doc) in enumerate(zip(scores, request.documents))),
                    key=lambda r: (-r[0], r[1]))
    if request.top_n:
        scored = scored[: request.top_n]
    results = []
    for score, index, doc in scored:
        result = {"index": index, "relevance_score": score}
        if request.return_documents:
            result["document"] = {"text": doc}
        results.append(result)
    n = s.add_prompt_tokens("/rerank", sum(lengths.values()))
    return json_response({"id": s.response_id("rerank", request.request_id), "model": request.model or s.model_name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results})
