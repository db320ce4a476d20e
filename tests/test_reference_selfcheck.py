"""The hand-built BGE-M3 reference must equal FlagEmbedding's BGEM3FlagModel.

Also pins down properties of the tiny fixture that the parity tests rely on:
it tokenizes like XLM-R, its outputs are finite, and they depend strongly on
the position ids (so an off-by-one in positions cannot hide under atol 1e-4).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from tests.fixtures.bge_m3 import SAMPLE_TEXTS
from tests.reference.bge_m3_reference import (
    bge_m3_reference_flagembedding,
    bge_m3_reference_manual,
    colbert_score,
    load_bge_m3_flag_model,
)


def test_fixture_tokenizes_like_xlm_roberta(tiny_bge_m3: pathlib.Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bge_m3)
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (1, 3, len(tok) - 1)
    a, b = tok("a")["input_ids"], tok("b")["input_ids"]
    assert tok("a", "b")["input_ids"] == a + [2] + b[1:]  # <s> A </s> </s> B </s>
    raw = Tokenizer.from_file(str(tiny_bge_m3 / "tokenizer.json"))
    for text in SAMPLE_TEXTS:  # AutoTokenizer must not change the saved pipeline
        assert tok(text)["input_ids"] == raw.encode(text).ids


def test_fixture_outputs_depend_on_positions_and_mask(tiny_bge_m3: pathlib.Path) -> None:
    """Off-by-one positions and mask leaks must change hidden states by O(1), not 1e-3."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bge_m3).eval()
    ids = torch.tensor([[0, 10, 20, 30, 40, 50, 2]])  # [1, 7]
    pos = torch.arange(2, 2 + ids.shape[1])[None]  # XLM-R positions start at pad_id + 1
    other = torch.tensor([[0, 60, 70, 80, 2]])  # a second sequence that must not be seen
    with torch.no_grad():
        h = model(input_ids=ids, position_ids=pos).last_hidden_state[0]  # [7, 64]
        shifted = model(input_ids=ids, position_ids=pos + 1).last_hidden_state[0]
        leaked = model(
            input_ids=torch.cat([ids, other], 1), position_ids=torch.cat([pos, torch.arange(2, 7)[None]], 1)
        ).last_hidden_state[0, :7]
    assert torch.isfinite(h).all()
    cos = torch.nn.functional.cosine_similarity(h, shifted, dim=-1)
    assert cos.max() < 0.99, cos
    assert (h - leaked).abs().max() > 0.1


def test_bin_and_safetensors_fixtures_agree(tiny_bge_m3: pathlib.Path, tiny_bge_m3_bin: pathlib.Path) -> None:
    assert not (tiny_bge_m3_bin / "model.safetensors").exists()
    a = bge_m3_reference_manual(tiny_bge_m3, SAMPLE_TEXTS[:2])
    b = bge_m3_reference_manual(tiny_bge_m3_bin, SAMPLE_TEXTS[:2])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["dense"], y["dense"])


def test_manual_reference_shapes(tiny_bge_m3: pathlib.Path) -> None:
    for ref in bge_m3_reference_manual(tiny_bge_m3, SAMPLE_TEXTS):
        n = len(ref["input_ids"])
        assert ref["dense"].shape == (64,) and ref["colbert"].shape == (n - 1, 64)
        assert ref["sparse_per_token"].shape == (n,)
        assert np.isclose(np.linalg.norm(ref["dense"]), 1.0, atol=1e-5)
        assert ref["lexical_weights"] and all(w > 0 for w in ref["lexical_weights"].values())
        assert not {"0", "1", "2", "3"} & set(ref["lexical_weights"])
        assert np.isclose(colbert_score(ref["colbert"], ref["colbert"]), 1.0, atol=1e-5)


def test_manual_reference_matches_flagembedding(tiny_bge_m3: pathlib.Path) -> None:
    flag_model, reason = load_bge_m3_flag_model()
    if flag_model is None:
        pytest.skip(f"FlagEmbedding unavailable, nothing to cross-check: {reason}")
    texts = SAMPLE_TEXTS + ["word " * 200]  # the last one is truncated to 128 tokens
    manual = bge_m3_reference_manual(tiny_bge_m3, texts)
    flag = bge_m3_reference_flagembedding(tiny_bge_m3, texts)
    for m, f in zip(manual, flag):
        assert m["input_ids"] == f["input_ids"]
        for key in ("dense", "colbert", "sparse_per_token"):
            np.testing.assert_allclose(m[key], f[key], rtol=1e-5, atol=1e-5, err_msg=key)
        assert m["lexical_weights"].keys() == f["lexical_weights"].keys()
        for k, w in m["lexical_weights"].items():
            assert w == pytest.approx(f["lexical_weights"][k], abs=1e-5)
    assert len(manual[-1]["input_ids"]) == 128
