"""Output tensors -> wire formats, without Python lists of floats and without torch ops.

(Everything here runs on the event loop thread with numpy only: a torch op big enough to go parallel would
start a second OpenMP worker team beside the engine thread's and slow the engine down.)

- float: numpy arrays inside the response dict, serialized by orjson (OPT_SERIALIZE_NUMPY) straight from
  the buffers; float32 values print as the shortest string that reads back to the same float32.
- base64: the raw bytes of each item in `embed_dtype` / `endianness` (vLLM's layout: row-major,
  flattened), base64-encoded; tokenpool adds the item's `shape`.
- bytes: the response body is the items' raw bytes back to back; a `metadata` header carries JSON with
  each item's `index`, `embed_dtype`, `endianness`, `start`, `end` (byte offsets) and `shape`.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

import numpy as np
import orjson
import torch
from starlette.responses import Response

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def as_float32(tensor: torch.Tensor) -> np.ndarray:
    """The engine's float32 CPU output as a C-contiguous numpy array (a view when it already is one)."""
    array = tensor.numpy() if tensor.dtype == torch.float32 else tensor.detach().cpu().float().numpy()
    return np.ascontiguousarray(array)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does (NaN -> 0x7FC0)."""
    bits = array.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    rounded = rounded.astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def to_array(tensor: torch.Tensor, embed_dtype: str = "float32", endianness: str = "native") -> np.ndarray:
    """The item in the wire dtype and byte order (bfloat16 travels as its 16-bit patterns)."""
    array = as_float32(tensor)
    if embed_dtype == "float16":
        with np.errstate(over="ignore"):  # beyond float16's range -> inf, as torch converts
            array = array.astype(np.float16)
    elif embed_dtype == "bfloat16":
        array = bfloat16_bits(array)
    elif embed_dtype != "float32":
        raise ValueError(f"Unknown embed_dtype {embed_dtype!r}; use float32, float16 or bfloat16.")
    if endianness not in ("native", sys.byteorder):
        array = array.byteswap()
    return array


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's buffer as bytes, without a copy (an empty array, e.g. a document with no rows left: b"")."""
    if array.size == 0:  # memoryview cannot cast a view with a zero in its shape
        return memoryview(b"")
    return memoryview(np.ascontiguousarray(array)).cast("B")


def b64(array: np.ndarray) -> str:
    return base64.b64encode(raw_bytes(array)).decode("ascii")


def encode_item(tensor: torch.Tensor, encoding_format: str, embed_dtype: str,
                endianness: str) -> tuple[Any, list[int] | None]:
    """(value for the JSON body, shape or None) of one item for `float` or `base64`."""
    if encoding_format == "float":
        return as_float32(tensor), None
    return b64(to_array(tensor, embed_dtype, endianness)), list(tensor.shape)


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=JSON_OPTIONS), status_code=status, media_type="application/json")


def bytes_response(tensors: list[torch.Tensor], embed_dtype: str, endianness: str, meta: dict | None) -> Response:
    """The `bytes` encoding: raw arrays back to back; `meta` plus the items' layout goes to the header."""
    chunks, items, offset = [], [], 0
    for index, tensor in enumerate(tensors):
        chunk = raw_bytes(to_array(tensor, embed_dtype, endianness))
        items.append({"index": index, "embed_dtype": embed_dtype, "endianness": endianness,
                      "start": offset, "end": offset + chunk.nbytes, "shape": list(tensor.shape)})
        chunks.append(chunk)
        offset += chunk.nbytes
    headers = None
    if meta is not None:
        headers = {"metadata": orjson.dumps({**meta, "data": items}).decode()}
    return Response(b"".join(chunks), media_type="application/octet-stream", headers=headers)
