"""One request's result pickles to its own bytes, not its batch's (each has a storage of its own, with no copy);
the batch-level output gives the same values as views of one tensor."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch

from tokenpool import LLM
from tokenpool.pooling_params import PoolingParams

TEXTS = ["a short one", "a somewhat longer sentence with more tokens in it " * 4, "x", "another prompt"]


def test_a_request_output_pickles_only_its_own_bytes(minilm_path):
    llm = LLM(str(minilm_path), dtype="float32", device="cpu")
    outputs = llm.encode(TEXTS * 8, pooling_task="token_embed", use_tqdm=False)
    first = outputs[2]  # "x": 3 tokens x 384 floats
    data = first.outputs.data
    assert data.untyped_storage().nbytes() == data.numel() * 4
    assert len(pickle.dumps(first)) < data.numel() * 4 + 4096
    restored = pickle.loads(pickle.dumps(first))
    assert torch.equal(restored.outputs.data, data) and restored.prompt_token_ids == first.prompt_token_ids


def test_batch_output_is_views_of_one_tensor(minilm_path):
    llm = LLM(str(minilm_path), dtype="float32", device="cpu")
    expected = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    engine = llm.llm_engine
    for i, text in enumerate(TEXTS):
        ids = llm.get_tokenizer()(text)["input_ids"]
        engine.add_request(f"b{i}", ids, "token_embed", PoolingParams(task="token_embed"))
    batches = []
    while engine.has_unfinished_requests():
        out = engine.step_batch()
        if out is not None:
            batches.append(out)
    got = {o.request_id: o for b in batches for o in b.outputs}
    assert sorted(got) == [f"b{i}" for i in range(len(TEXTS))]
    for batch in batches:
        for output, offset in zip(batch.outputs, batch.offsets):
            view = output.outputs.data
            assert view.untyped_storage().data_ptr() == batch.flat.untyped_storage().data_ptr()  # no copy
            assert torch.equal(batch.flat[offset:offset + view.numel()].view(view.shape), view)
    for i, exp in enumerate(expected):
        assert torch.equal(got[f"b{i}"].outputs.data, exp.outputs.data)


def test_encode_restores_the_garbage_collector(minilm_path):
    """LLM.encode pauses the cyclic GC while it runs (a host-cost fix) and restores it, also when it fails."""
    llm = LLM(str(minilm_path), dtype="float32", device="cpu")
    seen = []
    model = llm.llm_engine.model
    handle = model.register_forward_pre_hook(lambda *_: seen.append(gc.isenabled()))
    try:
        llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
        assert seen and not any(seen) and gc.isenabled()
        with pytest.raises(ValueError):
            llm.encode([{"prompt_token_ids": [10**9]}], pooling_task="token_embed", use_tqdm=False)
        assert gc.isenabled()
        gc.disable()  # a caller that had it off keeps it off
        llm.encode(TEXTS[:1], pooling_task="token_embed", use_tqdm=False)
        assert not gc.isenabled()
    finally:
        gc.enable()
        handle.remove()
