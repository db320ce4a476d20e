"""Image inputs as the engine carries them (leaf module: no model or processor imports), and the
multimodal rotary position ids of Qwen2-VL-style prompts, computed on the host while tokenizing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class ImageInputs:
    """The images of one prompt, preprocessed: patches `[num_patches, C*T*P*P]`, each image's (t, h, w)
    patch grid, the prompt's multimodal rotary position ids `[3, num_tokens]`."""

    pixel_values: torch.Tensor
    grid_thw: list[tuple[int, int, int]]
    positions: np.ndarray
    token_index: np.ndarray  # offsets of the image tokens in the prompt, in image order


@dataclass(slots=True)
class BatchImages:
    """The images of a packed batch: each image prompt's inputs, and the rows of the batch that hold their
    image tokens (known on the host, so the model scatters image embeddings without a device sync)."""

    inputs: list[ImageInputs]
    rows: np.ndarray


def mrope_positions(ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """Multimodal rotary position ids `[3, len(ids)]` of one prompt whose image tokens are expanded.

    Text tokens count up from where the last span ended (all three ids equal); an image's tokens get
    (start, start + row, start + column) of their merged patch, and the text after it resumes at
    start + max(merged rows, merged columns).
    """
    arr = np.asarray(ids, dtype=np.int64)
    out = np.empty((3, arr.size), dtype=np.int64)
    is_image = arr == image_token_id
    pos, i, n = 0, 0, arr.size
    images = iter(grids)
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            out[:, i:j] = np.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        t, h, w = next(images)
        lh, lw = h // merge, w // merge
        count = t * lh * lw
        out[0, i:i + count] = pos + np.repeat(np.arange(t), lh * lw)
        out[1, i:i + count] = pos + np.tile(np.repeat(np.arange(lh), lw), t)
        out[2, i:i + count] = pos + np.tile(np.arange(lw), t * lh)
        pos += max(lh, lw)
        i += count
    return out
