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
