"""Vector stores as sinks for `embed_dataset`'s output (optional packages: `lancedb` + `pylance`, `qdrant-client`).

    write_lancedb(ds, uri, table_name)        a LanceDB table (Ray's `write_lance`: the actors write it), whose
                                              multivector column LanceDB searches (MaxSim over cosine)
    write_qdrant(ds, collection_name, ...)    a Qdrant collection: a MAX_SIM multivector with HNSW off (m=0), plus
                                              a dense vector where the task gives one (BGE-M3's "all")

The multivector column is `embedding` (task token_embed) or `colbert` (task all); `embed` alone is a dense
vector. Ids: Qdrant accepts unsigned integers and UUIDs only, so other ids become a UUID derived from the id
(uuid5) and the id itself is kept in the payload under "id" (always, so a search hit gives the caller's id).
"""

from __future__ import annotations

import uuid
from typing import Any

# Qdrant refuses a multivector larger than this many floats (rows x dim): such a document is an error here,
# never silently truncated.
QDRANT_MAX_MULTIVECTOR_FLOATS = 1_048_576
_ID_NAMESPACE = uuid.UUID("6f1e3c2a-6b7d-4b0e-9a53-7a1c7d0c2b11")


def _arrow_schema(ds):
    schema = ds.schema()
    return getattr(schema, "base_schema", schema)  # Ray Data's Schema wraps the pyarrow one


def _columns(schema) -> tuple[str | None, str | None]:
    """(multivector column, dense column) of an embed_dataset output's pyarrow schema."""
    import pyarrow as pa

    names = schema.names
    if "colbert" in names:
        return "colbert", "dense"
    kind = schema.field("embedding").type if "embedding" in names else None
    if kind is not None and pa.types.is_list(kind):
        return "embedding", None
    if kind is not None and pa.types.is_fixed_size_list(kind):
        return None, "embedding"
    raise ValueError(f"Not an embed_dataset output (columns: {', '.join(names)}): expected 'embedding' or "
                     "'dense' / 'colbert'.")


def write_lancedb(ds, uri: str, table_name: str, *, mode: str = "create"):
    """Write `ds` (embed_dataset's output) to the LanceDB table `table_name` of the database at `uri` (a folder);
    returns the opened `lancedb` table. mode: "create" (error if it exists), "append" or "overwrite"."""
    from tokenpool.extras import require

    require("lance", "tokenpool.ray.write_lancedb")
    import lancedb
    from ray.data import SaveMode

    if mode not in ("create", "append", "overwrite"):
        raise ValueError(f"mode must be 'create', 'append' or 'overwrite', got {mode!r}.")
    _columns(_arrow_schema(ds))  # an embed_dataset output
    db = lancedb.connect(uri)
    exists = table_name in db.table_names()
    if exists and mode == "create":
        raise ValueError(f"LanceDB table {table_name!r} already exists in {uri}; use mode='append' or 'overwrite'.")
    save = SaveMode.CREATE if not exists else (SaveMode.APPEND if mode == "append" else SaveMode.OVERWRITE)
    ds.write_lance(f"{uri.rstrip('/')}/{table_name}.lance", mode=save)
    return lancedb.connect(uri).open_table(table_name)


def point_id(value) -> int | str:
    """A Qdrant point id for the caller's id: a non-negative int as is, a UUID string as is, else uuid5(id)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return str(uuid.uuid5(_ID_NAMESPACE, text))


def write_qdrant(ds, collection_name: str, *, url: str | None = None, path: str | None = None, client=None,
                 batch_size: int = 64, create: bool = True) -> Any:
    """Upsert `ds` (embed_dataset's output) into a Qdrant collection; returns the client. Connects to `url` (a
    server), or `path` (local mode, a folder), or uses `client`. The collection is created if missing
    (`create`): the multivector as a named vector (`embedding` / `colbert`) with a MAX_SIM comparator, cosine
    distance and HNSW off (m=0: exact MaxSim over what the query's prefetch or filter selects), plus `dense`
    (cosine, HNSW) where the output has one."""
    from tokenpool.extras import require

    require("qdrant", "tokenpool.ray.write_qdrant")
    from qdrant_client import QdrantClient, models

    if client is None:
        if (url is None) == (path is None):
            raise ValueError("Give exactly one of url (a Qdrant server), path (local mode) or client.")
        client = QdrantClient(url=url) if url is not None else QdrantClient(path=path)
    schema = _arrow_schema(ds)
    multi, dense = _columns(schema)
    if create and not client.collection_exists(collection_name):
        vectors = {}
        if multi is not None:
            dim = schema.field(multi).type.value_type.list_size
            vectors[multi] = models.VectorParams(
                size=dim, distance=models.Distance.COSINE, hnsw_config=models.HnswConfigDiff(m=0),
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))
        if dense is not None:
            vectors[dense] = models.VectorParams(size=schema.field(dense).type.list_size,
                                                 distance=models.Distance.COSINE)
        client.create_collection(collection_name, vectors_config=vectors)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        points = []
        ids = batch.column("id").to_pylist()
        multis = batch.column(multi).to_pylist() if multi is not None else [None] * len(ids)
        denses = batch.column(dense).to_pylist() if dense is not None else [None] * len(ids)
        for i, m, d in zip(ids, multis, denses):
            vector = {}
            if m is not None:
                floats = len(m) * (len(m[0]) if m else 0)
                if floats > QDRANT_MAX_MULTIVECTOR_FLOATS:
                    raise ValueError(f"Document {i!r}: its token matrix has {len(m)} x {len(m[0])} = {floats:,} "
                                     f"floats, over Qdrant's {QDRANT_MAX_MULTIVECTOR_FLOATS:,}-float multivector "
                                     "limit; split it (or lower max_model_len) before writing it to Qdrant.")
                if not m:
                    raise ValueError(f"Document {i!r} has no token rows (an empty multivector).")
                vector[multi] = m
            if d is not None:
                vector[dense] = d
            points.append(models.PointStruct(id=point_id(i), vector=vector, payload={"id": i}))
        client.upsert(collection_name, points=points, wait=True)
    return client
