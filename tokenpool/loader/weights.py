"""Iterate a checkpoint's tensors: `*.safetensors` (sharded too), else `pytorch_model*.bin` (weights_only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of the backbone in `model_dir`, safetensors preferred."""
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"), ("pytorch_model.bin.index.json", ".bin")):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    found = sorted(model_dir.glob("pytorch_model*.bin"))
    if found:
        return found
    raise FileNotFoundError(f"No weights in {model_dir}: expected *.safetensors or pytorch_model.bin.")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` / `.pt` state dict, loaded without running pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from load_torch_file(path).items()


def copy_weight(param: torch.Tensor, tensor: torch.Tensor, name: str, start: int | None = None) -> None:
    """Copy checkpoint tensor `name` into `param`, or into its rows `start:` when `param` stacks several
    checkpoint tensors (fused q/k/v, gate/up)."""
    with torch.no_grad():
        if start is None:
            if param.shape != tensor.shape:
                raise ValueError(f"Weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}.")
            param.copy_(tensor)
        else:
            rows = param[start:start + tensor.shape[0]]
            if rows.shape != tensor.shape:
                raise ValueError(f"Weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}.")
            rows.copy_(tensor)


def check_complete(expected: set[str], loaded: set[str]) -> None:
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"Checkpoint is missing {len(missing)} weight(s), e.g. {missing[:4]}.")
