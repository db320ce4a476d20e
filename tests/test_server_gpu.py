"""The async engine on CUDA, where the core keeps one batch in flight while it launches the next (the engine
thread then feeds two batches ahead): concurrent callers with mixed tasks get the offline numbers, and a
cancelled caller's queued prompts are dropped. Skipped without a GPU; also runs as a script:

    python tests/test_server_gpu.py
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import tempfile

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.fixtures.bge_m3 import SAMPLE_TEXTS, build_tiny_bge_m3  # noqa: E402
from tokenpool import LLM, EngineArgs, PoolingParams  # noqa: E402
from tokenpool.engine.async_engine import AsyncLLMEngine  # noqa: E402
from tokenpool.engine.engine import LLMEngine  # noqa: E402

TASKS = ("embed", "token_embed", "token_classify")


def check_async_engine_on_cuda(model_dir: str, dtype: str) -> None:
    texts = [f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {' '.join(['more'] * (i % 7))}" for i in range(48)]
    llm = LLM(model_dir, device="cuda", dtype=dtype)
    refs = {t: [o.outputs.data for o in llm.encode(texts, pooling_task=t, use_tqdm=False)] for t in TASKS}
    ids = llm.llm_engine.processor(texts)
    del llm
    args = EngineArgs(model=model_dir, device="cuda", dtype=dtype, max_num_seqs=4)
    engine = AsyncLLMEngine(lambda: LLMEngine(args)).start()
    try:
        async def main():
            calls = [engine.encode([ids[i]], TASKS[i % 3], PoolingParams()) for i in range(len(ids))]
            dropped = asyncio.ensure_future(engine.encode(ids[:8], "token_embed", PoolingParams()))
            await asyncio.sleep(0)
            dropped.cancel()
            return await asyncio.gather(*calls)

        outputs = asyncio.run(main())
        for i, out in enumerate(outputs):
            got, ref = out[0].outputs.data.float(), refs[TASKS[i % 3]][i].float()
            assert got.shape == ref.shape, (i, got.shape, ref.shape)
            if dtype == "float32":
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            else:
                cos = torch.nn.functional.cosine_similarity(got.reshape(1, -1), ref.reshape(1, -1)).item()
                assert cos > 0.999, (i, cos)
        assert engine.num_waiting == 0 and engine.is_healthy
    finally:
        engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_engine_on_cuda(tiny_bge_m3, dtype):
    check_async_engine_on_cuda(str(tiny_bge_m3), dtype)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        path = str(build_tiny_bge_m3(pathlib.Path(folder) / "bge-m3"))
        for dtype in ("float32", "bfloat16"):
            check_async_engine_on_cuda(path, dtype)
            print(f"async engine on CUDA ({dtype}): OK")
