"""EngineArgs / FlexibleArgumentParser: vLLM's flag spellings, and every flag reaches LLM(**vars(args))."""

import pytest

from tokenpool import LLM, EngineArgs, PoolerConfig
from tokenpool.utils.argparse_utils import FlexibleArgumentParser


def test_underscore_and_dash_spellings():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--max_model_len", "128", "--max-num-batched-tokens", "8k",
                              "--gpu_memory_utilization=0.5", "--hf-overrides", '{"architectures": ["X"]}',
                              "--pooler-config", '{"pooling_type": "mean"}', "--enforce-eager"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.max_model_len == 128
    assert engine_args.max_num_batched_tokens == 8192
    assert engine_args.gpu_memory_utilization == 0.5
    assert engine_args.hf_overrides == {"architectures": ["X"]}
    assert engine_args.pooler_config == PoolerConfig(pooling_type="MEAN")
    assert engine_args.enforce_eager


def test_all_cli_args_are_llm_kwargs(minilm_path):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    parser.set_defaults(model=str(minilm_path), runner="pooling", enforce_eager=True)
    args = parser.parse_args(["--block-size", "16", "--swap-space", "4", "--max_num_seqs", "8"])
    llm = LLM(**vars(args))  # the seed's second program does exactly this
    assert llm.llm_engine.scheduler.max_num_seqs == 8


@pytest.mark.parametrize("bad", [["--dtype", "float8"], ["--runner", "generate"], ["--max-model-len", "x"]])
def test_bad_flags_exit_with_usage(bad):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(bad)


# ----- dtype="auto" on the CPU -----
import logging  # noqa: E402

import torch  # noqa: E402

from tokenpool import config as config_module  # noqa: E402
from tokenpool.config import CPU_AUTO_DTYPE_ENV, resolve_dtype  # noqa: E402
from tokenpool.platforms import cpu as cpu_module  # noqa: E402
from tokenpool.platforms.cpu import CpuInfo  # noqa: E402

CPU = torch.device("cpu")


def _fake_cpu(monkeypatch, isa_class: str, flags: str = "") -> None:
    info = CpuInfo("test CPU", 2, frozenset(flags.split()), isa_class, isa_class, ())
    monkeypatch.setattr(cpu_module, "cpu_info", lambda: info)
    monkeypatch.setattr(config_module, "cpu_info", lambda: info)


@pytest.mark.parametrize("isa", ["avx512_bf16", "amx"])
def test_auto_is_bf16_on_a_cpu_with_bf16_matrix_instructions(monkeypatch, caplog, isa):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    _fake_cpu(monkeypatch, isa)
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.bfloat16
    message = caplog.text
    assert "dtype=auto resolved to bfloat16" in message and isa.upper() in message and "float32" in message


@pytest.mark.parametrize("isa", ["avx2", "avx512", "none"])
def test_auto_is_fp32_on_a_cpu_without_them(monkeypatch, caplog, isa):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    _fake_cpu(monkeypatch, isa)
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.float32
    assert "dtype=auto resolved to float32" in caplog.text and "no native bf16" in caplog.text


def test_auto_cpu_choice_env_override(monkeypatch, caplog):
    _fake_cpu(monkeypatch, "avx512_bf16")
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "float32")
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.float32
    assert CPU_AUTO_DTYPE_ENV in caplog.text
    _fake_cpu(monkeypatch, "avx2")
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "bf16")
    assert resolve_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "int3")
    with pytest.raises(ValueError, match=CPU_AUTO_DTYPE_ENV):
        resolve_dtype("auto", CPU)


def test_every_precision_is_selectable_and_explicit_wins(monkeypatch):
    _fake_cpu(monkeypatch, "avx512_bf16")
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "bfloat16")
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert resolve_dtype(name, CPU) is dtype


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse4_2", "none"),
    ("fpu avx avx2 fma", "avx2"),
    ("fpu avx2 avx512f avx512bw avx512vl avx512dq", "avx512"),
    ("fpu avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16", "avx512_bf16"),
    ("fpu avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile amx_bf16", "amx"),
    ("fpu avx2 avx512f", "avx2"),  # AVX-512 without BW/VL/DQ (Knights Landing): oneDNN treats it as AVX2
])
def test_isa_class_from_cpu_flags(flags, expected):
    assert cpu_module.hardware_class(frozenset(flags.split())) == expected


def test_cap_variables_lower_the_class():
    """The variables that cap PyTorch's, oneDNN's and MKL's kernels lower the class; the lowest wins."""
    assert cpu_module.lowered_class("amx", {})[0] == "amx"
    assert cpu_module.lowered_class("amx", cpu_module.AVX2_ENV)[0] == "avx2"
    assert cpu_module.lowered_class("amx", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})[0] == "avx512_bf16"
    assert cpu_module.lowered_class("amx", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})[0] == "avx512"
    assert cpu_module.lowered_class("avx512_bf16", {"ATEN_CPU_CAPABILITY": "avx2",
                                                    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})[0] == "avx2"
    assert cpu_module.lowered_class("avx2", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})[0] == "avx2"  # caps never raise
    cls, caps = cpu_module.lowered_class("amx", {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "UNRELATED": "1"})
    assert cls == "avx2" and caps == (("MKL_ENABLE_INSTRUCTIONS", "AVX2"),)


@pytest.mark.parametrize("isa, bf16_mode", [("avx2", "emulated"), ("avx512", "emulated"), ("avx512_bf16", "onednn"),
                                            ("amx", "onednn")])
def test_gemm_mode_per_class(monkeypatch, isa, bf16_mode):
    _fake_cpu(monkeypatch, isa)
    if not cpu_module.onednn_available():
        pytest.skip("this PyTorch has no oneDNN: every dtype runs through F.linear")
    assert cpu_module.gemm_mode(torch.float32) == "onednn"
    assert cpu_module.gemm_mode(torch.bfloat16) == bf16_mode
    assert cpu_module.gemm_mode(torch.float16) == "emulated"


def test_llm_auto_on_this_cpu_logs_its_choice(minilm_path, caplog, monkeypatch):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    expected = torch.bfloat16 if cpu_module.cpu_info().native_bf16 and cpu_module.onednn_available() \
        else torch.float32
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        llm = LLM(str(minilm_path))
    assert llm.llm_engine.dtype is expected
    assert "dtype=auto resolved to" in caplog.text
