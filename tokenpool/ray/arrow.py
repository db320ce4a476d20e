"""Pooling outputs as plain Arrow columns, which any Parquet / Lance reader opens without Ray or tokenpool.

    embed        embedding  fixed_size_list<D, float16|float32>
    token_embed  embedding  list<fixed_size_list<D, ...>>    (one inner list per row of the token matrix)
    all (BGE-M3) dense      fixed_size_list<D, ...>
                 sparse     struct<token_ids: list<int32>, weights: list<float32>>   (FlagEmbedding's lexical
                            weights: special tokens dropped, max over repeated ids, only weights > 0)
                 colbert    list<fixed_size_list<D, ...>>
    every task   num_tokens int32: rows of the token matrix (token_embed, colbert), else the prompt's tokens

Built from one flat buffer per column (no Python object per vector).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OUTPUT_DTYPES = {"float16": np.float16, "float32": np.float32}
TASKS = ("embed", "token_embed", "all")


def check_output_dtype(output_dtype: str) -> np.dtype:
    try:
        return np.dtype(OUTPUT_DTYPES[output_dtype])
    except KeyError:
        raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}.") from None


def _fixed(values: np.ndarray, dim: int):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)


def _matrices(mats: Sequence, dtype: np.dtype, dim: int):
    """list<fixed_size_list<D>> from `[n_i, D]` tensors / arrays."""
    import pyarrow as pa

    arrays = [np.asarray(m, dtype=dtype) for m in mats]
    counts = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros((0, dim), dtype=dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), _fixed(flat, dim)), counts


def _vectors(vecs: Sequence, dtype: np.dtype, dim: int):
    flat = np.stack([np.asarray(v, dtype=dtype) for v in vecs]) if vecs else np.zeros((0, dim), dtype=dtype)
    return _fixed(flat, dim)


def _sparse(weights: Sequence[dict[int, float] | None]):
    import pyarrow as pa

    ids = [sorted(w or {}) for w in weights]
    return pa.StructArray.from_arrays(
        [pa.array(ids, type=pa.list_(pa.int32())),
         pa.array([[float((w or {})[i]) for i in row] for w, row in zip(weights, ids)], type=pa.list_(pa.float32()))],
        names=["token_ids", "weights"])


def outputs_table(ids, outputs: Sequence, task: str, dims: dict[str, int], output_dtype: str = "float16",
                  id_type=None):
    """One Arrow table from `LLM.encode(..., pooling_task=task)`'s outputs, in order; `ids` become the `id`
    column (`id_type`: its Arrow type, e.g. the input column's, else inferred); dims: each task's row width
    (`LLMEngine.info.output_dims`), so that an empty table has the right types too."""
    import pyarrow as pa

    dtype = check_output_dtype(output_dtype)
    datas = [o.outputs.data for o in outputs]
    columns = {"id": pa.array(list(ids), type=id_type)}
    if task == "token_embed":
        column, counts = _matrices(datas, dtype, dims["token_embed"])
        columns["num_tokens"] = pa.array(counts)
        columns["embedding"] = column
    elif task == "embed":
        columns["num_tokens"] = pa.array([len(o.prompt_token_ids) for o in outputs], type=pa.int32())
        columns["embedding"] = _vectors(datas, dtype, dims["embed"])
    elif task == "all":
        if not {"embed", "token_embed", "token_classify"} <= set(dims):
            raise ValueError("task 'all' to Arrow needs a model with dense, multi-vector and sparse heads (BGE-M3).")
        colbert, counts = _matrices([d["token_embed"] for d in datas], dtype, dims["token_embed"])
        columns["num_tokens"] = pa.array(counts)
        columns["dense"] = _vectors([d["embed"] for d in datas], dtype, dims["embed"])
        columns["sparse"] = _sparse([o.outputs.lexical_weights for o in outputs])
        columns["colbert"] = colbert
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    return pa.table(columns)
