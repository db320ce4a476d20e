"""GPU benchmark: token_embed throughput of tokenpool vs transformers, same weights, same run.

    python bench/gpu_token_embed.py --shape bge-m3      # XLM-R large + colbert head, 20k passages
    python bench/gpu_token_embed.py --shape minilm      # 6 layers, hidden 384
    python bench/gpu_token_embed.py --shape modernbert  # ModernBERT-base: 22 layers, local window 128

Needs only torch, transformers, safetensors, numpy (no server dependencies). A random-weight model with
the real configuration is saved in Hugging Face layout (so tokenpool loads it through its real loader),
and both systems run token_embed over the same pre-tokenized corpus: 20,000 passages with lognormal
lengths (median 200, sigma 0.5, clipped to 16..512, seed 0), outputs normalized per token and copied to
the host as float32 (what `LLM.encode` returns; both systems copy through a pinned staging buffer). transformers runs length-sorted padded batches with the
best of its attention implementations (probed on a slice of the corpus).

MFU = tokens/s x FLOPs per token / measured bf16 matmul rate, with
    FLOPs per token = layers x (2 x (4 H^2 + 2 H I) + 4 H L_eff) + 2 H D_head
(QKV + output projections, FFN, attention scores and values; L_eff = sum(n^2) / sum(n) over passages;
the colbert head for bge-m3). ModernBERT: its GeGLU FFN is 3 H I, and a local layer's L_eff counts the keys
inside the window (64 each side) only. The matmul rate is measured on this card: 8192^3 bf16 torch.mm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Before torch is imported: host buffers on transparent huge pages (tokenpool sets this on import too,
# but this script imports torch first). Both systems run in this process, so both benefit.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # BGE-M3 = XLM-RoBERTa large.
    "bge-m3": dict(kind="xlm-roberta", vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                   num_attention_heads=16, intermediate_size=4096, max_position_embeddings=8194, head=True),
    "minilm": dict(kind="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512, head=False),
    # ModernBERT-base: pre-norm, GeGLU, rotary, every third layer global, the others a 128-token window.
    "modernbert": dict(kind="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22,
                       num_attention_heads=12, intermediate_size=1152, max_position_embeddings=8192, head=False),
    "tiny": dict(kind="xlm-roberta", vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=514, head=True),
}


MODERNBERT_WINDOW = 128


def corpus(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(200), 0.5, n)), 16, min(512, max_len)).astype(int)
    return [[0, *rng.integers(4, vocab, size=k - 2).tolist(), 2] for k in lengths]


def first_batch(passages: list[list[int]], budget: int):
    """The engine's first `Batch` of token_embed requests over `passages` (as many as fit `budget` tokens) and
    its token count: one full batch, for timing the forward alone."""
    from tokenpool.engine.request import Request
    from tokenpool.engine.scheduler import Batch
    from tokenpool.inputs.prompt import ProcessedPrompt
    from tokenpool.pooling_params import PoolingParams

    reqs, n = [], 0
    for i, p in enumerate(passages):
        if n + len(p) > budget:
            break
        reqs.append(Request(str(i), ProcessedPrompt(p), "token_embed", PoolingParams(task="token_embed")))
        n += len(p)
    return Batch(reqs), n


def matmul_tflops(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def build_checkpoint(shape: dict, folder: Path, device: str) -> None:
    from transformers import BertConfig, BertModel, ModernBertConfig, ModernBertModel, XLMRobertaConfig, XLMRobertaModel

    common = {k: shape[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings")}
    if shape["kind"] == "modernbert":
        config = ModernBertConfig(**common, local_attention=MODERNBERT_WINDOW, global_attn_every_n_layers=3,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2,
                                  architectures=["ModernBertModel"])
        torch.manual_seed(0)
        with torch.device(device):
            model = ModernBertModel(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
        model.save_pretrained(folder)
        return
    if shape["kind"] == "xlm-roberta":
        config = XLMRobertaConfig(**common, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  architectures=["XLMRobertaModel"])
        cls = XLMRobertaModel
    else:
        config = BertConfig(**common, architectures=["BertModel"])
        cls = BertModel
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config, add_pooling_layer=False).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    if shape["head"]:
        h = shape["hidden_size"]
        torch.save({k: v.float().cpu() for k, v in torch.nn.Linear(h, h).state_dict().items()}, folder / "colbert_linear.pt")
        torch.save({k: v.float().cpu() for k, v in torch.nn.Linear(h, 1).state_dict().items()}, folder / "sparse_linear.pt")


class TransformersBaseline:
    """What users run today: padded, length-sorted batches through transformers + the colbert head."""

    def __init__(self, folder: Path, shape: dict, device: str, dtype: torch.dtype, attn: str):
        from transformers import AutoModel

        extra = {} if shape["kind"] == "modernbert" else {"add_pooling_layer": False}
        self.model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn, **extra).to(device).eval()
        self.head = None
        if shape["head"]:
            state = torch.load(folder / "colbert_linear.pt", weights_only=True)
            self.head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device, dtype)
            self.head.load_state_dict(state)
        self.device, self.pad = device, (1 if shape["kind"] == "xlm-roberta" else 0)
        self._staging: torch.Tensor | None = None

    def _to_host(self, out: torch.Tensor) -> torch.Tensor:
        """The same host copy tokenpool makes (pinned staging + copy out); `.cpu()` into pageable memory
        is several times slower on some machines and would handicap the baseline."""
        if out.device.type != "cuda":
            return out
        if self._staging is None or self._staging.numel() < out.numel():
            self._staging = torch.empty(int(out.numel() * 1.25), dtype=out.dtype, pin_memory=True)
        staging = self._staging[: out.numel()]
        staging.copy_(out.reshape(-1), non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return staging.clone().view(out.shape)

    @torch.inference_mode()
    def run(self, passages: list[list[int]], batch_tokens: int) -> list[torch.Tensor]:
        order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
        results: list[torch.Tensor | None] = [None] * len(passages)
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and (j - i + 1) * len(passages[order[j]]) <= batch_tokens:
                j += 1
            j = max(j, i + 1)
            idx = order[i:j]
            width = len(passages[idx[-1]])
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, k in enumerate(idx):
                ids[row, : len(passages[k])] = torch.tensor(passages[k])
                mask[row, : len(passages[k])] = 1
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            if self.head is not None:
                hidden = self.head(hidden[:, 1:])
            out = self._to_host(F.normalize(hidden.float(), dim=-1))
            skip = 1 if self.head is not None else 0
            for row, k in enumerate(idx):
                results[k] = out[row, : len(passages[k]) - skip]
            i = j
        return results  # type: ignore[return-value]


def flops_per_token(shape: dict, passages: list[list[int]]) -> float:
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    lengths = np.array([len(p) for p in passages], dtype=np.float64)
    l_eff = float((lengths**2).sum() / lengths.sum())
    head = 2 * h * h if shape["head"] else 0
    if shape["kind"] == "modernbert":
        half = MODERNBERT_WINDOW // 2
        keys = sum(float(np.minimum(np.arange(n), half).sum() * 2 + n) for n in lengths.astype(int))
        l_local = keys / lengths.sum()  # keys per token inside the window (the token itself included)
        n_global = len(range(0, layers, 3))
        attention = 4 * h * (n_global * l_eff + (layers - n_global) * l_local)
        return layers * 2 * (4 * h * h + 3 * h * inter) + attention + head
    return layers * (2 * (4 * h * h + 2 * h * inter) + 4 * h * l_eff) + head


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def min_row_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return min(F.cosine_similarity(x.float(), y.float(), dim=-1).min().item() for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="bge-m3")
    parser.add_argument("--passages", type=int, default=20000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=int, nargs="+", default=[65536], help="tokenpool max_num_batched_tokens")
    parser.add_argument("--hf-batch-tokens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--hf-attn", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="write results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenpool import LLM, TokensPrompt

    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = matmul_tflops(args.device)
    passages = corpus(args.passages, shape["vocab_size"], shape["max_position_embeddings"] - 2)
    total_tokens = sum(len(p) for p in passages)
    fpt = flops_per_token(shape, passages)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(shape, folder, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()

        # Correctness: bf16 on the device vs an fp32 CPU reference (transformers, same weights).
        check = [p[:100] for p in passages[:4]] + [p for p in passages if len(p) < 64][:4]
        reference = TransformersBaseline(folder, shape, "cpu", torch.float32, "sdpa")
        ref_out = reference.run(check, 1 << 30)
        del reference

        prompts = [TokensPrompt(prompt_token_ids=p) for p in passages]
        for budget in args.budget:
            llm = LLM(str(folder), dtype=str(dtype).removeprefix("torch."), device=args.device,
                      skip_tokenizer_init=True, max_num_batched_tokens=budget, max_num_seqs=4096)
            ours_check = [o.outputs.data for o in llm.encode([TokensPrompt(prompt_token_ids=p) for p in check],
                                                             pooling_task="token_embed", use_tqdm=False)]
            cos = min_row_cosine(ours_check, ref_out)
            llm.encode(prompts[:2000], pooling_task="token_embed", use_tqdm=False)  # warm-up
            outs, seconds = timed(lambda: llm.encode(prompts, pooling_task="token_embed", use_tqdm=False), args.device)
            assert len(outs) == len(passages)
            rows.append((f"tokenpool (budget {budget})", total_tokens / seconds, seconds, cos))
            del outs, llm
            if args.device == "cuda":
                torch.cuda.empty_cache()

        if not args.skip_hf:
            best = None
            probe = passages[:2000]
            for attn in args.hf_attn:
                for bt in args.hf_batch_tokens:
                    try:
                        base = TransformersBaseline(folder, shape, args.device, dtype, attn)
                        base.run(probe[:200], bt)
                        _, s = timed(lambda: base.run(probe, bt), args.device)
                    except Exception as e:  # e.g. out of memory for eager at large batches
                        print(f"transformers {attn} batch_tokens={bt}: failed ({type(e).__name__})")
                        continue
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    rate = sum(len(p) for p in probe) / s
                    print(f"probe transformers attn={attn} batch_tokens={bt}: {rate:,.0f} tok/s")
                    if best is None or rate > best[0]:
                        best = (rate, attn, bt)
            _, attn, bt = best
            base = TransformersBaseline(folder, shape, args.device, dtype, attn)
            cos = min_row_cosine(base.run(check, 1 << 30), ref_out)
            base.run(probe[:200], bt)
            outs, seconds = timed(lambda: base.run(passages, bt), args.device)
            rows.append((f"transformers ({attn}, {bt} padded tok/batch)", total_tokens / seconds, seconds, cos))
            del outs, base

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.shape}: {len(passages)} passages, {total_tokens:,} tokens, {fpt / 1e6:.1f} MFLOP/token, "
          f"{device_name}, torch {torch.__version__}, bf16 matmul {peak:.0f} TFLOP/s")
    hf_rate = next((r[1] for r in rows if r[0].startswith("transformers")), None)
    print("| system | tokens/s | seconds | MFU | vs transformers | min cos vs fp32 CPU |")
    print("|---|---|---|---|---|---|")
    for name, rate, seconds, cos in rows:
        mfu = rate * fpt / (peak * 1e12)
        ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
        print(f"| {name} | {rate:,.0f} | {seconds:.2f} | {mfu:.1%} | {ratio} | {cos:.5f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": device_name, "peak_tflops": peak,
                                               "flops_per_token": fpt, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
