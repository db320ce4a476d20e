"""The seed's offline programs, adapted only by the package name, run against local checkpoints."""

import re
import subprocess
import sys
from pathlib import Path

from tokenpool import LLM

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is", "The future of AI is"]


def test_multi_vector_retrieval_example(tiny_bge_m3):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "multi_vector_retrieval.py"), "--model", str(tiny_bge_m3)],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    lengths = [int(x) for x in lines if re.fullmatch(r"\d+", x)]
    shapes = [tuple(map(int, m.groups())) for x in lines if (m := re.fullmatch(r"torch\.Size\(\[(\d+), (\d+)\]\)", x))]
    llm = LLM(str(tiny_bge_m3))
    expected = [tuple(o.outputs.data.shape) for o in llm.encode(PROMPTS, pooling_task="token_embed", use_tqdm=False)]
    hidden = llm.llm_engine.hf_config.hidden_size
    assert lengths == [hidden] * 4
    assert shapes == expected and all(s[1] == hidden for s in shapes)
