"""`tokenpool embed-corpus`: embed every row of Parquet / JSONL files on Ray, one output file per input file.

Resumable by construction. Each input file is one task of the replica actor pool: the actor reads it, embeds
it in chunks (its engine packs them into batches), writes `OUTPUT/<name>.parquet.tmp-<random>` and renames it
to `OUTPUT/<name>.parquet` when complete (the rename is atomic). A file whose output exists is done; a run
that is interrupted (Ctrl-C, SIGKILL, a lost node) leaves only temporaries, which the next run deletes, and
the next run embeds only the files without output. An actor that dies mid-file is restarted by Ray and its
file is redone from the start. So every input row is in the output exactly once, whatever was interrupted.

(Ray 2.60 also has Ray Data job checkpointing, `DataContext.checkpoint_config`, in beta. It records the ids
of written rows after the write: it is not used here, because a driver killed between a block's write and
its checkpoint would write those rows twice on resume, where the per-file rename cannot duplicate.)

Outputs are written by the actors: on a multi-node cluster OUTPUT must be a path every node sees (a shared
filesystem). Rows of one input file go to one output file in their input order. `format="lance"` makes these
Parquet parts first, then one Lance table from them (see `embed_corpus`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tokenpool.ray import Embedder, _crash_once_hook, actor_pool, remote_args
from tokenpool.ray.arrow import TASKS, check_output_dtype

logger = logging.getLogger("tokenpool")

INPUT_SUFFIXES = (".parquet", ".jsonl", ".json")
TMP_MARK = ".tmp-"
_OWN_TMP = re.compile("[0-9a-f]{32}")  # the suffix of this module's temporary files
CHUNK_ROWS = 2048  # rows per engine call inside one file: memory stays bounded for large files


def list_inputs(spec: str) -> list[Path]:
    """A folder (its *.parquet / *.jsonl / *.json files, recursively), a glob, or one file; sorted."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    files = sorted(p for p in files if p.suffix in INPUT_SUFFIXES)
    if not files:
        raise ValueError(f"No Parquet or JSONL files in {spec!r} (looked for {', '.join(INPUT_SUFFIXES)}).")
    return files


def output_names(files: list[Path]) -> list[str]:
    """One output name per input: its path relative to the inputs' common folder, '/' -> '__', '.parquet'."""
    root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
    names = [str(f.resolve().relative_to(root).with_suffix("")).replace(os.sep, "__") + ".parquet" for f in files]
    if len(set(names)) != len(names):
        raise ValueError("Two input files map to the same output name (e.g. a.jsonl and a.parquet side by side).")
    return names


def read_input(path: Path, columns: list[str]):
    """The `columns` of a Parquet or JSONL file as a pyarrow table."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        table = None if missing else pq.read_table(path, columns=columns)
    else:
        with open(path, encoding="utf-8") as f:
            empty = not any(line.strip() for line in f)
        if empty:  # pyarrow refuses an empty JSON file: an empty output, as for an empty Parquet file
            import pyarrow as pa

            return pa.table({c: pa.array([], pa.string()) for c in columns})
        table = pj.read_json(path)
        missing = [c for c in columns if c not in table.column_names]
        table = None if missing else table.select(columns)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; use --text-column / --id-column.")
    return table


def check_columns(path: Path, columns: list[str]) -> None:
    """ValueError unless the file has `columns` (Parquet: its schema; JSONL: its first record)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            return  # an empty file: an empty output
        try:
            names = list(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            raise ValueError(f"{path}: the first line is not a JSON object.") from None
        import pyarrow as pa
        import pyarrow.json as pj

        try:  # parsed here as the replica will (a failure there would come back as a Ray traceback)
            pj.read_json(path)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: {e} (each field must hold one type in every row: e.g. ids all strings or "
                             "all integers).") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(names)}); use "
                         "--text-column / --id-column.")


def _id_kind(path: Path, id_column: str) -> str | None:
    """"int" or "str": the type of a file's ids (Parquet: the column's type; JSONL: the first row's); None when
    the file is empty or the column is missing (checked elsewhere)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if id_column not in schema.names:
            return None
        kind = schema.field(id_column).type
        return "int" if pa.types.is_integer(kind) else "str" if pa.types.is_string(kind) else str(kind)
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        value = json.loads(first)[id_column] if first else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return None if value is None else "int" if isinstance(value, int) else "str" if isinstance(value, str) \
        else type(value).__name__


class FileEmbedder(Embedder):
    """A replica that embeds whole files: called with batches of (input, output) path pairs."""

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, tokens = [], []
        for src, dst in zip(batch.column("input").to_pylist(), batch.column("output").to_pylist()):
            table = read_input(Path(src), [self.id_column, self.text_column])
            tmp = f"{dst}{TMP_MARK}{uuid.uuid4().hex}"
            writer, n_tokens = None, 0
            try:
                for start in range(0, max(table.num_rows, 1), CHUNK_ROWS):
                    out = self.embed_table(table.slice(start, CHUNK_ROWS))
                    _crash_once_hook()
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, out.schema)
                    writer.write_table(out)
                    n_tokens += int(pa.compute.sum(out.column("num_tokens")).as_py() or 0)
                writer.close()
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dst)
            except BaseException:
                if writer is not None:
                    writer.close()
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            rows.append(table.num_rows)
            tokens.append(n_tokens)
        return pa.table({"input": batch.column("input"), "rows": pa.array(rows, pa.int64()),
                         "tokens": pa.array(tokens, pa.int64())})


def embed_corpus(inputs: str, output: str, model: str | None, *, task: str = "token_embed",
                 text_column: str = "text", id_column: str = "id", output_dtype: str = "float16",
                 input_type: str | None = None, ray_address: str | None = None, replicas: int = 1,
                 gpus_per_replica: float = 0, cpus_per_replica: float | None = None, progress: bool = True,
                 engine_kwargs: dict[str, Any] | None = None, format: str = "parquet",
                 table_name: str = "embeddings", truncate_prompt_tokens: int | None = None) -> dict[str, int]:
    """Embed every row of `inputs` into `output`; returns {"files": embedded now, "skipped": already done,
    "rows": ..., "tokens": ...}. See the module doc.

    format "parquet": `output` is a folder of Parquet files, one per input file. format "lance": `output` is
    a LanceDB database folder that gets the table `table_name` (`<output>/<table_name>.lance`): the per-file
    Parquet parts are made first, resumable as above, in `<output>/_parts/`; once all exist they are streamed
    into a Lance dataset written under a temporary name and renamed into place, then the parts are deleted.
    A run that finds the table already there has nothing to do.
    """
    if format not in ("parquet", "lance"):
        raise ValueError(f"format must be 'parquet' or 'lance', got {format!r}.")
    args = dict(model=model, task=task, text_column=text_column, id_column=id_column, output_dtype=output_dtype,
                input_type=input_type, ray_address=ray_address, replicas=replicas, gpus_per_replica=gpus_per_replica,
                cpus_per_replica=cpus_per_replica, progress=progress, engine_kwargs=engine_kwargs,
                truncate_prompt_tokens=truncate_prompt_tokens)
    if format == "parquet":
        return _embed_files(inputs, Path(output), **args)
    from tokenpool.extras import require

    require("lance", "embed-corpus --format lance")
    import lance
    import pyarrow.dataset as pds

    root = Path(output)
    if root.exists() and not root.is_dir():
        raise ValueError(f"OUTPUT {root} is a file: it must be a folder (the LanceDB database, created if missing).")
    if Path(table_name).name != table_name or table_name in ("", ".", ".."):
        raise ValueError(f"--table must be a plain name, got {table_name!r}.")
    final = root / f"{table_name}.lance"
    if final.exists():
        logger.info("embed-corpus: the Lance table %s exists: nothing to do", final)
        return {"files": 0, "skipped": len(list_inputs(inputs)), "rows": 0, "tokens": 0}
    kinds = {f: _id_kind(f, id_column) for f in list_inputs(inputs)}
    if len(set(kinds.values()) - {None}) > 1:  # one table, one id column type: say so before any work
        raise ValueError("--format lance writes one table, whose id column has one type; these inputs differ: "
                         + ", ".join(f"{f.name} has {k} ids" for f, k in kinds.items() if k) + ".")
    parts = root / "_parts"
    summary = _embed_files(inputs, parts, **args)
    for stale in root.glob(f".{table_name}.lance{TMP_MARK}*"):
        shutil.rmtree(stale)
    tmp = root / f".{table_name}.lance{TMP_MARK}{uuid.uuid4().hex}"
    lance.write_dataset(pds.dataset(sorted(str(p) for p in parts.glob("*.parquet"))).scanner(batch_size=4096)
                        .to_reader(), str(tmp))
    os.replace(tmp, final)  # a directory rename: the table appears whole
    shutil.rmtree(parts)
    return summary


class IncompleteJob(RuntimeError):
    """The job's iteration ended but some output files are not there: it must not be reported as done."""


def _remove_own_temporaries(out_dir: Path) -> None:
    """Delete the temporary output files this module writes (`<file>.parquet.tmp-<uuid4 hex>`), nobody else's."""
    for stale in out_dir.glob(f"*.parquet{TMP_MARK}*"):
        if _OWN_TMP.fullmatch(stale.name.split(TMP_MARK)[-1]):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _interrupts_recorded():
    """Within it a SIGINT is remembered as well as raised: a KeyboardInterrupt raised where Python cannot
    deliver it (inside a finalizer, "Exception ignored in ...") or caught by a library would otherwise let an
    interrupted job end as if it had finished. Yields a list that holds the signal if one came."""
    seen: list = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield seen
        return

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _embed_files(inputs: str, out_dir: Path, *, model: str | None, task: str, text_column: str, id_column: str,
                 output_dtype: str, input_type: str | None, ray_address: str | None, replicas,
                 gpus_per_replica: float, cpus_per_replica: float | None, progress: bool,
                 engine_kwargs: dict[str, Any] | None, truncate_prompt_tokens: int | None = None) -> dict[str, int]:
    """The Parquet job: one output file per input file in `out_dir` (see the module doc)."""
    import ray
    import ray.data

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    check_output_dtype(output_dtype)
    pool = actor_pool(replicas)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUTPUT {out_dir} is a file: it must be a folder (created if missing).")
    own = out_dir.resolve()
    files = [f for f in list_inputs(inputs) if own not in f.resolve().parents]  # not this job's own outputs
    if not files:
        raise ValueError(f"No input files in {inputs!r} outside OUTPUT {out_dir}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_own_temporaries(out_dir)  # left by an interrupted run
    targets = [out_dir / name for name in output_names(files)]
    pending = [(f, t) for f, t in zip(files, targets) if not t.exists()]
    summary = {"files": 0, "skipped": len(files) - len(pending), "rows": 0, "tokens": 0}
    for f, _ in pending:  # before any Ray work: a wrong column name costs no wait
        check_columns(f, [id_column, text_column])
    if not pending:
        logger.info("embed-corpus: all %d files are done in %s", len(files), out_dir)
        return summary
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if ray_address else {"num_cpus": os.cpu_count()}))
    remote: dict[str, Any] = {}  # Ray Data restarts dead pool actors and retries their tasks by default
    engine_kwargs = dict(engine_kwargs or {})
    if cpus_per_replica is not None:
        remote["num_cpus"] = cpus_per_replica
    if not gpus_per_replica:
        engine_kwargs.setdefault("device", "cpu")
    ds = ray.data.from_items([{"input": str(f), "output": str(t)} for f, t in pending],
                             override_num_blocks=len(pending))
    results = ds.map_batches(
        FileEmbedder,
        fn_constructor_kwargs=dict(model=model, task=task, text_column=text_column, id_column=id_column,
                                   output_dtype=output_dtype, input_type=input_type, engine_kwargs=engine_kwargs,
                                   truncate_prompt_tokens=truncate_prompt_tokens),
        batch_size=1, batch_format="pyarrow", compute=pool, num_gpus=gpus_per_replica or None, **remote_args(remote))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), unit="file", desc="embed-corpus", dynamic_ncols=True)
    start = time.perf_counter()
    with _interrupts_recorded() as interrupted:
        for row in results.iter_rows():
            if interrupted:  # swallowed inside the iteration: stop at the next file, not at the end
                break
            summary["files"] += 1
            summary["rows"] += row["rows"]
            summary["tokens"] += row["tokens"]
            if bar is not None:
                rate = summary["tokens"] / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(rows=summary["rows"], tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    if interrupted:  # a Ctrl-C whose KeyboardInterrupt something swallowed: never report the job as done
        raise KeyboardInterrupt
    missing = [t.name for _, t in pending if not t.exists()]
    if missing:
        raise IncompleteJob(f"{len(missing)} of {len(pending)} output files were not written "
                           f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run the same "
                           "command again to finish them.")
    _remove_own_temporaries(out_dir)  # of attempts whose actor died (their file was redone)
    return summary
