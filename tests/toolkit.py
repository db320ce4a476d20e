"""Helpers the tests share: driving the engine by hand, and the batch-invariance check.

Batch invariance is judged by what the precision can promise, not by a measurement of ourselves: in fp32
every value within 1e-5; in bf16 (GEMMs of different batch shapes round differently) every row at cosine
>= 0.999 to the prompt run alone, the bar the model-equivalence tests set for bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.settings import DTYPE
from tokenpool import PoolingParams


def run_mixed(engine, prompts: list[tuple[str, list[int], str]]) -> dict:
    """Queue (request id, token ids, task) on an `LLMEngine` by hand, step until done: {id: output data}."""
    for request_id, ids, task in prompts:
        engine.add_request(request_id, ids, task, PoolingParams())
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out.outputs.data
    return results


def assert_batch_invariant(alone, together, dtype: str = DTYPE) -> None:
    """A prompt's output in a mixed batch equals its output alone (a tensor, or a dict of them)."""
    if isinstance(alone, dict):
        assert alone.keys() == together.keys()
        for key in alone:
            assert_batch_invariant(alone[key], together[key], dtype)
        return
    assert alone.shape == together.shape
    if dtype == "float32":
        assert torch.allclose(alone, together, atol=1e-5), (alone - together).abs().max()
        return
    rows_a, rows_b = alone.float().reshape(-1, alone.shape[-1]) if alone.dim() > 1 else alone.float()[None], \
        together.float().reshape(-1, alone.shape[-1]) if together.dim() > 1 else together.float()[None]
    cos = F.cosine_similarity(rows_a, rows_b, dim=-1, eps=1e-12)
    both_zero = (rows_a.norm(dim=-1) == 0) & (rows_b.norm(dim=-1) == 0)
    assert torch.all(both_zero | (cos >= 0.999)), cos.min()
