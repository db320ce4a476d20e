"""Helpers the tests share: driving the engine by hand, the batch-invariance check, and the C kernels' AMX builds
with the tile unit emulated.

Batch invariance is judged by what the precision can promise, not by a measurement of ourselves: in fp32
every value within 1e-5; in bf16 (GEMMs of different batch shapes round differently) every row at cosine
>= 0.999 to the prompt run alone, the bar the model-equivalence tests set for bf16.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.settings import DTYPE
from tokenpool import PoolingParams


def run_mixed(engine, prompts: list[tuple[str, list[int], str]]) -> dict:
    """Queue (request id, token ids, task) on an `LLMEngine` by hand, step until done: {id: output data}."""
    for request_id, ids, task in prompts:
        engine.add_request(request_id, ids, task, PoolingParams())
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out.outputs.data
    return results


def assert_batch_invariant(alone, together, dtype: str = DTYPE) -> None:
    """A prompt's output in a mixed batch equals its output alone (a tensor, or a dict of them)."""
    if isinstance(alone, dict):
        assert alone.keys() == together.keys()
        for key in alone:
            assert_batch_invariant(alone[key], together[key], dtype)
        return
    assert alone.shape == together.shape
    if dtype == "float32":
        assert torch.allclose(alone, together, atol=1e-5), (alone - together).abs().max()
        return
    rows_a, rows_b = alone.float().reshape(-1, alone.shape[-1]) if alone.dim() > 1 else alone.float()[None], \
        together.float().reshape(-1, alone.shape[-1]) if together.dim() > 1 else together.float()[None]
    cos = F.cosine_similarity(rows_a, rows_b, dim=-1, eps=1e-12)
    both_zero = (rows_a.norm(dim=-1) == 0) & (rows_b.norm(dim=-1) == 0)
    assert torch.all(both_zero | (cos >= 0.999)), cos.min()


def amx_emulated(name: str, argtypes: tuple, directory: Path) -> ctypes.CFUNCTYPE:
    """`tp_<name>` of the C kernel `name`'s AMX build with the tile unit emulated in C (tests/fixtures/
    amx_emulated.c), built into `directory`: its tile code runs on any CPU with AVX-512 and BF16 (the build's vector
    code needs them), so that class tests it, not only AMX machines. Skips the test elsewhere."""
    from tokenpool import kernels
    from tokenpool.platforms.cpu import cpu_info

    if cpu_info().isa_class not in ("avx512_bf16", "amx"):
        pytest.skip(f"the AMX build's vector code needs AVX-512 with BF16 (this CPU: {cpu_info().isa_class} class)")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    fixture = Path(__file__).parent / "fixtures" / "amx_emulated.c"
    target = directory / f"{name}_amx_emulated.so"
    flags = [*kernels._COMMON_FLAGS, *kernels._ISA_FLAGS["amx"], f"-I{Path(kernels.__file__).parent}",
             f'-DKERNEL="{name}.c"']
    proc = subprocess.run([compiler, *flags, str(fixture), "-o", str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this compiler does not build the AMX variant: {proc.stderr[-300:]}")
    fn = getattr(ctypes.CDLL(str(target)), f"tp_{name}")
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn
