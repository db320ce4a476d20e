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

CPU = torch.device("cpu")


@pytest.mark.parametrize("isa", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_on_a_cpu_with_bf16_matrix_instructions(monkeypatch, caplog, isa):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(config_module, "cpu_bf16_matrix_isa", lambda: isa)
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.bfloat16
    message = caplog.text
    assert "dtype=auto resolved to bfloat16" in message and isa in message and "float32" in message


def test_auto_is_fp32_on_a_cpu_without_them(monkeypatch, caplog):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(config_module, "cpu_bf16_matrix_isa", lambda: None)
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.float32
    assert "dtype=auto resolved to float32" in caplog.text and "no native bf16" in caplog.text


def test_auto_cpu_choice_env_override(monkeypatch, caplog):
    monkeypatch.setattr(config_module, "cpu_bf16_matrix_isa", lambda: "avx512_bf16")
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "float32")
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert resolve_dtype("auto", CPU) is torch.float32
    assert CPU_AUTO_DTYPE_ENV in caplog.text
    monkeypatch.setattr(config_module, "cpu_bf16_matrix_isa", lambda: None)
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "bf16")
    assert resolve_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "int3")
    with pytest.raises(ValueError, match=CPU_AUTO_DTYPE_ENV):
        resolve_dtype("auto", CPU)


def test_every_precision_is_selectable_and_explicit_wins(monkeypatch):
    monkeypatch.setattr(config_module, "cpu_bf16_matrix_isa", lambda: "avx512_bf16")
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "bfloat16")
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert resolve_dtype(name, CPU) is dtype


def test_cpu_flags_detection(monkeypatch, tmp_path):
    """The ISA comes from /proc/cpuinfo's flags (AMX preferred); without them, from PyTorch's probes."""
    real_open = open

    def fake_cpuinfo(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k))

    fake_cpuinfo("fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16")
    assert config_module.cpu_bf16_matrix_isa() == "amx_bf16"
    fake_cpuinfo("fpu avx2 avx512f avx512_bf16")
    assert config_module.cpu_bf16_matrix_isa() == "avx512_bf16"
    fake_cpuinfo("fpu avx2 avx512f")
    assert config_module.cpu_bf16_matrix_isa() is None


def test_llm_auto_on_this_cpu_logs_its_choice(minilm_path, caplog, monkeypatch):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    expected = torch.bfloat16 if config_module.cpu_bf16_matrix_isa() and torch.backends.mkldnn.is_available() \
        else torch.float32
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        llm = LLM(str(minilm_path))
    assert llm.llm_engine.dtype is expected
    assert "dtype=auto resolved to" in caplog.text
