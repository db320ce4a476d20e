"""Where does an end-to-end GPU run's time go on the host? `LLM.encode` over the benchmark corpus with the
engine's stages timed: the main thread's launch (prepare + queueing the forward and pooling), its wait for a
batch's outputs and the rest of a step; the copier thread's wait for the device-to-host copy and its copy out
of pinned staging; the GPU's busy time per batch (CUDA events around each launch). Then the forward alone on
one full batch, for the rate the pipeline could reach.

    python bench/gpu_pipeline.py --shape modernbert [--passages 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_token_embed import SHAPES, build_checkpoint, corpus, first_batch, flops_per_token, matmul_tflops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="modernbert", choices=list(SHAPES))
    parser.add_argument("--passages", type=int, default=20000)
    parser.add_argument("--budget", type=int, default=65536)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenpool import LLM, TokensPrompt
    from tokenpool.engine import runner as runner_module

    shape = SHAPES[args.shape]
    passages = corpus(args.passages, shape["vocab_size"], shape["max_position_embeddings"] - 2)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in passages]
    tokens = sum(map(len, passages))
    peak = matmul_tflops("cuda")
    fpt = flops_per_token(shape, passages)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(shape, Path(tmp), "cuda")
        llm = LLM(tmp, dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=args.budget,
                  max_num_seqs=4096)
        engine, runner = llm.llm_engine, llm.llm_engine.runner
        llm.encode(prompts[:3000], pooling_task="token_embed", use_tqdm=False)  # warm-up, compiles

        times: dict[str, list[float]] = {k: [] for k in ("launch", "finish wait", "finish", "step", "copier wait",
                                                        "copier copy")}
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        lock = threading.Lock()
        real_launch, real_finish, real_step, real_copy = runner.launch, runner.finish, engine.step, runner_module._copy_out

        def launch(batch):
            t0 = time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = real_launch(batch)
            end.record()  # after the forward and pooling were queued (the copy is on its own stream)
            events.append((start, end))
            times["launch"].append(time.perf_counter() - t0)
            return out

        def finish(inflight):
            t0 = time.perf_counter()
            if inflight.host is not None:
                inflight.host.result()
            t1 = time.perf_counter()
            out = real_finish(inflight)
            times["finish wait"].append(t1 - t0)
            times["finish"].append(time.perf_counter() - t0)
            return out

        def step():
            t0 = time.perf_counter()
            out = real_step()
            times["step"].append(time.perf_counter() - t0)
            return out

        def copy_out(done, staging, *parts):
            t0 = time.perf_counter()
            done.synchronize()
            t1 = time.perf_counter()
            out = real_copy(done, staging, *parts)
            with lock:
                times["copier wait"].append(t1 - t0)
                times["copier copy"].append(time.perf_counter() - t1)
            return out

        runner.launch, runner.finish, engine.step, runner_module._copy_out = launch, finish, step, copy_out
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        runner.launch, runner.finish, engine.step, runner_module._copy_out = real_launch, real_finish, real_step, real_copy
        gpu = sum(s.elapsed_time(e) for s, e in events) / 1e3
        batches = len(events)
        print(f"{args.shape}: {tokens:,} tokens in {batches} batches, TOKENPOOL_CUDA_INFLIGHT="
              f"{runner.inflight_depth}, TOKENPOOL_COPY_THREADS={runner_module.copy_threads()}, "
              f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
        print(f"end to end {tokens / wall:,.0f} tok/s ({tokens / wall * fpt / (peak * 1e12):.1%} MFU, "
              f"{wall:.2f} s); GPU busy {gpu:.2f} s ({gpu / wall:.0%} of the wall time)")
        print("| stage (per batch) | mean ms | max ms | total s |\n|---|---:|---:|---:|")
        print(f"| GPU, forward + pooling | {gpu / batches * 1e3:.2f} | "
              f"{max(s.elapsed_time(e) for s, e in events):.2f} | {gpu:.2f} |")
        for name, values in times.items():
            if values:
                print(f"| {name} | {sum(values) / len(values) * 1e3:.2f} | {max(values) * 1e3:.2f} | {sum(values):.2f} |")

        # The forward alone on one full batch: the rate the pipeline could reach.
        batch, n = first_batch(passages, args.budget)
        inputs = runner.prepare(batch)
        with torch.inference_mode():
            for _ in range(2):
                engine.model(inputs.input_ids, inputs.positions, inputs.attn)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                engine.model(inputs.input_ids, inputs.positions, inputs.attn)
            end.record()
            torch.cuda.synchronize()
        per = start.elapsed_time(end) / 5 / 1e3
        print(f"forward alone, one {n:,}-token batch: {per * 1e3:.2f} ms, {n / per:,.0f} tok/s "
              f"({n / per * fpt / (peak * 1e12):.1%} MFU against {peak:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
