"""Qwen2.5-VL (jina-embeddings-v4's backbone) against transformers on the same tiny random weights.

Every token's last hidden state (image tokens included) must match transformers' fp32 model at cosine
>= 0.99999 (bf16: no further than transformers' own bf16) for text-only prompts, one image, two images in one prompt and images of
different sizes in one packed batch; the fixture's weights are large enough that wrong positions, swapped
h/w or missing vision windows fail loudly (tests/test_qwen2_5_vl_fixture.py measures it).
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference.qwen2_5_vl_reference import (
    SAMPLE_PROMPTS,
    make_test_images,
    qwen2_5_vl_reference,
    transformers_hidden_states_in,
)
from tests.settings import DEVICE, DTYPE
from tests.toolkit import assert_batch_invariant
from tokenpool import LLM, PoolingParams, TextPrompt, TokensPrompt

# fp32: every token at cosine >= 0.99999 to transformers' fp32. bf16: the fixture's weights are drawn large
# (1/sqrt(fan_in), peaked attention) so that position bugs fail loudly, which also amplifies bf16 rounding;
# the bar is transformers' own: our distance to its fp32 model (1 - cosine, worst token and mean over the
# prompt) at most 1.2x the distance of transformers cast to bf16 on the same device and inputs.
COS_MIN = 0.99999 if DTYPE == "float32" else 0.98  # for outputs that have no bf16 reference of their own
BF16_SLACK = 1.2
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def images():
    return make_test_images()


@pytest.fixture(scope="module")
def prompts(images):
    return [(text, [images[i] for i in idx]) for text, idx in SAMPLE_PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny_qwen2_5_vl, prompts):
    return qwen2_5_vl_reference(tiny_qwen2_5_vl, prompts)


@pytest.fixture(scope="module")
def transformers_bf16(tiny_qwen2_5_vl, reference):
    """transformers' own bf16 hidden states of the sample prompts (bf16 runs only)."""
    if DTYPE == "float32":
        return None
    return transformers_hidden_states_in(tiny_qwen2_5_vl, reference, getattr(torch, DTYPE), DEVICE)


def _check_close(ours, ref, theirs) -> None:
    """fp32: every token at cosine >= 0.99999; bf16: no further from the fp32 reference than transformers'
    own bf16 (x BF16_SLACK), for the worst token and for the mean."""
    if theirs is None:
        assert _min_cos(ours, ref) >= 0.99999 and _mean_cos(ours, ref) >= 0.99999
        return
    for measure in (_min_cos, _mean_cos):
        ours_err, theirs_err = 1 - measure(ours, ref), 1 - measure(theirs, ref)
        assert ours_err <= BF16_SLACK * theirs_err + 1e-6, (measure.__name__, ours_err, theirs_err)


@pytest.fixture(scope="module")
def llm(tiny_qwen2_5_vl):
    return LLM(str(tiny_qwen2_5_vl), dtype=DTYPE, device=DEVICE)


def _text_prompt(text, imgs, **kwargs):
    return TextPrompt(prompt=text, multi_modal_data={"image": imgs}, **kwargs) if imgs else TextPrompt(prompt=text)


def _raw(llm, prompts, **kwargs):
    outs = llm.encode([_text_prompt(t, i) for t, i in prompts], PoolingParams(use_activation=False),
                      pooling_task="token_embed", use_tqdm=False, **kwargs)
    return outs


def _min_cos(a, b) -> float:
    return F.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1).min().item()


def _mean_cos(a, b) -> float:
    return F.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1).mean().item()


def test_hidden_states_match_transformers_in_one_batch(llm, prompts, reference, transformers_bf16):
    """All sample prompts (text only, one image, two images, five image sizes) in one packed batch."""
    outs = _raw(llm, prompts)
    for i, (out, ref, (text, _)) in enumerate(zip(outs, reference, SAMPLE_PROMPTS)):
        assert out.prompt_token_ids == ref["input_ids"], text
        assert type(out.prompt_token_ids) is list
        assert out.outputs.data.shape == ref["hidden_states"].shape
        _check_close(out.outputs.data, ref["hidden_states"], None if transformers_bf16 is None else transformers_bf16[i])


def test_token_embed_is_normalized_hidden_state(llm, prompts, reference):
    outs = llm.encode([_text_prompt(t, i) for t, i in prompts], pooling_task="token_embed", use_tqdm=False)
    for out, ref in zip(outs, reference):
        expected = F.normalize(torch.from_numpy(ref["hidden_states"]), dim=-1)
        assert torch.allclose(out.outputs.data.norm(dim=-1), torch.ones(out.outputs.data.shape[0]), atol=1e-5)
        assert _min_cos(out.outputs.data, expected) >= COS_MIN


def test_each_prompt_alone_equals_its_place_in_a_mixed_batch(llm, prompts):
    """Batch invariance with text and image requests mixed (and another task in the same batch)."""
    together = _raw(llm, prompts)
    for i, prompt in enumerate(prompts):
        alone = _raw(llm, [prompt])[0]
        assert_batch_invariant(alone.outputs.data, together[i].outputs.data)


def test_legacy_checkpoint_layout_loads_the_same_model(tiny_qwen2_5_vl_legacy, prompts, reference):
    # Also enforce_eager: the model is built without compiled elementwise chains (the same functions, eager).
    llm = LLM(str(tiny_qwen2_5_vl_legacy), dtype=DTYPE, device=DEVICE, enforce_eager=True)
    backbone = llm.llm_engine.model.backbone
    assert not backbone.text.ops.compiled and backbone.text.layers[0].ops is backbone.visual.blocks[0].ops
    outs = _raw(llm, prompts[:4])
    for out, ref in zip(outs, reference):
        assert _min_cos(out.outputs.data, ref["hidden_states"]) >= COS_MIN


def test_max_pixels_per_prompt(llm, tiny_qwen2_5_vl, images):
    text = SAMPLE_PROMPTS[1][0]
    ref = qwen2_5_vl_reference(tiny_qwen2_5_vl, [(text, [images[4]])], max_pixels=112 * 112)[0]
    out = llm.encode([TextPrompt(prompt=text, multi_modal_data={"image": images[4]},
                                 mm_processor_kwargs={"max_pixels": 112 * 112})],
                     PoolingParams(use_activation=False), pooling_task="token_embed", use_tqdm=False)[0]
    assert out.prompt_token_ids == ref["input_ids"]
    assert _min_cos(out.outputs.data, ref["hidden_states"]) >= COS_MIN
    full = llm.encode([TextPrompt(prompt=text, multi_modal_data={"image": images[4]})], use_tqdm=False,
                      pooling_task="token_embed")[0]
    assert len(out.prompt_token_ids) < len(full.prompt_token_ids)


def test_token_ids_prompt_with_image_equals_text_prompt(llm, prompts):
    text, imgs = prompts[1]
    ids = llm.get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    by_ids = llm.encode([TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": imgs})],
                        pooling_task="token_embed", use_tqdm=False)[0]
    by_text = llm.encode([TextPrompt(prompt=text, multi_modal_data={"image": imgs})],
                         pooling_task="token_embed", use_tqdm=False)[0]
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids
    assert torch.equal(by_ids.outputs.data, by_text.outputs.data)


def test_embed_defaults_to_last_token_and_mean_is_selectable(llm, tiny_qwen2_5_vl, prompts, reference):
    embeds = llm.embed([_text_prompt(t, i) for t, i in prompts[:3]], use_tqdm=False)
    for e, ref in zip(embeds, reference):
        expected = F.normalize(torch.from_numpy(ref["hidden_states"][-1]), dim=-1)
        assert _min_cos(torch.tensor(e.outputs.embedding)[None], expected[None]) >= COS_MIN
    mean = LLM(str(tiny_qwen2_5_vl), dtype=DTYPE, device=DEVICE, pooler_config={"pooling_type": "MEAN"})
    for e, ref in zip(mean.embed([_text_prompt(t, i) for t, i in prompts[:3]], use_tqdm=False), reference):
        expected = F.normalize(torch.from_numpy(ref["hidden_states"].mean(0)), dim=-1)
        assert _min_cos(torch.tensor(e.outputs.embedding)[None], expected[None]) >= COS_MIN


@pytest.mark.parametrize("prompt, message", [
    (lambda im: TextPrompt(prompt="<|vision_start|><|image_pad|><|vision_end|> twice? "
                                  "<|vision_start|><|image_pad|><|vision_end|>", multi_modal_data={"image": im}),
     r"has 2 image placeholder\(s\) .* but 1 image"),
    (lambda im: TextPrompt(prompt="no placeholder", multi_modal_data={"image": im}), r"has 0 image placeholder"),
    (lambda im: TextPrompt(prompt="<|image_pad|> without an image"), r"contains image placeholder tokens"),
    (lambda im: TextPrompt(prompt="<|image_pad|>", multi_modal_data={"image": "cat.png"}), r"must be PIL.Image"),
    (lambda im: TextPrompt(prompt="<|image_pad|>", multi_modal_data={"video": im}), r"unsupported multi_modal_data"),
    (lambda im: TextPrompt(prompt="<|image_pad|>", multi_modal_data={"image": im},
                           mm_processor_kwargs={"max_pixels": -5}), r"must be a positive integer"),
    (lambda im: TextPrompt(prompt="<|image_pad|>", multi_modal_data={"image": im},
                           mm_processor_kwargs={"fps": 2}), r"unsupported mm_processor_kwargs"),
])
def test_bad_image_prompts_are_clear_errors(llm, images, prompt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        llm.encode([prompt(images[0])], pooling_task="token_embed", use_tqdm=False)


def test_zero_size_and_huge_images_are_refused(llm):
    from PIL import Image

    from tokenpool.multimodal.utils import fetch_image

    with pytest.raises(ValueError, match="zero size"):
        llm.encode([TextPrompt(prompt="<|image_pad|>", multi_modal_data={"image": Image.new("RGB", (0, 5))})],
                   use_tqdm=False)
    buf = io.BytesIO()
    Image.new("L", (20000, 8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="20000x8 px"):
        fetch_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(ValueError, match="Could not decode"):
        fetch_image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode())


def test_seed_example_runs_unchanged(tiny_qwen2_5_vl, tmp_path, images):
    """The seed's first program (vllm -> tokenpool) prints three embedding shapes."""
    image_path = tmp_path / "eskimo.png"
    images[0].save(image_path)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "JINA_V4_MODEL": str(tiny_qwen2_5_vl),
           "EXAMPLE_IMAGE": str(image_path), "TOKENPOOL_CPU_AUTO_DTYPE": "float32",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
    result = subprocess.run([sys.executable, str(EXAMPLES / "jina_embeddings_v4.py")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shapes = re.findall(r"^torch\.Size\(\[(\d+)\]\)$", result.stdout, flags=re.M)
    assert shapes == ["64"] * 3, result.stdout
