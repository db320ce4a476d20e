"""`tokenpool index build` and `tokenpool index search` (and `compact`, in tokenpool/entrypoints/cli.py): the
multi-vector index from the command line.

    tokenpool index build DIR --model M --input FILES... [--codec float16]   texts (Parquet / JSONL with id and text),
                                                                            or embed-corpus's Parquet (id, embedding)
    tokenpool index search DIR --model M "a query" ["another" ...] [-k 10]
    tokenpool index compact DIR                                             one segment, deleted data dropped

`build` streams its inputs in chunks (bounded memory), adds each chunk as one durable `add` (for a new residual
index the first add is TRAIN_ROWS documents: its codec is trained on them), and shows a progress bar; running it
again over the same inputs replaces the same ids (upsert), so an interrupted build is finished by running it
again. Within the inputs, a later row of an id replaces an earlier one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

CHUNK_ROWS = 1024
TRAIN_ROWS = 16 * CHUNK_ROWS  # documents of the first add of a residual index: its codec's training sample


def _rows(path: Path, columns: list[str], chunk: int) -> Iterator[dict[str, list]]:
    """Chunks of `columns` from a Parquet or JSONL file, as {column: values}."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"Reading {path} needs pyarrow: pip install pyarrow (or 'tokenpool[ray]').") from None
        parquet = pq.ParquetFile(path)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (it has "
                             f"{', '.join(parquet.schema_arrow.names)}).")
        for batch in parquet.iter_batches(batch_size=chunk, columns=columns):
            yield {c: batch.column(c).to_pylist() for c in columns}
        return
    block: dict[str, list] = {c: [] for c in columns}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                values = [record[c] for c in columns]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object with {', '.join(columns)} ({e}).") from None
            for c, v in zip(columns, values):
                block[c].append(v)
            if len(block[columns[0]]) >= chunk:
                yield block
                block = {c: [] for c in columns}
    if block[columns[0]]:
        yield block


def _is_embedded(path: Path) -> bool:
    """An embed-corpus output: a Parquet file with an `embedding` column of token matrices."""
    if path.suffix != ".parquet":
        return False
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    schema = pq.read_schema(path)
    return "embedding" in schema.names and pa.types.is_list(schema.field("embedding").type)


def _last_of_each(ids: list, payload: list) -> tuple[list, list]:
    """A chunk's rows with each id once, its last row kept (in input order, a later row of an id replaces an
    earlier one, as across chunks)."""
    from tokenpool.index.multivector import check_ids

    last = {doc_id: n for n, doc_id in enumerate(check_ids(ids))}  # the index's own id rule, before hashing
    if len(last) == len(ids):
        return ids, payload
    keep = sorted(last.values())
    return [ids[n] for n in keep], [payload[n] for n in keep]


def build(directory: str, model: str | None, inputs: list[str], *, codec: str | None = None, nbits: int | None = None,
          text_column: str = "text", id_column: str = "id", progress: bool = True,
          engine_kwargs: dict | None = None) -> dict:
    """Add every row of `inputs` to the index in `directory`, created (codec default float16, nbits 2) at the
    first add, so a build that fails before it leaves no empty index; an existing index must have `codec` /
    `nbits` where they are given."""
    import numpy as np
    from tqdm.auto import tqdm

    from tokenpool.index import MultiVectorIndex
    from tokenpool.index.multivector import check_codec
    from tokenpool.ray.corpus import list_inputs

    files = [f for spec in inputs for f in list_inputs(spec)]
    embedded = {f: _is_embedded(f) for f in files}
    index = None
    if (Path(directory) / "manifest.json").exists() or Path(directory).is_file():
        index = MultiVectorIndex.open(directory)
        check_codec(index, codec, nbits, "--codec", "--nbits")
    llm = None
    if not all(embedded.values()):
        from tokenpool import LLM

        llm = LLM(model, **(engine_kwargs or {}))
    bar = tqdm(desc="index build", unit="doc", disable=not progress, dynamic_ncols=True)
    added = 0

    def add(is_embedded: bool, ids: list, payload: list) -> None:
        nonlocal added, index
        matrices = [np.asarray(m, dtype=np.float32) for m in payload] if is_embedded else None
        if index is None:  # created at the first add, once its rows have been read and checked
            dim = matrices[0].shape[-1] if is_embedded else llm.llm_engine.info.output_dims["token_embed"]
            index = MultiVectorIndex.create(directory, dim, codec=codec or "float16", nbits=nbits or 2)
        if is_embedded:
            index.add(ids, matrices)
        else:
            llm.add_to_index(index, ids, payload, use_tqdm=False)
        added += len(ids)
        bar.update(len(ids))

    def untrained() -> bool:
        return (index.untrained if index is not None else codec == "residual")

    # an untrained residual codec is trained on the first add: hold chunks back until it is TRAIN_ROWS
    # documents (or the inputs end, or the input kind changes, or an id repeats), so the sample is not one chunk
    held: list[tuple[bool, list, list]] = []

    def add_held() -> None:
        add(held[0][0], [i for h in held for i in h[1]], [x for h in held for x in h[2]])
        held.clear()

    for f in files:
        columns = [id_column, "embedding"] if embedded[f] else [id_column, text_column]
        for chunk in _rows(f, columns, CHUNK_ROWS):
            try:
                ids, payload = _last_of_each(chunk[id_column], chunk["embedding" if embedded[f] else text_column])
                if not embedded[f]:
                    bad = next((i for i, t in zip(ids, payload) if not isinstance(t, str) or not t), None)
                    if bad is not None:
                        text = payload[ids.index(bad)]
                        raise ValueError(f"the row of id {bad!r} has {type(text).__name__} {text!r} as its "
                                         f"{text_column!r}: a document's text must be a non-empty string.")
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
            part = (embedded[f], ids, payload)
            if held and (held[0][0] != part[0] or {i for h in held for i in h[1]} & set(part[1])):
                add_held()  # in input order: a later row of an id replaces an earlier one
            if not untrained():
                add(*part)
                continue
            held.append(part)
            if sum(len(h[1]) for h in held) >= TRAIN_ROWS:
                add_held()
    if held:
        add_held()
    bar.close()
    if index is None:
        raise ValueError(f"no rows in {', '.join(map(str, files))}: nothing added, no index created.")
    return {"added": added, **index.stats()}


def search(directory: str, model: str | None, queries: list[str], k: int = 10,
           engine_kwargs: dict | None = None) -> list[list[tuple]]:
    from tokenpool import LLM
    from tokenpool.index import MultiVectorIndex

    index = MultiVectorIndex.open(directory)
    return LLM(model, **(engine_kwargs or {})).search(queries, index, k=k)
