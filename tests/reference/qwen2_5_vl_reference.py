"""Reference Qwen2.5-VL token embeddings for parity tests: transformers, fp32, CPU, eager attention.

:func:`qwen2_5_vl_reference` does the whole pipeline itself, one prompt at a time
(batch 1, no padding), so nothing is ambiguous:

1. tokenize the text with ``AutoTokenizer`` (Qwen2 adds no BOS/EOS);
2. run ``AutoImageProcessor`` (the PIL ``Qwen2VLImageProcessorPil``; torchvision is
   not needed) on the prompt's images -> ``pixel_values`` [num_patches, 3*2*14*14]
   and ``image_grid_thw`` [num_images, 3];
3. replace the k-th ``<|image_pad|>`` id by ``t*h*w // merge_size**2`` copies
   (what ``Qwen2_5_VLProcessor`` does to the text);
4. 3-D rotary positions from transformers' own ``Qwen2_5_VLModel.get_rope_index``
   (text: t=h=w=i; image: t=start, h=start+row, w=start+col; the text after an
   image continues at start + max(h, w));
5. ``Qwen2_5_VLForConditionalGeneration.model(...)`` -> ``last_hidden_state`` of
   the text model, i.e. after the final RMSNorm (what vLLM's token_embed pools).

Each prompt is ``(text, images)``: the text holds
``<|vision_start|><|image_pad|><|vision_end|>`` once per image, in order.

Each result is a dict::

    input_ids       list[int]              n expanded token ids
    hidden_states   np.ndarray [n, 64]     float32, final-norm-applied last hidden state
    position_ids    np.ndarray [3, n]      int64, (t, h, w) rotary positions fed to the text model
    image_grid_thw  list[tuple[int,int,int]]  per image, in patches (14 px), before merging
    pixel_values    np.ndarray [P, 1176]   float32, the image processor's output (P = sum t*h*w)

Attention is "eager" (plain matmul + softmax in fp32; sdpa agrees to ~1e-6).
Note for transformers 5.24: ``Qwen2_5_VLModel.forward`` only builds 3-D positions
when ``mm_token_type_ids`` is passed; without it the model silently falls back to
1-D positions. Here the positions are computed and passed explicitly.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import torch

from tests.fixtures.qwen2_5_vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

PathLike = str | os.PathLike[str]
Prompt = tuple[str, Sequence[Any]]  # (text, list of PIL images)
Reference = dict[str, Any]

# (text, indices into make_test_images()). Mixed: text only, one image, two images, jina-v4 style.
SAMPLE_PROMPTS: list[tuple[str, tuple[int, ...]]] = [
    ("Query: What is the capital of France?", ()),
    (f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe the image.<|im_end|>\n", (0,)),  # 224x224: 2x2 full windows
    (f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe the image.<|im_end|>\n", (1,)),  # tall, 6x11 merged: padded windows
    (f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}: which one is wider?", (2, 3)),  # wide + tiny
    (f"{IMAGE_PLACEHOLDER}", (4,)),  # downscaled to max_pixels, image only
    ("Passage: 浜辺に沈む美しい夕日 🌅 — die Straße über dem Haus.", ()),
]


def make_test_images() -> list[Any]:
    """Deterministic RGB PIL images (width x height) exercising the image processor's paths.

    0: 224x224 -> 16x16 patches, 8x8 merged: exactly 2x2 windows of 4x4
    1: 168x308 (tall) -> 22x12 patches, 11x6 merged: windows need padding
    2: 300x200 (wide) -> resized to 308x196: 14x22 patches, 7x11 merged
    3: 50x30 (tiny) -> upscaled to min_pixels: 56x84 px, 4x6 patches, 2x3 merged
    4: 640x480 -> downscaled by max_pixels (448*448) to 504x364: 26x36 patches
    Content: smooth colour gradients plus blocky noise, different per image, so
    every patch differs from its neighbours and from the other images.
    """
    from PIL import Image

    images = []
    for idx, (w, h) in enumerate([(224, 224), (168, 308), (300, 200), (50, 30), (640, 480)]):
        rng = np.random.default_rng(1000 + idx)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack(
            [
                127 + 100 * np.sin(x / (17 + 3 * idx) + idx),
                127 + 100 * np.cos(y / (23 + 2 * idx) - idx),
                127 + 100 * np.sin((x + y) / (31 + idx)),
            ],
            axis=-1,
        )
        blocks = rng.normal(0, 40, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        noise = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:h, :w]
        arr = np.clip(base + noise + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr, mode="RGB"))
    return images


def sample_prompts() -> list[Prompt]:
    """SAMPLE_PROMPTS with the image indices replaced by make_test_images()' images."""
    images = make_test_images()
    return [(text, [images[i] for i in idx]) for text, idx in SAMPLE_PROMPTS]


@functools.lru_cache(maxsize=4)
def _load_processors(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # backend="pil": the PIL Qwen2VLImageProcessorPil (also what backend=None picks without torchvision)
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return tokenizer, image_processor


@functools.lru_cache(maxsize=4)
def _load_model(model_dir: str, attn_implementation: str) -> Any:
    """Qwen2_5_VLForConditionalGeneration, fp32, eval; cached per (folder, attention)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()


def load_qwen2_5_vl(model_dir: PathLike, attn_implementation: str = "eager") -> tuple[Any, Any, Any]:
    """(tokenizer, image_processor, model) in fp32, eval mode; cached per folder (and attention)."""
    model_dir = str(pathlib.Path(model_dir))
    return (*_load_processors(model_dir), _load_model(model_dir, attn_implementation))


def load_qwen2_5_vl_model(model_dir: PathLike, attn_implementation: str = "eager") -> Any:
    """Only the model (no tokenizer load, which costs ~1 s): Qwen2_5_VLForConditionalGeneration, fp32, eval."""
    return _load_model(str(pathlib.Path(model_dir)), attn_implementation)


def process_images(
    image_processor: Any, images: Sequence[Any], min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [P, C*T*p*p] fp32, image_grid_thw [num_images, 3] int64) of one prompt's images."""
    kwargs: dict[str, Any] = {}
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        kwargs["size"] = size
    out = image_processor(images=list(images), return_tensors="pt", **kwargs)
    return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.int64)


def expand_image_tokens(ids: Sequence[int], image_grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """Replace the k-th <|image_pad|> by grid_t*grid_h*grid_w // merge_size**2 copies of it."""
    n_pads = sum(1 for i in ids if i == IMAGE_TOKEN_ID)
    if n_pads != len(image_grid_thw):
        raise ValueError(f"{n_pads} <|image_pad|> tokens in the text but {len(image_grid_thw)} images")
    counts = iter((image_grid_thw.prod(-1) // merge_size**2).tolist())
    out: list[int] = []
    for i in ids:
        out.extend([i] * next(counts) if i == IMAGE_TOKEN_ID else [i])
    return out


def rope_position_ids(model: Any, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """[3, n] multimodal rotary positions of one sequence, by transformers' get_rope_index."""
    ids = input_ids.view(1, -1)
    if image_grid_thw is None or len(image_grid_thw) == 0:
        return torch.arange(ids.shape[1]).view(1, -1).expand(3, -1).clone()
    mm_token_type_ids = (ids == model.config.image_token_id).to(torch.int32)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids, image_grid_thw=image_grid_thw)
    return pos[:, 0]


@torch.no_grad()
def run_qwen2_5_vl(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-norm last hidden state [n, H] of one sequence (input_ids [n]); positions [3, n] or computed.

    Low-level hook for sensitivity tests: pass deliberately wrong positions or grids.
    """
    ids = input_ids.view(1, -1)
    if position_ids is None:
        position_ids = rope_position_ids(model, input_ids, image_grid_thw)
    out = model.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=position_ids.view(3, 1, -1),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        use_cache=False,
    )
    return out.last_hidden_state[0].to(torch.float32)


def transformers_hidden_states_in(model_dir: PathLike, references: Sequence[Reference], dtype: torch.dtype,
                                  device: str = "cpu") -> list[np.ndarray]:
    """transformers' own hidden states of the reference prompts with its model cast to `dtype` on `device`
    (same ids, positions and pixels as the fp32 reference): how far `dtype` alone moves transformers."""
    import copy

    model = copy.deepcopy(load_qwen2_5_vl_model(model_dir)).to(device=device, dtype=dtype)
    out = []
    with torch.inference_mode():
        for ref in references:
            grid = torch.tensor(ref["image_grid_thw"], dtype=torch.int64) if ref["image_grid_thw"] else None
            pixels = torch.from_numpy(ref["pixel_values"]).to(device, dtype) if grid is not None else None
            hidden = run_qwen2_5_vl(model, torch.tensor(ref["input_ids"], device=device), pixels,
                                    None if grid is None else grid.to(device),
                                    torch.from_numpy(ref["position_ids"]).to(device))
            out.append(hidden.float().cpu().numpy())
    return out


def qwen2_5_vl_reference(
    model_dir: PathLike,
    prompts: Sequence[Prompt],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    attn_implementation: str = "eager",
) -> list[Reference]:
    """Per prompt: expanded input_ids, fp32 hidden states [n, H], positions [3, n], grids, pixel_values.

    Args:
        model_dir: a Qwen2.5-VL folder (e.g. from build_tiny_qwen2_5_vl).
        prompts: (text, images) pairs; the text has one IMAGE_PLACEHOLDER per image.
        min_pixels / max_pixels: override the image processor's size for this call.
        attn_implementation: "eager" (default) or "sdpa".
    """
    tokenizer, image_processor, model = load_qwen2_5_vl(model_dir, attn_implementation)
    merge_size = model.config.vision_config.spatial_merge_size
    results: list[Reference] = []
    for text, images in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if images:
            pixel_values, grid_thw = process_images(image_processor, images, min_pixels, max_pixels)
        else:
            pixel_values, grid_thw = None, None
        ids = expand_image_tokens(ids, grid_thw if grid_thw is not None else torch.zeros(0, 3, dtype=torch.int64), merge_size)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        position_ids = rope_position_ids(model, input_ids, grid_thw)
        hidden = run_qwen2_5_vl(model, input_ids, pixel_values, grid_thw, position_ids)
        results.append(
            {
                "input_ids": ids,
                "hidden_states": hidden.numpy(),
                "position_ids": position_ids.numpy().astype(np.int64),
                "image_grid_thw": [tuple(int(v) for v in g) for g in grid_thw.tolist()] if grid_thw is not None else [],
                "pixel_values": pixel_values.numpy() if pixel_values is not None else np.zeros((0, 0), np.float32),
            }
        )
    return results
