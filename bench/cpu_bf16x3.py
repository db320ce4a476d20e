"""float32 GEMMs as three bf16 products (bf16x3) through oneDNN's bf16 "fpmath" mode: speed and accuracy.

    python bench/cpu_bf16x3.py [--threads N] [--rows 4096] [--window 0.5]

Question (issue 9, AMX class): a float32 GEMM on AMX runs on the AVX-512 FMA units (~300 GFLOP/s on 2 cores)
while bf16 products run on the tiles (~1.6-2.6 TFLOP/s). Writing x = x_hi + x_lo and w = w_hi + w_lo with
bf16 parts, x.w = x_hi.w_hi + x_lo.w_hi + x_hi.w_lo + (x_lo.w_lo, ~2^-18 relative, dropped): three bf16 products
with fp32 accumulation give float32-level results. With `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`
oneDNN may round fp32 operands to bf16 and still write fp32 outputs, so one GEMM over K tripled,
[x_hi | x_lo | x_hi] @ [w_hi ; w_hi ; w_lo]^T, is bf16x3 with an fp32 result (all parts bf16 values kept
as fp32, so the result does not depend on whether oneDNN takes the permission).

Per MiniLM layer shape, with pre-packed weights (`torch.ops.mkldnn._linear_pointwise`), best of 3 windows:
- ieee:      float32 products (today's float32 mode);
- fpmath:    the fp32_precision="bf16" flag on plain float32 operands (one bf16 product: bf16 accuracy);
- bf16x3:    the tripled-K GEMM, the [M, 3K] operand built in the timed loop;
- 3 GEMMs:   the same three products as three GEMMs over K, each adding into the previous output (oneDNN's
             "add" post-op), the parts built in the timed loop;
- bf16:      native bf16 operands and output (the bf16 mode's GEMM).
GFLOP/s count the useful 2*M*N*K only. Error: max |y - y_fp64| / max |y_fp64| and min row cosine to fp64.
Where oneDNN ignores the flag (CPUs without AMX) "fpmath" shows float32 errors and bf16x3 just costs 3x.
"""

from __future__ import annotations

import argparse

import torch
from gemm_rate import _rate  # best of 3 timing windows (bench/ is the script's folder)

SHAPES = {"qkv": (384, 1152), "attn-out": (384, 384), "ffn-in": (384, 1536), "ffn-out": (1536, 384)}


def _set_precision(value: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = value


def split2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (hi, lo): bf16-representable fp32 parts, hi = bf16(x), lo = bf16(x - hi)."""
    hi = x.bfloat16().float()
    return hi, (x - hi).bfloat16().float()


def split3(x: torch.Tensor) -> torch.Tensor:
    """[M, K] fp32 -> [M, 3K] = [hi | lo | hi]. Every part is exactly a bf16 value, so the GEMM's result is
    the same whether oneDNN rounds its operands to bf16 or multiplies them in fp32 (products of bf16 values
    are exact in fp32): the flag is a permission, not a promise."""
    hi, lo = split2(x)
    return torch.cat([hi, lo, hi], dim=1)


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    y = y.double()
    rel = ((y - ref).abs().max() / ref.abs().max()).item()
    cos = torch.nn.functional.cosine_similarity(y, ref, dim=1).min().item()
    return rel, cos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--window", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pack, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    print(f"threads {args.threads}, rows {args.rows}")
    print(f"{'shape':9} {'variant':8} {'ms':>8} {'GFLOP/s':>8} {'max rel err':>12} {'min cos':>12}")
    totals: dict[str, float] = {}
    flops_total = 0.0
    for name, (k, n) in SHAPES.items():
        x = torch.randn(args.rows, k)
        w = torch.randn(n, k) / k ** 0.5
        b = torch.randn(n) * 0.1
        ref = x.double() @ w.double().T + b.double()
        flops = 2.0 * args.rows * n * k
        flops_total += flops
        _set_precision("ieee")
        w_ieee = pack(w, args.rows)
        w_bf16 = pack(w.bfloat16(), args.rows)
        b_bf16 = b.bfloat16()
        w_hi, w_lo = split2(w)
        _set_precision("bf16")
        w_fpmath = pack(w, args.rows)
        w3 = pack(torch.cat([w_hi, w_hi, w_lo], dim=1).contiguous(), args.rows)
        p_hi, p_lo = pack(w_hi, args.rows), pack(w_lo, args.rows)

        def three_gemms():
            hi, lo = split2(x)
            y = linear(hi, p_hi, b, "none", [], "")
            y = torch.ops.mkldnn._linear_pointwise.binary(lo, y, p_hi, None, "add")
            return torch.ops.mkldnn._linear_pointwise.binary(hi, y, p_lo, None, "add")

        variants = {
            "ieee": ("ieee", lambda: linear(x, w_ieee, b, "none", [], "")),
            "fpmath": ("bf16", lambda: linear(x, w_fpmath, b, "none", [], "")),
            "bf16x3": ("bf16", lambda: linear(split3(x), w3, b, "none", [], "")),
            "3 GEMMs": ("bf16", three_gemms),
            "bf16": ("ieee", lambda: linear(x.bfloat16(), w_bf16, b_bf16, "none", [], "")),
        }
        for label, (precision, fn) in variants.items():
            _set_precision(precision)
            seconds = flops / (_rate(fn, flops, args.window) * 1e9)
            rel, cos = _errors(fn(), ref)
            _set_precision("ieee")
            totals[label] = totals.get(label, 0.0) + seconds
            print(f"{name:9} {label:8} {seconds * 1e3:8.3f} {flops / seconds / 1e9:8.0f} {rel:12.2e} {cos:12.9f}")
    print("layer mix (the four shapes' FLOPs over their summed times):")
    for label, seconds in totals.items():
        print(f"  {label:8} {flops_total / seconds / 1e9:8.0f} GFLOP/s  ({totals['ieee'] / seconds:.2f}x ieee)")


if __name__ == "__main__":
    main()
