"""A prompt alone equals the same prompt inside a packed batch of other lengths and tasks."""

import random

import pytest

from tests.settings import DEVICE, DTYPE
from tests.toolkit import assert_batch_invariant, run_mixed
from tokenpool import LLM


def _words(rng: random.Random, n: int) -> str:
    vocab = ["the", "cat", "sat", "on", "a", "mat", "retrieval", "token", "vector", "Paris", "model", "é", "über"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.mark.parametrize("model", ["minilm", "bge_m3"])
@pytest.mark.parametrize("budget", [64, 4096])
def test_alone_equals_in_mixed_batch(model, budget, minilm_path, tiny_bge_m3):
    path = minilm_path if model == "minilm" else tiny_bge_m3
    llm = LLM(str(path), dtype=DTYPE, device=DEVICE, max_num_batched_tokens=budget)
    rng = random.Random(0)
    texts = [_words(rng, n) for n in (1, 3, 30, 7, 25, 2, 45, 12)]
    tasks = [llm.supported_tasks[i % len(llm.supported_tasks)] for i in range(len(texts))]
    ids = llm.llm_engine.processor(texts)
    mixed = run_mixed(llm.llm_engine, [(f"r{i}", ids[i], task) for i, task in enumerate(tasks)])
    for i, (text, task) in enumerate(zip(texts, tasks)):
        alone = llm.encode([text], pooling_task=task, use_tqdm=False)[0].outputs.data
        assert_batch_invariant(alone, mixed[f"r{i}"])


def test_scheduler_respects_budget_and_seq_cap(minilm_path):
    llm = LLM(str(minilm_path), dtype="float32", max_num_batched_tokens=300, max_num_seqs=3)
    engine = llm.llm_engine
    sizes = []
    real_launch = engine.runner.launch

    def spy(batch):
        sizes.append((len(batch.requests), batch.num_tokens))
        return real_launch(batch)

    engine.runner.launch = spy
    texts = [_words(random.Random(i), 40) for i in range(10)]
    outs = llm.encode(texts, pooling_task="token_embed", use_tqdm=False)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert sum(n for n, _ in sizes) == 10
    assert all(n <= 3 and t <= 300 for n, t in sizes)
    assert len(sizes) >= 4
