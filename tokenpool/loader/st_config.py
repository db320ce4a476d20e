"""Read a sentence-transformers folder: `modules.json`, Pooling, Dense, Normalize, max_seq_length."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenpool.loader.weights import load_torch_file

# sentence-transformers' Pooling modes, in the order it concatenates them.
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_OLD_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
    "torch.nn.modules.linear.Identity": torch.nn.Identity,
    "torch.nn.modules.activation.ReLU": torch.nn.ReLU,
    "torch.nn.modules.activation.GELU": torch.nn.GELU,
    "torch.nn.modules.activation.Sigmoid": torch.nn.Sigmoid,
}


@dataclass
class DenseSpec:
    """A sentence-transformers `Dense` module: Linear(in, out) + activation."""

    in_features: int
    out_features: int
    bias: bool
    activation: str
    state_dict: dict[str, torch.Tensor]
    use_residual: bool = False  # PyLate: y = act(W x + b) + x, or + R x (`residual.weight`) when widths differ

    def build(self) -> torch.nn.Module:
        act_cls = _ACTIVATIONS.get(self.activation)
        if act_cls is None:
            raise ValueError(f"Unsupported Dense activation {self.activation!r}.")
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias)
        state = {k.removeprefix("linear."): v for k, v in self.state_dict.items() if k.startswith("linear.")}
        linear.load_state_dict(state)
        if not self.use_residual:
            return torch.nn.Sequential(linear, act_cls())
        residual = None
        if self.in_features != self.out_features:
            if "residual.weight" not in self.state_dict:
                raise ValueError(f"Dense {self.in_features} -> {self.out_features} with use_residual needs a "
                                 "residual.weight (widths differ).")
            residual = torch.nn.Linear(self.in_features, self.out_features, bias=False)
            residual.load_state_dict({"weight": self.state_dict["residual.weight"]})
        return ResidualDense(linear, act_cls(), residual)


class ResidualDense(torch.nn.Module):
    """PyLate's Dense with `use_residual`: `act(linear(x)) + x`, or `+ residual(x)` when the widths differ."""

    def __init__(self, linear: torch.nn.Linear, activation: torch.nn.Module, residual: torch.nn.Linear | None):
        super().__init__()
        self.linear, self.activation, self.residual = linear, activation, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x)) + (x if self.residual is None else self.residual(x))


@dataclass
class SentenceTransformerConfig:
    """What a sentence-transformers folder says about pooling (None fields: the folder does not say)."""

    pooling_modes: list[str] = field(default_factory=list)
    # False: pooling skips the prompt (instruction) tokens sentence-transformers prepends in encode(prompt=...);
    # tokenpool prepends none, so every token is pooled either way.
    include_prompt: bool = True
    dense: list[DenseSpec] = field(default_factory=list)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    has_modules: bool = False
    # Dense layers with no Pooling module (PyLate's ColBERT layout): they project every token, so the folder
    # must be read as a ColBERT model (tokenpool.loader.colbert); the registry refuses it otherwise.
    token_level: bool = False


def read_st_config(model_dir: Path) -> SentenceTransformerConfig:
    cfg = SentenceTransformerConfig()
    bert_cfg = model_dir / "sentence_bert_config.json"
    if bert_cfg.is_file():
        data = json.loads(bert_cfg.read_text())
        cfg.max_seq_length = data.get("max_seq_length")
        cfg.do_lower_case = bool(data.get("do_lower_case", False))
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return cfg
    cfg.has_modules = True
    has_pooling = False
    for module in sorted(json.loads(modules_file.read_text()), key=lambda m: m.get("idx", 0)):
        kind = module["type"].rsplit(".", 1)[-1]
        folder = model_dir / module.get("path", "")
        if kind == "Pooling":
            has_pooling = True
            cfg.pooling_modes, cfg.include_prompt = _read_pooling(folder / "config.json")
        elif kind == "Dense":
            cfg.dense.append(_read_dense(folder))
        elif kind == "Normalize":
            cfg.normalize = True
    cfg.token_level = bool(cfg.dense) and not has_pooling  # PyLate's ColBERT layout: Dense on every token
    return cfg


def _read_pooling(path: Path) -> tuple[list[str], bool]:
    data = json.loads(path.read_text())
    include_prompt = bool(data.get("include_prompt", True))
    if "pooling_mode" in data and isinstance(data["pooling_mode"], (str, list)):
        # Compact form: {"pooling_mode": "mean"} or a list of modes.
        modes = data["pooling_mode"] if isinstance(data["pooling_mode"], list) else [data["pooling_mode"]]
        modes = [m.lower().replace("-", "_") for m in modes]
        modes = ["mean" if m == "mean_tokens" else "max" if m == "max_tokens" else m for m in modes]
    else:
        modes = [mode for key, mode in _OLD_KEYS.items() if data.get(key)]
    unknown = [m for m in modes if m not in _POOLING_MODES]
    if unknown:
        raise ValueError(f"{path}: unknown pooling mode(s) {unknown}.")
    return sorted(modes, key=_POOLING_MODES.index), include_prompt


def _read_dense(folder: Path) -> DenseSpec:
    data = json.loads((folder / "config.json").read_text())
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = load_torch_file(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"Dense module {folder} has no weights.")
    return DenseSpec(
        in_features=data["in_features"],
        out_features=data["out_features"],
        bias=data.get("bias", True),
        # sentence-transformers' Dense defaults to Tanh when its config does not name an activation.
        activation=data.get("activation_function", "torch.nn.modules.activation.Tanh"),
        state_dict=state,
        use_residual=bool(data.get("use_residual", False)),
    )
