"""Prompts with images, for Qwen2-VL-style models: preprocessing, placeholder expansion, rotary positions.

A prompt's text holds one `<|image_pad|>` per image (inside `<|vision_start|>...<|vision_end|>`). Each image
goes through transformers' Qwen2-VL image processor read from the model folder (dynamic resolution: resized
to multiples of 28 px within [min_pixels, max_pixels], cut into 14-px patches), and its placeholder is
expanded to one token per 2x2 group of patches, so `prompt_token_ids` show the sequence the model sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenpool.extras import require
from tokenpool.inputs.prompt import ProcessedPrompt
from tokenpool.multimodal.types import ImageInputs, mrope_positions
from tokenpool.multimodal.utils import check_image_size

_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")


def as_image_list(data: Any, index: int) -> list:
    """`multi_modal_data` -> a list of RGB PIL images, with clear errors for anything else."""
    require("image")
    from PIL import Image

    if not isinstance(data, dict):
        raise TypeError(f"Prompt {index}: multi_modal_data must be a dict like {{'image': PIL.Image}}.")
    unknown = set(data) - {"image"}
    if unknown:
        raise ValueError(f"Prompt {index}: unsupported multi_modal_data keys {sorted(unknown)}; only 'image' is supported.")
    images = data.get("image")
    images = images if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError(f"Prompt {index}: multi_modal_data['image'] is empty.")
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Prompt {index}: images must be PIL.Image.Image, got {type(image).__name__}.")
        check_image_size(*image.size, f"Prompt {index}: an image")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


class ImagePromptProcessor:
    """Expands the image placeholders of tokenized prompts and preprocesses their images."""

    def __init__(self, model_dir: Path, hf_config):
        require("image", "Loading a model with image inputs")
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.merge = hf_config.vision_config.spatial_merge_size
        # How a chat message's image part is written into the prompt text.
        self.placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __call__(self, ids: list[int], images: list, kwargs: dict | None, index: int) -> ProcessedPrompt:
        placeholders = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(placeholders) != len(images):
            raise ValueError(
                f"Prompt {index} has {len(placeholders)} image placeholder(s) (<|image_pad|>) but {len(images)} "
                "image(s); put '<|vision_start|><|image_pad|><|vision_end|>' in the prompt once per image."
            )
        processed = self.image_processor(images=images, return_tensors="pt", **self._size_kwargs(kwargs, index))
        grids = [tuple(int(v) for v in g) for g in processed["image_grid_thw"].tolist()]
        expanded: list[int] = []
        last = 0
        for at, (t, h, w) in zip(placeholders, grids):
            expanded += ids[last:at]
            expanded += [self.image_token_id] * (t * h * w // (self.merge * self.merge))
            last = at + 1
        expanded += ids[last:]
        positions = mrope_positions(expanded, self.image_token_id, grids, self.merge)
        pixels = processed["pixel_values"].to(torch.float32).contiguous()
        token_index = np.flatnonzero(np.asarray(expanded, dtype=np.int64) == self.image_token_id)
        return ProcessedPrompt(expanded, images=ImageInputs(pixels, grids, positions, token_index))

    def check_text_only(self, ids: list[int], index: int) -> None:
        """Image placeholders need images: refuse them in prompts without `multi_modal_data`."""
        if self.image_token_id in ids:
            raise ValueError(f"Prompt {index} contains image placeholder tokens (<|image_pad|>) but no image was given "
                             "(pass multi_modal_data={'image': ...}).")

    def _size_kwargs(self, kwargs: dict | None, index: int) -> dict:
        if not kwargs:
            return {}
        unknown = set(kwargs) - set(_PROCESSOR_KWARGS)
        if unknown:
            raise ValueError(f"Prompt {index}: unsupported mm_processor_kwargs {sorted(unknown)}; use {list(_PROCESSOR_KWARGS)}.")
        for key, value in kwargs.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Prompt {index}: mm_processor_kwargs[{key!r}] must be a positive integer, got {value!r}.")
        if kwargs.get("min_pixels", 0) > kwargs.get("max_pixels", 1 << 62):
            raise ValueError(f"Prompt {index}: min_pixels is larger than max_pixels.")
        size = dict(getattr(self.image_processor, "size", None) or {})
        if "min_pixels" in kwargs:
            size["shortest_edge"] = kwargs["min_pixels"]
        if "max_pixels" in kwargs:
            size["longest_edge"] = kwargs["max_pixels"]
        return {"size": size}
