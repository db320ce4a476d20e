"""`fetch_image`: a PIL image from an http(s) URL, a `data:` URL or a local path."""

from __future__ import annotations

import base64
import io
import urllib.request
from pathlib import Path
from typing import Any

from tokenpool.extras import require

_MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 64_000_000


def fetch_image(url: str, *, timeout: float = 10.0) -> Any:
    """Return the image at `url` as an RGB `PIL.Image.Image`.

    Accepts ``http(s)://`` URLs, ``data:image/...;base64,...`` URLs, ``file://`` URLs and local paths.
    Raises ``ValueError`` with a clear message when the source cannot be read or is not an image.
    """
    require("image", "fetch_image")
    from PIL import Image

    data = _read_bytes(url, timeout)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:
        raise ValueError(f"Could not decode an image from {url[:80]!r}: {e}") from e
    # The header gives the size: refuse oversized images before decoding them.
    check_image_size(*image.size, f"The image at {url[:80]!r}")
    try:
        image.load()
    except Exception as e:
        raise ValueError(f"Could not decode an image from {url[:80]!r}: {e}") from e
    return image.convert("RGB")


def check_image_size(width: int, height: int, what: str) -> None:
    """Refuse empty images and images over MAX_IMAGE_SIDE px a side or MAX_IMAGE_PIXELS in all."""
    if width < 1 or height < 1:
        raise ValueError(f"{what} has zero size ({width}x{height}).")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} is {width}x{height} px; at most {MAX_IMAGE_SIDE} px a side and "
                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels are accepted.")


def _read_bytes(url: str, timeout: float) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ValueError("Only base64 data URLs are supported (data:image/<type>;base64,<data>).")
        try:
            return base64.b64decode(payload, validate=True)
        except Exception as e:
            raise ValueError(f"Invalid base64 in data URL: {e}") from e
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - caller decides
            data = response.read(_MAX_IMAGE_BYTES + 1)
        if len(data) > _MAX_IMAGE_BYTES:
            raise ValueError(f"Image at {url} is larger than {_MAX_IMAGE_BYTES} bytes.")
        return data
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if not path.is_file():
        raise ValueError(f"Image file not found: {path}")
    return path.read_bytes()
