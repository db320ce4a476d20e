"""`tokenpool serve` on the tiny Qwen2.5-VL checkpoint: chat-style `messages` with `image_url` parts on
/pooling and /v1/embeddings equal the offline `LLM` with the same image; bad images are 400s."""

from __future__ import annotations

import base64
import io

import pytest
import requests
import torch

from tests.reference.qwen2_5_vl_reference import make_test_images
from tests.server_fixtures import serve
from tokenpool import LLM, TextPrompt

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_test_images()[1].save(root / "tall.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def server(tiny_qwen2_5_vl, media_dir):
    with serve([str(tiny_qwen2_5_vl), "--dtype", "float32", "--allowed-local-media-path", str(media_dir)]) as s:
        yield s


@pytest.fixture(scope="module")
def llm(tiny_qwen2_5_vl):
    return LLM(str(tiny_qwen2_5_vl), dtype="float32")


def messages(*parts):
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith(("data:", "file:")) else
               {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def test_pooling_messages_with_data_url_image_equal_offline(server, llm):
    image = make_test_images()[0]
    body = {"messages": messages(data_url(image), "Describe the image."), "task": "token_embed"}
    response = requests.post(server.url("/pooling"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = torch.tensor(response.json()["data"][0]["data"])
    # The tiny tokenizer has no chat template: parts are joined with newlines, images as the placeholder.
    expected = llm.encode([TextPrompt(prompt=f"{PLACEHOLDER}\nDescribe the image.", multi_modal_data={"image": image})],
                          pooling_task="token_embed", use_tqdm=False)[0]
    assert got.shape == expected.outputs.data.shape
    assert torch.allclose(got, expected.outputs.data, atol=1e-5)
    assert response.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_mm_processor_kwargs_reach_the_image_processor(server, llm):
    """max_pixels over HTTP shrinks the image as it does offline (fewer image tokens, the same vectors)."""
    image = make_test_images()[0]
    kwargs = {"max_pixels": 28 * 28 * 4}
    body = {"messages": messages(data_url(image), "Describe the image."), "task": "token_embed",
            "mm_processor_kwargs": kwargs}
    response = requests.post(server.url("/pooling"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = torch.tensor(response.json()["data"][0]["data"])
    prompt = TextPrompt(prompt=f"{PLACEHOLDER}\nDescribe the image.", multi_modal_data={"image": image},
                        mm_processor_kwargs=kwargs)
    expected = llm.encode([prompt], pooling_task="token_embed", use_tqdm=False)[0]
    default = llm.encode([TextPrompt(prompt=f"{PLACEHOLDER}\nDescribe the image.", multi_modal_data={"image": image})],
                         pooling_task="token_embed", use_tqdm=False)[0]
    assert len(expected.prompt_token_ids) < len(default.prompt_token_ids)
    assert got.shape == expected.outputs.data.shape
    assert torch.allclose(got, expected.outputs.data, atol=1e-5)


@pytest.mark.parametrize("body", [
    {"input": "no image here", "mm_processor_kwargs": {"max_pixels": 3136}},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "no image"}]}],
     "mm_processor_kwargs": {"max_pixels": 3136}},
])
def test_mm_processor_kwargs_without_images_is_a_400(server, body):
    response = requests.post(server.url("/pooling"), json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "mm_processor_kwargs"


def test_embeddings_messages_with_two_images(server, llm, media_dir):
    images = make_test_images()
    body = {"messages": messages("Compare", data_url(images[2]), "with", f"file://{media_dir / 'tall.png'}"),
            "encoding_format": "float"}
    response = requests.post(server.url("/v1/embeddings"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = torch.tensor(response.json()["data"][0]["embedding"])
    expected = llm.embed([TextPrompt(prompt=f"Compare\n{PLACEHOLDER}\nwith\n{PLACEHOLDER}",
                                     multi_modal_data={"image": [images[2], images[1]]})], use_tqdm=False)[0]
    assert torch.allclose(got, torch.tensor(expected.outputs.embedding), atol=1e-5)


@pytest.mark.parametrize("url, fragment", [
    ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "Could not decode"),
    ("file://{media}/broken.png", "Could not decode"),
    ("file://{media}/missing.png", "not found"),
])
def test_bad_images_are_400(server, media_dir, url, fragment):
    body = {"messages": messages(url.format(media=media_dir), "hi"), "task": "token_embed"}
    response = requests.post(server.url("/pooling"), json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert requests.get(server.url("/health"), timeout=10).status_code == 200


def test_huge_image_is_400(server):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (17000, 4)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    response = requests.post(server.url("/pooling"), json={"messages": messages(url, "hi")}, timeout=60)
    assert response.status_code == 400, response.text
    assert "17000x4 px" in response.json()["error"]["message"]


def test_image_placeholder_without_image_is_400(server):
    response = requests.post(server.url("/pooling"), json={"input": f"{PLACEHOLDER} where is it?"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "no image was given" in response.json()["error"]["message"]


def test_tokenize_messages_with_image_shows_expanded_tokens(server, llm):
    image = make_test_images()[0]
    response = requests.post(server.url("/tokenize"), json={"messages": messages(data_url(image), "Describe.")},
                             timeout=60)
    assert response.status_code == 200, response.text
    expected = llm.encode([TextPrompt(prompt=f"{PLACEHOLDER}\nDescribe.", multi_modal_data={"image": image})],
                          pooling_task="token_embed", use_tqdm=False)[0].prompt_token_ids
    assert response.json()["tokens"] == expected
    assert response.json()["count"] == len(expected) > 64
