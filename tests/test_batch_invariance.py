"""A prompt alone equals the same prompt inside a packed batch of other lengths and tasks."""

import random

import pytest
import torch

from tests.settings import DEVICE, DTYPE
from tests.toolkit import assert_batch_invariant, run_mixed
from tokenpool import LLM, PoolingParams


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


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_batches_in_flight_keep_order_and_outputs(depth, tiny_bge_m3):
    """With `depth` batches kept launched ahead (CUDA's pipeline; the CPU runs it the same way when told to),
    the first outputs come `depth` steps later, never more than depth + 1 batches are launched and uncollected,
    and every output equals the one of the plain sequential run."""
    llm = LLM(str(tiny_bge_m3), dtype=DTYPE, device=DEVICE, max_num_batched_tokens=64, max_num_seqs=2)
    engine = llm.llm_engine
    texts = [_words(random.Random(i), 12 + 3 * i) for i in range(9)]
    ids = llm.llm_engine.processor(texts)
    expected = {f"r{i}": llm.encode([t], pooling_task="token_embed", use_tqdm=False)[0].outputs.data
                for i, t in enumerate(texts)}
    engine.runner.inflight_depth = depth
    launched, collected = [0], []
    real_launch = engine.runner.launch

    def counting_launch(batch):
        launched[0] += 1
        return real_launch(batch)

    engine.runner.launch = counting_launch
    for i, seq in enumerate(ids):
        engine.add_request(f"r{i}", seq, "token_embed", PoolingParams())
    order, steps_before_first = [], None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs:
            collected.append(len(outs))
            steps_before_first = launched[0] - 1 if steps_before_first is None else steps_before_first
        assert launched[0] - len(collected) <= depth + (0 if outs else 1)
        for out in outs:
            order.append(out.request_id)
            assert_batch_invariant(expected[out.request_id], out.outputs.data)
    assert steps_before_first == depth
    assert order == [f"r{i}" for i in range(9)]


def test_inflight_depth_setting(monkeypatch):
    from tokenpool.engine.runner import cuda_inflight_depth

    assert cuda_inflight_depth() == 2
    monkeypatch.setenv("TOKENPOOL_CUDA_INFLIGHT", "3")
    assert cuda_inflight_depth() == 3
    for bad in ("0", "five", "9"):
        monkeypatch.setenv("TOKENPOOL_CUDA_INFLIGHT", bad)
        with pytest.raises(ValueError, match="TOKENPOOL_CUDA_INFLIGHT"):
            cuda_inflight_depth()


@pytest.mark.parametrize("parts", [1, 3])
def test_outputs_copied_out_of_staging_in_parts(parts, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from tokenpool.engine import runner

    class Done:  # the device-to-host copy's event, already complete
        def synchronize(self):
            pass

    staging = torch.randn(3 * (1 << 20) + 5)
    with ThreadPoolExecutor(parts) as pool:
        copied = []
        real_submit = pool.submit
        pool.submit = lambda fn, *a: copied.append(a[0].size) or real_submit(fn, *a)
        out = runner._copy_out(Done(), staging, pool if parts > 1 else None, parts)
    assert out.data_ptr() != staging.data_ptr() and torch.equal(out, staging)
    assert copied == ([] if parts == 1 else [1048578, 1048578, 1048577])  # one part per thread
    monkeypatch.delenv("TOKENPOOL_COPY_THREADS", raising=False)
    for cpus, default in ((1, 1), (7, 1), (8, 2), (16, 4), (128, 4)):  # a quarter of the CPUs, 1..4
        monkeypatch.setattr(runner.os, "cpu_count", lambda cpus=cpus: cpus)
        assert runner.copy_threads() == default
    monkeypatch.setenv("TOKENPOOL_COPY_THREADS", "6")
    assert runner.copy_threads() == 6
    for bad in ("0", "x", "33"):
        monkeypatch.setenv("TOKENPOOL_COPY_THREADS", bad)
        with pytest.raises(ValueError, match="TOKENPOOL_COPY_THREADS"):
            runner.copy_threads()
