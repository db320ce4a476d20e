"""Would an int8 (W8A8) CPU mode pay for itself? Issue 9's candidate, measured two ways in one run.

1. Speed: MiniLM's GEMM shapes (4,096 rows) in bf16 (`F.linear`, oneDNN) against int8 x int8 -> int32
   (`torch._int_mm`) and oneDNN's quantized linear (u8 activations, s8 weights, fp32 / bf16 out).
2. Accuracy: the real all-MiniLM-L6-v2 (transformers, fp32) with its Linear layers fake-quantized
   (per-output-channel symmetric int8 weights; activations per token, per tensor, or per tensor asymmetric),
   token_embed rows' cosine against the unquantized model over the benchmark's synthetic passages.

    python bench/int8_probe.py [--passages 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import CorpusSpec, make_text_corpus  # noqa: E402


def _seconds(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def gemm_rates(rows: int) -> None:
    print(f"GEMM rate, {rows} rows, GFLOP/s (int8: GOP/s)")
    print("| K x N | bf16 F.linear | int8 _int_mm | oneDNN qlinear u8->fp32 | u8->bf16 |")
    print("|---|---:|---:|---:|---:|")
    for k, n in [(384, 1152), (384, 384), (384, 1536), (1536, 384)]:
        flops = 2 * rows * k * n
        x = torch.randn(rows, k).bfloat16()
        w = (torch.randn(n, k) * 0.05).bfloat16()
        a8 = torch.randint(-100, 100, (rows, k), dtype=torch.int8)
        b8 = torch.randint(-100, 100, (k, n), dtype=torch.int8)
        au = torch.randint(0, 200, (rows, k), dtype=torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), [rows, k])
        ws, wz = torch.ones(n), torch.zeros(n, dtype=torch.int64)

        def qlinear(out_dtype):
            return lambda: torch.ops.onednn.qlinear_pointwise(
                au, 0.01, 100, packed, ws, wz, None, 1.0, 0, out_dtype, "none", [None], ""
            )

        rates = [
            flops / _seconds(fn) / 1e9
            for fn in (lambda: F.linear(x, w), lambda: torch._int_mm(a8, b8), qlinear(torch.float32), qlinear(torch.bfloat16))
        ]
        print(f"| {k} x {n} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


def _fake_quant_act(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "per token":
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        return (x / s).round().clamp(-127, 127) * s
    if mode == "per tensor":
        s = x.abs().amax().clamp(min=1e-8) / 127
        return (x / s).round().clamp(-127, 127) * s
    lo, hi = x.min(), x.max()  # per tensor, asymmetric u8
    s = ((hi - lo) / 255).clamp(min=1e-8)
    z = (-lo / s).round()
    return ((x / s).round() + z).clamp(0, 255).sub(z) * s


def accuracy(passages: int) -> None:
    from transformers import AutoModel, AutoTokenizer

    from tokenpool.loader.model_files import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts, _ = make_text_corpus(tok, CorpusSpec(num_passages=passages))

    def rows() -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                F.normalize(model(**tok([t], return_tensors="pt", truncation=True, max_length=256)).last_hidden_state[0], dim=-1)
                for t in texts
            ]

    reference = rows()
    plain = torch.nn.Linear.forward
    names = {mod: name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    print(f"\nW8A8 fake quantization, all-MiniLM-L6-v2, {passages} passages: token rows' cosine to fp32")
    print("| activations | kept in fp32: Linear layers whose name contains | min | 0.1% quantile | mean |")
    print("|---|---|---:|---:|---:|")
    for mode, keep in [
        ("per token", ()),
        ("per token", ("output.dense",)),
        ("per token", ("attention",)),
        ("per tensor", ()),
        ("per tensor asymmetric", ()),
    ]:

        def forward(self, x, mode=mode, keep=keep):
            if any(k in names[self] for k in keep):
                return plain(self, x)
            s = self.weight.abs().amax(1, keepdim=True) / 127
            return F.linear(_fake_quant_act(x, mode), (self.weight / s).round() * s, self.bias)

        torch.nn.Linear.forward = forward
        try:
            cos = torch.cat([(a * b).sum(-1) for a, b in zip(reference, rows())])
        finally:
            torch.nn.Linear.forward = plain
        kept = ", ".join(keep) or "none"
        print(f"| {mode} | {kept} | {cos.min():.5f} | {cos.quantile(0.001):.5f} | {cos.mean():.6f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=300)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gemm_rates(args.rows)
    accuracy(args.passages)


if __name__ == "__main__":
    main()
