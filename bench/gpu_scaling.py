"""Scaling over the GPUs of one machine: one tokenpool process per GPU, each embedding its shard of a corpus,
against one process on one GPU (the single-process offline number), in the same run.

    python bench/gpu_scaling.py --passages 200000 [--shape bge-m3]

This is what `tokenpool.ray.embed_dataset(..., num_replicas=N, num_gpus_per_replica=1)` runs per replica,
without Ray (Ray is not installable on the GPU machine: its wheel is larger than one device call may carry),
so it measures the replicas' own scaling (host CPU, PCIe, memory bandwidth shared by N engines), not Ray's
scheduling. Corpus and checkpoint as bench/gpu_token_embed.py (random weights, lognormal lengths); each
process times `LLM.encode` over its shard after a warm-up, outputs copied to the host as float32.
Efficiency = mean per-GPU tokens/s with N processes / tokens/s of the single process over a shard of the
same size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(args) -> None:
    from gpu_token_embed import SHAPES, corpus
    from tokenpool import LLM, TokensPrompt

    shape = SHAPES[args.shape]
    passages = corpus(args.passages, shape["vocab_size"], shape["max_position_embeddings"] - 2)
    shard = passages[args.shard::args.num_shards]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in shard]
    llm = LLM(args.folder, dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=65536,
              max_num_seqs=4096)
    llm.encode(prompts[:2000], pooling_task="token_embed", use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert len(outs) == len(shard)
    print(json.dumps({"shard": args.shard, "tokens": sum(map(len, shard)), "seconds": seconds}), flush=True)


def run_workers(folder: str, args, gpus: list[int], num_shards: int) -> list[dict]:
    procs = []
    for shard, gpu in enumerate(gpus):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--folder", folder, "--shape", args.shape, "--passages",
             str(args.passages), "--shard", str(shard), "--num-shards", str(num_shards)],
            env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=200000)
    parser.add_argument("--shape", default="bge-m3")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--folder")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    from gpu_token_embed import SHAPES, build_checkpoint

    n = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(SHAPES[args.shape], Path(tmp), "cuda")
        single = run_workers(tmp, args, [0], n)[0]  # one shard of the N-way split, alone on GPU 0
        many = run_workers(tmp, args, list(range(n)), n)
    base = single["tokens"] / single["seconds"]
    rates = [r["tokens"] / r["seconds"] for r in many]
    total = sum(r["tokens"] for r in many)
    print(f"\n{args.shape}: {args.passages} passages ({total:,} tokens), {n} x {torch.cuda.get_device_name()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print("| processes | per-GPU tok/s | aggregate tok/s | efficiency |")
    print("|---|---|---|---|")
    print(f"| 1 (GPU 0, one shard) | {base:,.0f} | {base:,.0f} | 100% |")
    print(f"| {n} (one per GPU) | {', '.join(f'{r:,.0f}' for r in rates)} | {sum(rates):,.0f} | "
          f"{sum(rates) / (n * base):.1%} |")


if __name__ == "__main__":
    main()
