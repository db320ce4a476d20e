"""The ModernBERT backbone against transformers' ModernBertModel on tiny random checkpoints (both checkpoint
layouts, both config forms), sentence-transformers dense models on it against SentenceTransformer, and the
fixture's sensitivity to the window, the thetas and the layer kinds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.modernbert import LOCAL_ATTENTION, SAMPLE_TEXTS, build_dense_modernbert, build_tiny_modernbert
from tests.toolkit import assert_batch_invariant
from tokenpool import LLM

FOLDERS = {  # name: (checkpoint layout, config form)
    "model-t5": ("model", "transformers5"),
    "mlm-t4": ("mlm", "transformers4"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert")
    return {name: build_tiny_modernbert(root / name, layout, form) for name, (layout, form) in FOLDERS.items()}


def _reference_states(folder, texts):
    """Per text, transformers' last hidden states `[n, hidden]` (fp32, SDPA, one text per call: no padding)."""
    from transformers import AutoTokenizer, ModernBertModel

    tok = AutoTokenizer.from_pretrained(folder)
    model = ModernBertModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]


def _token_embed(llm, texts):
    return [o.outputs.data for o in llm.encode(texts, pooling_task="token_embed", use_tqdm=False)]


def _min_cos(ours, theirs) -> float:
    return min(F.cosine_similarity(o, t.float(), dim=-1).min().item() for o, t in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("name", list(FOLDERS))
def test_hidden_states_equal_transformers(name, folders):
    folder = folders[name]
    ours = _token_embed(LLM(str(folder), dtype="float32"), SAMPLE_TEXTS)
    theirs = _reference_states(folder, SAMPLE_TEXTS)
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    assert max(t.shape[0] for t in theirs) > 4 * LOCAL_ATTENTION  # several windows long
    assert _min_cos(ours, theirs) >= 0.99999


def test_the_fixture_is_sensitive_to_window_theta_and_layer_kinds(tmp_path, folders):
    """Each of these changes to config.json moves some token of the long text by O(1): a model that ignored
    the window, swapped the thetas or mis-read the layer kinds would fail the equality test above."""
    base = folders["model-t5"]
    reference = _token_embed(LLM(str(base), dtype="float32"), SAMPLE_TEXTS)
    cfg = json.loads((base / "config.json").read_text())
    rope = cfg["rope_parameters"]
    changes = {
        "no window": {"local_attention": 100_000},
        "thetas swapped": {"rope_parameters": {"full_attention": rope["sliding_attention"],
                                               "sliding_attention": rope["full_attention"]}},
        "every layer global": {"layer_types": ["full_attention"] * len(cfg["layer_types"])},
    }
    for what, change in changes.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        for f in base.iterdir():
            (folder / f.name).symlink_to(f)
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        changed = _token_embed(LLM(str(folder), dtype="float32"), SAMPLE_TEXTS)
        assert _min_cos(changed, reference) < 0.9, what


def test_mixed_lengths_in_one_batch_equal_each_alone(folders):
    llm = LLM(str(folders["model-t5"]), dtype="float32")
    together = _token_embed(llm, SAMPLE_TEXTS)
    for text, got in zip(SAMPLE_TEXTS, together):
        assert_batch_invariant(_token_embed(llm, [text])[0], got, "float32")


def test_cpu_bf16_close_to_fp32(folders):
    """bf16 GEMMs with the fp32 residual stream (native bf16 or emulated, whichever this CPU has)."""
    folder = folders["model-t5"]
    fp32 = _token_embed(LLM(str(folder), dtype="float32"), SAMPLE_TEXTS)
    bf16 = _token_embed(LLM(str(folder), dtype="bfloat16"), SAMPLE_TEXTS)
    assert _min_cos(bf16, fp32) >= 0.99


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_dense_model_embeds_as_the_reference(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    folder = build_dense_modernbert(tmp_path / pooling, pooling)
    llm = LLM(str(folder), dtype="float32")
    assert "embed" in llm.supported_tasks
    ours = torch.stack([torch.as_tensor(o.outputs.embedding) for o in llm.embed(SAMPLE_TEXTS, use_tqdm=False)])
    theirs = torch.as_tensor(SentenceTransformer(str(folder), device="cpu").encode(SAMPLE_TEXTS))
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SAMPLE_TEXTS)), atol=1e-5)
    assert F.cosine_similarity(ours, theirs, dim=-1).min().item() >= 0.99999
