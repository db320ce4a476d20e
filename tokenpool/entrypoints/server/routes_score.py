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


async def _encode_pairs(s: ServingState, raw_request: Request, pairs: list[tuple[str, str]], task: str,
                        request: ScoreRequest | RerankRequest) -> tuple[list[tuple], dict[tuple, torch.Tensor], int]:
    """Each distinct text of each side encoded once: the pairs as keys, {key: output}, and the prompt tokens.
    Models with query / document modes (ColBERT) encode the left side as queries, the right as documents."""
    modes = ("query", "document") if s.input_types else (None, None)
    keyed = [((modes[0], a), (modes[1], b)) for a, b in pairs]
    vectors: dict[tuple, torch.Tensor] = {}
    tokens = 0
    for side in dict.fromkeys(modes):
        unique = list(dict.fromkeys(k for pair in keyed for k in pair if k[0] == side))
        texts = [text for _, text in unique]
        token_ids = await s.tokenize(texts, request.truncate_prompt_tokens, request.add_special_tokens, side)
        params = s.pooling_params(task, request.use_activation, None, side)
        outputs = await s.encode(raw_request, token_ids, task, params)
        vectors.update((k, o.outputs.data) for k, o in zip(unique, outputs))
        tokens += sum(len(ids.token_ids) for ids in token_ids)
    return keyed, vectors, tokens


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
    keyed, vectors, tokens = await _encode_pairs(s, raw_request, pairs, task, request)
    scores = score_pairs(keyed, vectors, "cosine" if task == "embed" else "maxsim")
    data = [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)]
    n = s.add_prompt_tokens("/score", tokens)
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
    pairs = [(request.query, doc) for doc in request.documents]
    keyed, vectors, tokens = await _encode_pairs(s, raw_request, pairs, task, request)
    scores = score_pairs(keyed, vectors, "cosine" if task == "embed" else "maxsim")
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
    n = s.add_prompt_tokens("/rerank", tokens)
    return json_response({"id": s.response_id("rerank", request.request_id), "model": request.model or s.model_name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results})
