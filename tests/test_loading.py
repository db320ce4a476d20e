"""Loading: sentence-transformers folders (both Pooling config forms, Dense, Normalize), sharded
safetensors, pytorch_model.bin, hf_overrides, pooler_config; each compared with sentence-transformers."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tokenpool import LLM, PoolerConfig

TEXTS = ["Hello, my name is", "A longer sentence to pool over, with some more words in it.", "x"]


def _tiny_bert(folder, minilm_path, *, modes, compact=False, dense=False, normalize=True, shards=False, bin_=False):
    """A tiny random BERT in sentence-transformers layout, with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_act="gelu")
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    if bin_:
        model.save_pretrained(folder, safe_serialization=False)
    else:
        model.save_pretrained(folder, max_shard_size="100KB" if shards else "10GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, folder / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    if compact:
        pooling = {"embedding_dimension": 32, "pooling_mode": modes[0], "include_prompt": True}
    else:
        pooling = {"word_embedding_dimension": 32, **{f"pooling_mode_{m}": True for m in modes}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if dense:
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": 32 * len(modes), "out_features": 16, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}))
        linear = torch.nn.Linear(32 * len(modes), 16)
        from safetensors.torch import save_file

        save_file({f"linear.{k}": v.contiguous() for k, v in linear.state_dict().items()},
                  str(folder / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": "", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return folder


CASES = {
    "mean": dict(modes=["mean_tokens"]),
    "cls_compact": dict(modes=["cls"], compact=True),
    "max_no_normalize": dict(modes=["max_tokens"], normalize=False),
    "mean_sqrt_len": dict(modes=["mean_sqrt_len_tokens"]),
    "lasttoken_compact": dict(modes=["lasttoken"], compact=True),
    "cls_mean_dense": dict(modes=["cls_token", "mean_tokens"], dense=True),
    "sharded": dict(modes=["mean_tokens"], shards=True),
    "bin": dict(modes=["mean_tokens"], bin_=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embed_matches_sentence_transformers(case, tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    folder = _tiny_bert(tmp_path / case, minilm_path, **CASES[case])
    if case == "sharded":
        assert len(list(folder.glob("*.safetensors"))) > 1
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    llm = LLM(str(folder), dtype="float32")
    ours = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    assert ours.shape == ref.shape
    assert F.cosine_similarity(ours, ref, dim=1).min().item() >= 0.99999
    # Normalization follows the folder: with no Normalize module the vectors keep their length.
    assert torch.allclose(ours.norm(dim=1), ref.norm(dim=1), rtol=1e-4)
    assert llm.llm_engine.max_model_len == 64  # sentence_bert_config.json's max_seq_length


def test_pooler_config_overrides_pooling_type(tmp_path, minilm_path):
    folder = _tiny_bert(tmp_path / "m", minilm_path, modes=["mean_tokens"])
    cls_llm = LLM(str(folder), dtype="float32", pooler_config=PoolerConfig(pooling_type="CLS"))
    hidden = LLM(str(folder), dtype="float32").encode(TEXTS, pooling_task="token_embed",
                                                      pooling_params=None, use_tqdm=False)
    outs = cls_llm.embed(TEXTS, use_tqdm=False)
    for o, h in zip(outs, hidden):
        assert F.cosine_similarity(torch.tensor(o.outputs.embedding), h.outputs.data[0], dim=0).item() > 0.99999


def test_hf_overrides_bge_m3_architecture(tiny_bge_m3):
    llm = LLM(str(tiny_bge_m3), hf_overrides={"architectures": ["BgeM3EmbeddingModel"]})
    assert set(llm.supported_tasks) == {"embed", "token_embed", "token_classify", "all"}


def test_bge_m3_architecture_without_heads_is_an_error(tmp_path, tiny_bge_m3):
    folder = tmp_path / "noheads"
    shutil.copytree(tiny_bge_m3, folder)
    (folder / "colbert_linear.pt").unlink()
    with pytest.raises(ValueError, match="needs colbert_linear.pt"):
        LLM(str(folder), hf_overrides={"architectures": ["BgeM3EmbeddingModel"]})
    # Without the override the folder is a plain XLM-R encoder: embed + raw token vectors.
    assert set(LLM(str(folder)).supported_tasks) == {"embed", "token_embed", "all"}


def test_default_model_is_minilm():
    llm = LLM()
    assert llm.llm_engine.hf_config.hidden_size == 384
    assert len(llm.embed("hello", use_tqdm=False)[0].outputs.embedding) == 384


def test_pooler_config_dimensions_is_embeds_default(tmp_path, minilm_path):
    """PoolerConfig.dimensions truncates every embed output unless the request asks otherwise."""
    from tokenpool import PoolingParams

    folder = _tiny_bert(tmp_path / "m", minilm_path, modes=["mean_tokens"])
    full = torch.tensor([o.outputs.embedding for o in LLM(str(folder), dtype="float32").embed(TEXTS, use_tqdm=False)])
    llm = LLM(str(folder), dtype="float32", pooler_config={"dimensions": 8})
    short = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    assert short.shape == (len(TEXTS), 8)
    assert torch.allclose(short, F.normalize(full[:, :8], dim=-1), atol=1e-5)
    asked = llm.embed(TEXTS[:1], PoolingParams(dimensions=16), use_tqdm=False)[0].outputs.embedding
    assert len(asked) == 16
    with pytest.raises(ValueError, match="outside 1..32"):
        LLM(str(folder), dtype="float32", pooler_config={"dimensions": 33})
    with pytest.raises(ValueError, match="outside 1..32"):
        llm.embed(TEXTS, PoolingParams(dimensions=64), use_tqdm=False)


def test_pylate_layout_without_its_markers_is_refused(tmp_path, minilm_path):
    """Dense layers with no Pooling module are a PyLate ColBERT folder; with no ColBERT settings saved, PyLate
    would add its default markers with untrained embeddings: refused, not encoded differently."""
    folder = _tiny_bert(tmp_path / "colbert", minilm_path, modes=["mean_tokens"], dense=True, normalize=False)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Pooling")]))
    with pytest.raises(ValueError, match="marker '\\[Q\\] ' is not in the tokenizer"):
        LLM(str(folder), dtype="float32")


def test_unsupported_pooling_mode_is_refused_at_load(tmp_path, minilm_path):
    folder = _tiny_bert(tmp_path / "wm", minilm_path, modes=["weightedmean_tokens"])
    with pytest.raises(ValueError, match=r"Pooling mode\(s\) \['weightedmean'\] are not supported"):
        LLM(str(folder), dtype="float32")


@pytest.mark.parametrize("change, message", [
    ("drop_key", "missing 1 weight"),  # one part of the stacked q/k/v
    ("extra", "Unexpected weight 'encoder.layer.0.attention.self.extra.weight'"),
    ("shape", "has shape"),
])
def test_weight_loader_checks(tmp_path, minilm_path, change, message):
    """The declarative loader refuses checkpoints with a missing part, an unknown key or a wrong shape."""
    from safetensors.torch import load_file, save_file

    folder = _tiny_bert(tmp_path / change, minilm_path, modes=["mean_tokens"])
    path = folder / "model.safetensors"
    state = load_file(str(path))
    key = "encoder.layer.0.attention.self.key.weight"
    if change == "drop_key":
        del state[key]
    elif change == "extra":
        state["encoder.layer.0.attention.self.extra.weight"] = state[key].clone()
    else:
        state[key] = state[key][:-1].clone()
    save_file(state, str(path))
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), dtype="float32")
