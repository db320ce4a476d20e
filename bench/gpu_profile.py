"""Where does a GPU batch's time go? Kernel breakdown (torch.profiler) and host-side costs of one
token_embed run, for the bge-m3 or minilm shape of bench/gpu_token_embed.py. Prints tables."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_token_embed import SHAPES, build_checkpoint, corpus, first_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="bge-m3", choices=list(SHAPES))
    parser.add_argument("--passages", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=65536)
    args = parser.parse_args()
    from tokenpool import LLM, TokensPrompt

    shape = SHAPES[args.shape]
    passages = corpus(args.passages, shape["vocab_size"], shape["max_position_embeddings"] - 2)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in passages]
    tokens = sum(map(len, passages))
    import os

    print(f"torch threads {torch.get_num_threads()}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(shape, Path(tmp), "cuda")
        llm = LLM(tmp, dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=args.budget, max_num_seqs=4096)
        engine = llm.llm_engine
        llm.encode(prompts[:500], pooling_task="token_embed", use_tqdm=False)

        t0 = time.perf_counter()
        engine.processor(prompts)
        t_inputs = time.perf_counter() - t0

        # GPU time of the forward alone, one full batch.
        batch, n = first_batch(passages, args.budget)
        reqs = batch.requests
        runner = engine.runner
        inputs = runner.prepare(batch)
        with torch.inference_mode():
            for _ in range(2):
                engine.model(inputs.input_ids, inputs.positions, inputs.attn)
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            hidden = engine.model(inputs.input_ids, inputs.positions, inputs.attn)
            ev[1].record()
            pooled = engine.model.pool(hidden, inputs.slots)
            ev[2].record()
            host = pooled.flat.cpu()
            ev[3].record()
            torch.cuda.synchronize()
            pinned = torch.empty(pooled.flat.numel(), dtype=torch.float32, pin_memory=True)
            half = pooled.flat.to(torch.bfloat16)
            pinned_half = torch.empty(half.numel(), dtype=torch.bfloat16, pin_memory=True)
            d2h = []
            for src, dst in ((pooled.flat, pinned), (half, pinned_half), (pooled.flat, pinned)):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                dst.copy_(src, non_blocking=True)
                e1.record()
                torch.cuda.synchronize()
                d2h.append(e0.elapsed_time(e1))
        t_fwd, t_pool, t_d2h = (ev[i].elapsed_time(ev[i + 1]) for i in range(3))
        mb = pooled.flat.numel() * 4 / 1e6
        print(f"D2H {mb:.0f} MB fp32: pageable {t_d2h:.1f} ms, pinned {d2h[2]:.1f} ms ({mb / d2h[2]:.1f} GB/s); "
              f"bf16 pinned {d2h[1]:.1f} ms")
        host.clone()
        t0 = time.perf_counter()
        host.clone()
        t_clone = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        torch.empty_like(host).copy_(host)
        t_copy = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for _ in range(3):
            runner.prepare(batch)
        torch.cuda.synchronize()
        t_prep = (time.perf_counter() - t0) / 3 * 1e3
        t0 = time.perf_counter()
        infl = runner.launch(batch)
        t_launch = (time.perf_counter() - t0) * 1e3
        runner.finish(infl)
        t0 = time.perf_counter()
        for _ in range(3):
            runner.finish(runner.launch(batch))
        t_full = (time.perf_counter() - t0) / 3 * 1e3

        print(f"batch: {len(reqs)} seqs, {n} tokens ({args.shape})")
        print("| stage | ms |\n|---|---|")
        for name, v in [("forward (GPU)", t_fwd), ("pool+head (GPU)", t_pool), ("D2H pageable .cpu()", t_d2h),
                        ("host clone of outputs", t_clone), ("host copy into new tensor", t_copy),
                        ("prepare (host)", t_prep), ("launch returns after (host)", t_launch),
                        ("launch+finish (wall)", t_full),
                        (f"inputs() for {len(prompts)} TokensPrompts", t_inputs * 1e3)]:
            print(f"| {name} | {v:.2f} |")
        print(f"forward-only rate: {n / t_fwd * 1e3:,.0f} tok/s; full batch rate {n / t_full * 1e3:,.0f} tok/s")

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.inference_mode():
                engine.model(inputs.input_ids, inputs.positions, inputs.attn)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        t0 = time.perf_counter()
        llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        wall = time.perf_counter() - t0
        print(f"LLM.encode {len(prompts)} passages: {tokens / wall:,.0f} tok/s")


if __name__ == "__main__":
    main()
