"""ColBERT checkpoints on BERT and ModernBERT backbones (PyLate and Stanford formats) against sentence-transformers 6's
`MultiVectorEncoder` (`encode_query` / `encode_document`) on the same tiny random folders: the same kept
rows in the same order, cosine >= 0.99999 per row in fp32, MaxSim scores equal to 1e-4 relative."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.colbert import (DOCUMENT_LENGTH, QUERY_LENGTH, SAMPLE_DOCUMENTS, SAMPLE_QUERIES, build_st6_colbert,
                                   build_tiny_colbert)
from tests.reference import pylate_colbert as pylate_reference
from tests.toolkit import assert_batch_invariant
from tokenpool import LLM, PoolingParams
from tokenpool.scoring import maxsim

# name: (format, attend to the expansion positions, backbone): the folders PyLate's outputs are stored for
# (tests/reference/pylate_colbert.py), but the dual one, which sentence-transformers 6.2 misreads (below)
VARIANTS = {name: spec for name, spec in pylate_reference.FOLDERS.items() if name != "dual"}
# sentence-transformers 6 native folders (build_st6_colbert's arguments): expansion strategies, a query cap,
# the skiplist on both sides, plain-text prompts, the ModernBERT backbone.
ST6_VARIANTS = {
    "st6-fixed": dict(expansion={"strategy": "fixed", "attend": False, "length": QUERY_LENGTH}),
    "st6-min-attend-skip-both": dict(expansion={"strategy": "min", "attend": True, "length": 8}, query_length=12,
                                     skiplist_tasks=("query", "document")),
    "st6-no-expansion-text-prompts": dict(expansion=None, query_length=10,
                                          prompts=("search query: ", "search document: ")),
    "st6-modernbert": dict(expansion={"strategy": "fixed", "attend": False, "length": QUERY_LENGTH},
                           backbone="modernbert"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("colbert")
    built = {name: build_tiny_colbert(root / name, minilm_path, fmt, attend, backbone=backbone)
             for name, (fmt, attend, backbone) in VARIANTS.items()}
    built.update({name: build_st6_colbert(root / name, minilm_path, **kwargs) for name, kwargs in ST6_VARIANTS.items()})
    return built


@pytest.fixture(scope="module")
def references(folders):
    from sentence_transformers import MultiVectorEncoder

    refs = {}
    for name, folder in folders.items():
        model = MultiVectorEncoder(str(folder), device="cpu")
        refs[name] = ([torch.as_tensor(q) for q in model.encode_query(SAMPLE_QUERIES)],
                      [torch.as_tensor(d) for d in model.encode_document(SAMPLE_DOCUMENTS)])
    return refs


@pytest.fixture(scope="module")
def models(folders):
    return {name: LLM(str(folder), dtype="float32", device="cpu") for name, folder in folders.items()}


def _encode(llm, texts, input_type=None):
    params = PoolingParams(input_type=input_type) if input_type else None
    return [o.outputs.data for o in llm.encode(texts, params, pooling_task="token_embed", use_tqdm=False)]


def _assert_rows_equal(ours, theirs):
    for o, r in zip(ours, theirs, strict=True):
        assert o.shape == r.shape
        assert F.cosine_similarity(o, r.float(), dim=-1).min().item() >= 0.99999


@pytest.mark.parametrize("name", [*VARIANTS, *ST6_VARIANTS])
def test_queries_and_documents_equal_the_reference(name, models, references):
    llm, (ref_queries, ref_documents) = models[name], references[name]
    queries, documents = _encode(llm, SAMPLE_QUERIES, "query"), _encode(llm, SAMPLE_DOCUMENTS)
    _assert_rows_equal(queries, ref_queries)
    _assert_rows_equal(documents, ref_documents)
    if name in VARIANTS:  # expanded (or truncated) to the query length
        assert all(q.shape[0] == QUERY_LENGTH for q in queries)
    assert max(d.shape[0] for d in documents) <= DOCUMENT_LENGTH
    ours = np.array([[maxsim(q.numpy(), d.numpy()) for d in documents] for q in queries])
    theirs = np.array([[maxsim(q.numpy(), d.numpy()) for d in ref_documents] for q in ref_queries])
    assert np.allclose(ours, theirs, rtol=1e-4, atol=0)
    # "document" is the default mode, and an explicit document is the same.
    assert all(torch.equal(a, b) for a, b in zip(_encode(llm, SAMPLE_DOCUMENTS, "document"), documents))


def test_a_folder_with_pylate_and_stanford_files_reads_as_either(tmp_path, minilm_path, models, references):
    """answerai-colbert-small-v1 ships both formats; sentence-transformers 6.2 misreads such a folder, so the
    reference is the Stanford-only folder built from the same seed."""
    dual = LLM(str(build_tiny_colbert(tmp_path / "dual", minilm_path, "dual")), dtype="float32")
    ref_queries, ref_documents = references["stanford"]
    _assert_rows_equal(_encode(dual, SAMPLE_QUERIES, "query"), ref_queries)
    _assert_rows_equal(_encode(dual, SAMPLE_DOCUMENTS), ref_documents)


def test_the_fixture_is_sensitive_to_what_it_checks(models, folders):
    """The weights make a wrong choice visible: attending to the expansion positions (or not) and the
    marker move the query rows by O(1)."""
    text = ["colbert"]  # no punctuation: the document keeps every row
    plain, attend = _encode(models["pylate"], text, "query")[0], _encode(models["pylate-attend"], text, "query")[0]
    assert F.cosine_similarity(plain, attend, dim=-1).min().item() < 0.9
    as_document = _encode(models["pylate"], text, "document")[0]
    n = as_document.shape[0]  # the same ids but the marker: [CLS] [D] colbert [SEP] vs [CLS] [Q] colbert [SEP]
    assert n == 4 and F.cosine_similarity(plain[:n], as_document, dim=-1).min().item() < 0.9


def test_skiplist_drops_punctuation_rows_of_documents_only(models, folders):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["pylate"])
    text = "Dogs sleep; cats nap. Birds? They roost!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    punct = sum(tok.convert_ids_to_tokens(i) in ";.?!" for i in ids)
    document = _encode(models["pylate"], [text])[0]
    assert punct == 4 and document.shape[0] == len(ids) + 3 - punct  # CLS, [D], SEP kept
    query = _encode(models["pylate"], [text], "query")[0]
    assert query.shape[0] == QUERY_LENGTH  # queries keep every row


def test_mixed_modes_in_one_batch_equal_each_alone(models):
    llm = models["pylate"]
    texts = SAMPLE_QUERIES + SAMPLE_DOCUMENTS
    params = [PoolingParams(input_type="query")] * len(SAMPLE_QUERIES) + [PoolingParams(input_type="document")] * len(
        SAMPLE_DOCUMENTS)
    together = [o.outputs.data for o in llm.encode(texts, params, pooling_task="token_embed", use_tqdm=False)]
    for text, param, got in zip(texts, params, together):
        alone = _encode(llm, [text], param.input_type)[0]
        assert_batch_invariant(alone, got, "float32")


def test_score_encodes_queries_and_documents_in_their_modes(models):
    llm = models["pylate"]
    scores = [s.outputs.score for s in llm.score(SAMPLE_QUERIES[0], SAMPLE_DOCUMENTS, pooling_task="token_embed")]
    query = _encode(llm, SAMPLE_QUERIES[:1], "query")[0].numpy()
    expected = [maxsim(query, d.numpy()) for d in _encode(llm, SAMPLE_DOCUMENTS)]
    assert np.allclose(scores, expected, rtol=1e-6)


def test_tasks_and_errors(models, minilm_path):
    llm = models["pylate"]
    assert llm.supported_tasks == ("token_embed",)
    assert llm.llm_engine.info.input_types == ("query", "document")
    with pytest.raises(ValueError, match="input_type must be 'query' or 'document'"):
        PoolingParams(input_type="passage")
    # A model without modes accepts input_type and ignores it (as sentence-transformers does).
    plain = LLM(str(minilm_path), dtype="float32")
    assert plain.llm_engine.info.input_types == ()
    a, b = _encode(plain, ["a text"], "query")[0], _encode(plain, ["a text"])[0]
    assert torch.equal(a, b)


def test_a_folder_whose_markers_are_missing_is_refused(tmp_path, minilm_path):
    folder = build_tiny_colbert(tmp_path / "m", minilm_path, "pylate")
    cfg = json.loads((folder / "config_sentence_transformers.json").read_text())
    cfg["query_prefix"] = "[QUERY] "
    (folder / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="marker '\\[QUERY\\] ' is not in the tokenizer"):
        LLM(str(folder), dtype="float32")


def test_modernbert_queries_longer_than_the_window_reach_are_refused_without_attention(tmp_path, minilm_path):
    """Expansion positions that are not keys, further from the text than a local layer reaches, would see no
    key: no reference behaviour, so such a configuration is refused at load."""
    folder = build_tiny_colbert(tmp_path / "m", minilm_path, "pylate", backbone="modernbert")
    cfg = json.loads((folder / "config_sentence_transformers.json").read_text())
    cfg["query_length"] = 40
    (folder / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="query_length 40 with non-attended query expansion"):
        LLM(str(folder), dtype="float32")
    cfg["attend_to_expansion_tokens"] = True  # every position is a key: fine at any length
    (folder / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    assert _encode(LLM(str(folder), dtype="float32"), ["colbert"], "query")[0].shape[0] == 40
