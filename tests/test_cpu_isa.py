"""Every dtype on every CPU class: the lowered-ISA paths run here, whatever this machine is.

`tokenpool.platforms.cpu.AVX2_ENV` caps PyTorch, oneDNN and MKL at AVX2, so an AVX-512 or AMX machine runs
the code an AVX2-only CPU (AMD Zen 3) runs. The children are separate processes because the caps are read
when the libraries load. References: sentence-transformers fp32 on the same real MiniLM weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tokenpool import LLM
from tokenpool.platforms.cpu import AVX2_ENV, cpu_info, gemm_mode, onednn_available

TEXTS = [
    "Hello, my name is",
    "A much longer passage about retrieval: late interaction models keep one vector per token, "
    "and score a query against a document by summing, over query tokens, the best match in the document.",
    "x",
]

_CHILD = textwrap.dedent("""
    import json, logging, sys
    import torch
    from tokenpool import LLM
    from tokenpool.platforms.cpu import cpu_info, gemm_mode

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    path, dtype, out = sys.argv[1:4]
    llm = LLM(path, dtype=dtype, device="cpu")
    texts = json.loads(sys.stdin.read())
    data = [o.outputs.data for o in llm.encode(texts, pooling_task="token_embed", use_tqdm=False)]
    torch.save({"data": data, "class": cpu_info().isa_class, "mode": gemm_mode(llm.llm_engine.dtype)}, out)
""")


def _run_lowered(minilm_path, tmp_path, dtype: str, env_caps: dict[str, str]) -> tuple[dict, str]:
    out = tmp_path / f"{dtype}.pt"
    env = {**os.environ, **env_caps}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(minilm_path), dtype, str(out)], input=json.dumps(TEXTS),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out), proc.stderr


@pytest.fixture(scope="module")
def reference(minilm_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    return [r.float() for r in model.encode(TEXTS, output_value="token_embeddings")]


def _min_cos(ours, ref) -> float:
    return min(F.cosine_similarity(o.float(), r, dim=1).min().item() for o, r in zip(ours, ref))


@pytest.mark.parametrize("dtype, cos_min", [("float32", 0.99999), ("bfloat16", 0.999), ("float16", 0.999)])
def test_every_dtype_runs_on_the_avx2_path(minilm_path, tmp_path, reference, dtype, cos_min):
    """On an AVX2-only CPU every dtype works (bf16/fp16 emulated: rounded inputs, fp32 arithmetic) and the
    log says how; PyTorch's own bf16 GEMM would refuse such a CPU from inside the first batch."""
    result, log = _run_lowered(minilm_path, tmp_path, dtype, AVX2_ENV)
    assert result["class"] == "avx2"
    assert "AVX2 class, lowered from" in log
    if onednn_available():
        assert result["mode"] == ("onednn" if dtype == "float32" else "emulated")
        if dtype != "float32":
            assert f"{dtype} emulated" in log
    assert _min_cos(result["data"], reference) >= cos_min


def test_emulated_bf16_computes_what_native_bf16_computes(minilm_path, tmp_path):
    """The emulated path is the bf16 model, not fp32 under another name: it agrees with the native path
    (run in this process where the CPU has it, else with the AVX-512 class's oneDNN emulation of bf16)."""
    emulated, _ = _run_lowered(minilm_path, tmp_path, "bfloat16", AVX2_ENV)
    fp32, _ = _run_lowered(minilm_path, tmp_path, "float32", AVX2_ENV)
    native = [o.outputs.data for o in LLM(str(minilm_path), dtype="bfloat16", device="cpu")
              .encode(TEXTS, pooling_task="token_embed", use_tqdm=False)]
    to_native = _min_cos(emulated["data"], native)
    to_fp32 = _min_cos(emulated["data"], fp32["data"])
    assert to_native >= 0.9999
    assert to_fp32 < 0.99999, "bf16 rounding left no trace: the emulated path did not round to bf16"


@pytest.mark.skipif(not cpu_info().native_bf16, reason=f"needs AVX512-BF16 or AMX; this CPU is {cpu_info().describe()}")
@pytest.mark.skipif(not onednn_available(), reason="needs PyTorch built with oneDNN")
def test_native_bf16_path_where_the_cpu_has_it(minilm_path, reference):
    llm = LLM(str(minilm_path), dtype="bfloat16", device="cpu")
    assert gemm_mode(torch.bfloat16) == "onednn"
    data = [o.outputs.data for o in llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)]
    qkv = llm.llm_engine.model.backbone.layers[0].qkv
    assert qkv._cpu_weights()[0].dtype == torch.bfloat16  # the GEMMs really run in bf16
    assert _min_cos(data, reference) >= 0.999
