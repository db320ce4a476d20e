"""tokenpool on Ray (the optional `ray` extra: `pip install 'tokenpool[ray]'`; the core never imports Ray).

    embed_dataset(ds, model, task="token_embed", ...)   a Ray Data dataset in, one with the embeddings out
    tokenpool embed-corpus INPUT OUTPUT --model M          the same job over Parquet / JSONL files, resumable
    serve_app(model, num_replicas=N, ...)                  tokenpool serve's app on Ray Serve replicas
    write_lancedb(ds, uri, table) / write_qdrant(ds, name) embed_dataset's output into a vector store

One engine per replica actor, built once (`map_batches` with a callable class and an actor pool), fed
batches of rows that it packs into its own forward batches. An actor that dies is restarted by Ray and the
batch it held is run again: every input row comes out exactly once. Output columns are plain Arrow types
(`tokenpool.ray.arrow`).
"""

from __future__ import annotations

import os
from typing import Any

from tokenpool.extras import require
from tokenpool.ray.arrow import TASKS, check_output_dtype, outputs_table
from tokenpool.ray.sinks import write_lancedb, write_qdrant

__all__ = ["embed_dataset", "serve_app", "write_lancedb", "write_qdrant", "Embedder"]


def serve_app(model: str | None = None, **kwargs):
    """`tokenpool.ray.serve.serve_app` (imported on use: it needs Ray Serve); see there."""
    require("ray", "tokenpool.ray.serve_app")
    require("server", "tokenpool.ray.serve_app")
    from tokenpool.ray.serve import serve_app as build

    return build(model, **kwargs)

# Test hook: an actor whose process finds this file missing creates it and dies in the middle of a batch
# (once per file: the restarted actor finds it). Used by the tests to prove that nothing is lost or
# duplicated when Ray restarts an actor; set it through `ray_remote_args={"runtime_env": {"env_vars": ...}}`.
CRASH_ONCE_ENV = "TOKENPOOL_RAY_CRASH_ONCE"


def _crash_once_hook() -> None:
    path = os.environ.get(CRASH_ONCE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)  # noqa: SLF001 - the point is an abrupt death, as a killed process


class Embedder:
    """The replica: one `LLM` built in the actor, called on pyarrow batches of (id, text) rows."""

    def __init__(self, model: str | None, task: str, text_column: str, id_column: str, output_dtype: str,
                 input_type: str | None, engine_kwargs: dict[str, Any], truncate_prompt_tokens: int | None = None):
        from tokenpool import LLM, PoolingParams

        self.llm = LLM(model, **engine_kwargs)
        if task == "all" and not self.llm.llm_engine.info.lexical_weights:
            raise ValueError(f"task 'all' writes dense, sparse and colbert columns: {model} has no sparse head "
                             "(BGE-M3 has); use embed or token_embed.")
        if task not in self.llm.supported_tasks:
            raise ValueError(f"task {task!r} is not supported by {model}: it supports "
                             f"{', '.join(self.llm.supported_tasks)}.")
        self.task, self.text_column, self.id_column, self.output_dtype = task, text_column, id_column, output_dtype
        self.params = PoolingParams(input_type=input_type) if input_type else None
        self.truncate = truncate_prompt_tokens  # None: a text over the context length fails the job, saying so

    def embed_table(self, table):
        """pyarrow table with the id and text columns -> the output table (same rows, same order)."""
        texts = table.column(self.text_column).to_pylist()
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"Column {self.text_column!r} must hold strings; row {bad} (id "
                             f"{table.column(self.id_column)[bad].as_py()!r}) holds {texts[bad]!r}.")
        outputs = self.llm.encode(texts, self.params, pooling_task=self.task, use_tqdm=False,
                                  truncate_prompt_tokens=self.truncate)
        ids = table.column(self.id_column)
        return outputs_table(ids.to_pylist(), outputs, self.task, self.llm.llm_engine.info.output_dims,
                             self.output_dtype, id_type=ids.type)

    def __call__(self, batch):
        _crash_once_hook()
        return self.embed_table(batch)


def replica_range(num_replicas) -> tuple[int, int | None]:
    """(n, None) for a fixed count, (min, max) for an autoscaling pair; ValueError for anything else."""
    if isinstance(num_replicas, int) and not isinstance(num_replicas, bool) and num_replicas >= 1:
        return num_replicas, None
    if (isinstance(num_replicas, tuple | list) and len(num_replicas) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in num_replicas)
            and 1 <= num_replicas[0] <= num_replicas[1]):
        return num_replicas[0], num_replicas[1]
    raise ValueError(f"num_replicas must be a positive int or a (min, max) pair, got {num_replicas!r}.")


def actor_pool(num_replicas):
    """`ray.data.ActorPoolStrategy` of `num_replicas` actors, or autoscaling between a (min, max) pair."""
    import ray.data

    low, high = replica_range(num_replicas)
    if high is None:
        return ray.data.ActorPoolStrategy(size=low)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def embed_dataset(ds, model: str | None, *, task: str = "token_embed", text_column: str = "text",
                  id_column: str = "id", output_dtype: str = "float16", num_replicas: int | tuple[int, int] = 1,
                  num_gpus_per_replica: float = 0, num_cpus_per_replica: float | None = None,
                  batch_size: int = 256, input_type: str | None = None, ray_remote_args: dict | None = None,
                  truncate_prompt_tokens: int | None = None, **engine_kwargs):
    """Embed the `text_column` of a Ray Data dataset with `model`; returns a dataset with the columns `id`
    (the `id_column`'s values), `num_tokens` and `embedding` (task "all": `dense`, `sparse`, `colbert`), see
    `tokenpool.ray.arrow`. Lazy, as Ray Data is: write it (`write_parquet`) or iterate it.

    num_replicas: actors, each with its own engine (a (min, max) pair autoscales); num_gpus_per_replica: 0
    (CPU) or 1; num_cpus_per_replica: CPUs reserved per actor (Ray's default 1; on the CPU the engine uses
    that many threads; leave CPUs for Ray Data's read tasks: actors holding every CPU stall the job); batch_size: rows handed to an actor per call (the engine packs them into its own
    batches); input_type: "query" / "document" for models with modes (ColBERT); engine_kwargs: as for
    `LLM(...)` (dtype, max_num_batched_tokens, ...).
    """
    require("ray", "tokenpool.ray.embed_dataset")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    check_output_dtype(output_dtype)
    pool = actor_pool(num_replicas)
    if input_type not in (None, "query", "document"):
        raise ValueError(f"input_type must be 'query' or 'document', got {input_type!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    columns = ds.columns()
    for name, column in (("text_column", text_column), ("id_column", id_column)):
        if column not in columns:
            raise ValueError(f"{name} {column!r} is not a column of the dataset (columns: {', '.join(columns)}).")
    # Ray Data restarts dead pool actors and retries their tasks by default (max_restarts = max_task_retries
    # = -1), which is what makes every row come out exactly once.
    remote = dict(ray_remote_args or {})
    if num_cpus_per_replica is not None:
        remote["num_cpus"] = num_cpus_per_replica
        if not num_gpus_per_replica:
            engine_kwargs.setdefault("device", "cpu")
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(model=model, task=task, text_column=text_column, id_column=id_column,
                                   output_dtype=output_dtype, input_type=input_type, engine_kwargs=engine_kwargs,
                                   truncate_prompt_tokens=truncate_prompt_tokens),
        batch_size=batch_size, batch_format="pyarrow", compute=pool,
        num_gpus=num_gpus_per_replica or None, **remote_args(remote))


def remote_args(remote: dict) -> dict:
    """`map_batches` keywords: Ray's named remote parameters as such, anything else as extra remote args."""
    named = ("num_cpus", "memory", "resources", "accelerator_type", "runtime_env", "label_selector", "max_calls")
    extra = {k: v for k, v in remote.items() if k not in named}
    return {**{k: remote[k] for k in named if k in remote}, **({"ray_remote_args_fn": lambda: extra} if extra else {})}
