"""Varlen attention on the GPU: PyTorch's FlashAttention-2 (`varlen_attn`) against tokenpool's Triton kernel
(`tokenpool/layers/triton_attention.py`) in several blockings, per model shape, on one packed batch of
bench/gpu_token_embed.py's corpus (lognormal lengths, median 200, 16..512) up to 65,536 tokens. q, k, v are
the strided views of one fused projection, as in the models. Prints one table: time per call, the
attention FLOPs actually needed (window counted) per second, and the max difference from FlashAttention.

    python bench/gpu_attention.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_maxsim import cuda_time  # noqa: E402

from tokenpool.layers import triton_attention  # noqa: E402
from tokenpool.layers.attention import _VARLEN_GQA, _varlen_attn  # noqa: E402
from tokenpool.layers.rotary import RotaryEmbedding, rotate_heads_cuda_  # noqa: E402

# name: (heads, kv_heads, head_dim, window (left, right))
SHAPES = {
    "modernbert-local": (12, 12, 64, (64, 64)),
    "modernbert-global": (12, 12, 64, (-1, -1)),
    "bge-m3": (16, 16, 64, (-1, -1)),
    "minilm": (12, 12, 32, (-1, -1)),
    "qwen2.5-3b-causal": (16, 2, 128, (-1, 0)),
}
# also timed with ModernBERT's rotary: a rotary pass over q and k, then attention, against a pass over k only with
# q rotated inside the attention kernel
ROTARY = ("modernbert-local", "modernbert-global")
CONFIGS = [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2),
           (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 2, 3), (32, 64, 2, 3), (64, 32, 2, 3)]


def lengths(budget: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out, total = [], 0
    for n in np.clip(np.round(rng.lognormal(np.log(200), 0.5, 100_000)), 16, 512).astype(int):
        if total + n > budget:
            break
        out.append(int(n))
        total += n
    return out


def flops(seq_lens: list[int], heads: int, head_dim: int, window: tuple[int, int]) -> float:
    left, right = window
    keys = 0
    for n in seq_lens:
        i = np.arange(n)
        lo = np.maximum(i - left, 0) if left >= 0 else np.zeros(n, dtype=int)
        hi = np.minimum(i + right, n - 1) if right >= 0 else np.full(n, n - 1)
        keys += int((hi - lo + 1).sum())
    return 4.0 * keys * heads * head_dim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--configs", default="all", help="'all' or 'default' (the kernel's own choice)")
    args = parser.parse_args()
    seq_lens = lengths(args.budget)
    total = sum(seq_lens)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(seq_lens)]), dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {len(seq_lens)} sequences, {total} tokens, "
          f"max {max(seq_lens)}")
    print("| shape | kernel | us per call | TFLOP/s | max abs diff vs flash |")
    print("|---|---|---:|---:|---:|")
    for name in args.shapes.split(","):
        heads, kv_heads, head_dim, window = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        fused = torch.randn(total, heads + 2 * kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        q, k, v = fused[:, :heads], fused[:, heads:heads + kv_heads], fused[:, heads + kv_heads:]
        work = flops(seq_lens, heads, head_dim, window)
        kwargs = {"enable_gqa": True} if kv_heads != heads and _VARLEN_GQA else {}
        fk, fv = (k, v) if kv_heads == heads or _VARLEN_GQA else (
            k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1))

        def flash():
            return _varlen_attn(q, fk, fv, cu, cu, max(seq_lens), max(seq_lens), window_size=window, **kwargs)

        ref = flash()
        t = cuda_time(flash, args.reps)
        print(f"| {name} | flash-attn 2 (torch) | {t * 1e6:.0f} | {work / t / 1e12:.1f} | 0 |")
        for config in (CONFIGS if args.configs == "all" else [None]):
            tiles = {}

            def tri():
                return triton_attention.varlen_attention(q, k, v, seq_lens, window, tiles, config=config)

            try:
                diff = (tri().float() - ref.float()).abs().max().item()
                t = cuda_time(tri, args.reps)
            except Exception as exc:  # a blocking that does not compile for this head size (shared memory)
                print(f"| {name} | triton {config} | failed: {type(exc).__name__} | | |")
                continue
            print(f"| {name} | triton {config or 'default'} | {t * 1e6:.0f} | {work / t / 1e12:.1f} | {diff:.4f} |")
        if name in ROTARY:
            positions = torch.cat([torch.arange(n, device="cuda") for n in seq_lens])
            rope = RotaryEmbedding(head_dim, 10000.0)
            cos, sin = rope(positions)
            rotary = triton_attention.Rotary(positions, *rope.table(8192, positions.device))
            width = fused.view(total, -1)
            tiles = {}

            def both_first():
                rotate_heads_cuda_(width, cos, sin, heads + kv_heads, head_dim)
                return triton_attention.varlen_attention(q, k, v, seq_lens, window, tiles)

            def q_inside():
                rotate_heads_cuda_(width[:, heads * head_dim:], cos, sin, kv_heads, head_dim)
                return triton_attention.varlen_attention(q, k, v, seq_lens, window, tiles, rotary=rotary)

            before = fused.clone()
            expected = both_first()
            fused.copy_(before)
            diff = (q_inside().float() - expected.float()).abs().max().item()
            for label, fn in (("rotary pass over q, k + triton", both_first),
                              ("rotary pass over k + triton rotating q", q_inside)):
                t = cuda_time(fn, args.reps)  # rotates the same tensor over and over: timing only
                print(f"| {name} | {label} | {t * 1e6:.0f} | {work / t / 1e12:.1f} | "
                      f"{diff if fn is q_inside else 0:.4f} (between the two) |")


if __name__ == "__main__":
    main()
