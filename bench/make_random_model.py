"""Write an all-MiniLM-L6-v2-shaped model folder with seeded random weights, for benchmarks where the real model
is not installed (timing only: the vectors mean nothing, but every system computes the same function).

    python bench/make_random_model.py OUT_DIR [--like MODEL_DIR] [--seed 0] [--std 0.02]

The configuration, tokenizer and sentence-transformers files (config.json, vocab.txt, tokenizer_config.json,
special_tokens_map.json, modules.json, sentence_bert_config.json, 1_Pooling/config.json) come from
`--like MODEL_DIR` when given, else from bench/minilm_files/ (all-MiniLM-L6-v2's own files, committed). tokenizer.json
is copied when the source has one, else built from vocab.txt by transformers' fast BERT tokenizer. The weights
(model.safetensors) are a `transformers.BertModel` of that config, every matrix and embedding drawn from
N(0, std^2) with `--seed`, biases 0, LayerNorm weights 1. Needs torch, transformers and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
         "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")
DEFAULT_SOURCE = Path(__file__).resolve().parent / "minilm_files"
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
POOLING = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


def make_random_model(out_dir: str | Path, like: str | Path | None = None, seed: int = 0, std: float = 0.02) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    src, out = Path(like or DEFAULT_SOURCE), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)
    if not (out / "config.json").exists() or not (out / "vocab.txt").exists() and not (out / "tokenizer.json").exists():
        raise SystemExit(f"{src} has no config.json and vocab.txt / tokenizer.json to copy.")
    config = BertConfig.from_pretrained(str(out))
    if not (out / "modules.json").exists():
        (out / "modules.json").write_text(json.dumps(MODULES, indent=2))
    if not (out / "1_Pooling" / "config.json").exists():
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(
            json.dumps(POOLING | {"word_embedding_dimension": config.hidden_size}, indent=2))
    if not (out / "sentence_bert_config.json").exists():
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    if not (out / "tokenizer.json").exists():  # the fast tokenizer, built from vocab.txt
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))

    torch.manual_seed(seed)
    model = BertModel(config)
    state = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if "LayerNorm" in name or name.endswith("norm.weight") or name.endswith("norm.bias"):
                t = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            elif name.endswith("bias"):
                t = torch.zeros_like(p)
            elif p.is_floating_point():
                t = torch.randn(p.shape, dtype=torch.float32) * std
            else:  # buffers (position ids)
                t = p
            state[name] = t.contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "RANDOM_WEIGHTS").write_text(f"seeded random weights (seed {seed}, std {std}); files from {src}\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--like", default=None, help="copy the config / tokenizer files from this model folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    args = p.parse_args()
    out = make_random_model(args.out_dir, args.like, args.seed, args.std)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
