"""The machine's measured GEMM rate on the CPU (fp32, and bf16 where the CPU multiplies bf16 natively), via torch.

    python bench/gemm_rate.py [--threads N] [--square 2048,4096] [--rows 4096] [--bf16 auto|on|off] [--json-out F]

Measured, each with `torch.set_num_threads(N)`:
- large square matmuls `torch.mm` (MKL sgemm for fp32, oneDNN for bf16);
- the all-MiniLM-L6-v2 layer GEMMs at `--rows` token rows: [M,384]x[384,1152] (fused QKV), [M,384]x[384,384]
  (attention out), [M,384]x[384,1536] (FFN in), [M,1536]x[1536,384] (FFN out), each through `F.linear` and
  through oneDNN's `torch.ops.mkldnn._linear_pointwise` with pre-packed weights (where this torch has it), the
  faster of the two per shape; "layer mix" is the four shapes' FLOPs over their summed best times (one layer's
  worth of GEMMs).
Each rate is the best of 3 timing windows of >= `--window` seconds after a warm-up. "best" is the highest rate
seen in any of them: the ceiling bench/cpu_token_embed.py divides by.

`measure(threads, ...)` returns the same numbers as a dict (used by bench/cpu_token_embed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

H, I = 384, 1536
MINILM_SHAPES = {  # name: (K, N) of [M, K] x [K, N]
    "qkv [M,384]x[384,1152]": (H, 3 * H),
    "attn-out [M,384]x[384,384]": (H, H),
    "ffn-in [M,384]x[384,1536]": (H, I),
    "ffn-out [M,1536]x[1536,384]": (I, H),
}


def _load_isa():
    """tokenpool/platforms/isa.py (standard library only), loaded by path: the benchmark's parent and the peer
    venvs import nothing of tokenpool (whose package imports torch)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tokenpool" / "platforms" / "isa.py"
    spec = importlib.util.spec_from_file_location("_tokenpool_isa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ISA = _load_isa()
ISA_CLASSES = _ISA.ISA_CLASSES
_CAPS = _ISA.CAP_VARIABLES
ISA_LABELS = {"none": "below AVX2", "avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX-512+BF16", "amx": "AMX"}
ISA_ENV = (*_CAPS, "DNNL_MAX_CPU_ISA", "MKL_DEBUG_CPU_TYPE", "ORT_DISABLE_AVX512")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(env=os.environ) -> dict:
    """{"hardware_class", "isa_class" (lowered by the cap variables), "caps" (the ones set), "native_bf16"}."""
    hardware = _ISA.hardware_class(cpu_flags())
    cls, caps = _ISA.lowered_class(hardware, env)
    return {"hardware_class": hardware, "isa_class": cls, "caps": dict(caps),
            "native_bf16": cls in ("avx512_bf16", "amx")}


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (class AVX-512+BF16 or AMX after the caps)."""
    return cpu_isa()["native_bf16"]


def _rate(fn, flops: float, window: float) -> float:
    """GFLOP/s: best of 3 windows of >= `window` s, after 2 warm-up calls."""
    fn()
    fn()
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= window:
                break
        best = max(best, n * flops / dt / 1e9)
    return best


def measure(threads: int, dtypes=("float32", "bfloat16"), square=(2048, 4096), rows: int = 4096,
            window: float = 0.3, log=None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    out = {"threads": threads, "torch": torch.__version__, "rows": rows}
    for name in dtypes:
        dt = getattr(torch, name)
        res: dict = {"square": {}, "shapes": {}}
        with torch.inference_mode():
            for s in square:
                a, b = torch.randn(s, s, dtype=dt), torch.randn(s, s, dtype=dt)
                res["square"][f"mm {s}^3"] = _rate(lambda: torch.mm(a, b), 2.0 * s ** 3, window)
                if log:
                    log(f"{name} mm {s}^3: {res['square'][f'mm {s}^3']:.0f} GFLOP/s")
                a = b = None
            total_flops, total_time = 0.0, 0.0
            for label, (k, n) in MINILM_SHAPES.items():
                x = torch.randn(rows, k, dtype=dt)
                w = (torch.randn(n, k) * 0.02).to(dt)
                flops = 2.0 * rows * k * n
                rates = {"F.linear": _rate(lambda: F.linear(x, w), flops, window)}
                if onednn:
                    try:
                        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                        rates["onednn"] = _rate(
                            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), flops, window)
                    except Exception as e:  # noqa: BLE001 - only one of the paths
                        rates["onednn_error"] = str(e).splitlines()[0][:120]
                best = max(v for v in rates.values() if isinstance(v, float))
                res["shapes"][label] = rates | {"best": best}
                total_flops += flops
                total_time += flops / (best * 1e9)
                if log:
                    log(f"{name} {label}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()
                                                        if isinstance(v, float)) + " GFLOP/s")
            res["layer_mix"] = total_flops / total_time / 1e9
        res["best"] = max([*res["square"].values(), *(v["best"] for v in res["shapes"].values())])
        out[name] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--square", default="2048,4096", help="comma-separated sizes of square matmuls")
    p.add_argument("--rows", type=int, default=4096, help="token rows M of the MiniLM layer shapes")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="auto: bf16 only where the CPU multiplies bf16 natively (class AVX-512+BF16 or AMX, "
                        "after ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS)")
    p.add_argument("--window", type=float, default=0.3, help="seconds per timing window")
    p.add_argument("--json-out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    dtypes = ["float32"]
    if args.bf16 == "on" or (args.bf16 == "auto" and native_bf16()):
        dtypes.append("bfloat16")
    log = None if args.quiet else (lambda m: print(m, flush=True))
    res = measure(args.threads, dtypes, [int(s) for s in args.square.split(",") if s], args.rows, args.window, log)
    res["isa"] = cpu_isa()
    for name in dtypes:
        r = res[name]
        print(f"{name}: best {r['best']:.0f} GFLOP/s, MiniLM layer mix {r['layer_mix']:.0f} GFLOP/s "
              f"({args.threads} threads, torch {res['torch']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
