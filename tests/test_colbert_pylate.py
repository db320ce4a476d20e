"""ColBERT fixtures (BERT and ModernBERT backbones, PyLate and Stanford formats, both at once) against PyLate
1.6 itself: outputs stored in tests/reference/data/pylate-colbert.npz by tests/reference/pylate_colbert.py
(PyLate lives in a venv of its own), or computed live when that venv exists. Same rows in the same order,
cosine >= 0.99999 per row in fp32, MaxSim scores equal to 1e-4 relative."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES
from tests.reference import pylate_colbert as ref
from tokenpool import LLM, PoolingParams
from tokenpool.scoring import maxsim

# The BERT fixtures' tokenizer: all-MiniLM-L6-v2's files, committed with the benchmarks.
TOKENIZER_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "bench" / "minilm_files"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return ref.build_folders(tmp_path_factory.mktemp("colbert-pylate"), TOKENIZER_SOURCE)


@pytest.fixture(scope="module")
def pylate_outputs(folders):
    python = ref.pylate_python()
    if python is not None:  # PyLate's venv is here: run it on these very folders
        return ref.run_pylate(folders, SAMPLE_QUERIES, SAMPLE_DOCUMENTS, python), "live"
    with np.load(ref.DATA) as data:
        stored = dict(data)
    for name, folder in folders.items():
        assert abs(ref.fingerprint(folder) - float(stored[f"{name}/fingerprint"])) < 1e-6 * float(
            stored[f"{name}/fingerprint"]), (f"the {name} fixture changed since PyLate's outputs were stored: "
                                             "regenerate them (python -m tests.reference.pylate_colbert)")
    return stored, "stored"


@pytest.mark.parametrize("name", list(ref.FOLDERS))
def test_equals_pylate(name, folders, pylate_outputs):
    outputs, _ = pylate_outputs
    llm = LLM(str(folders[name]), dtype="float32", device="cpu")
    ours = {}
    for prefix, texts, mode in (("q", SAMPLE_QUERIES, "query"), ("d", SAMPLE_DOCUMENTS, "document")):
        got = llm.encode(texts, PoolingParams(input_type=mode), pooling_task="token_embed", use_tqdm=False)
        for i, o in enumerate(got):
            theirs = torch.as_tensor(outputs[f"{name}/{prefix}{i}"])
            assert o.outputs.data.shape == theirs.shape, (prefix, i)
            assert F.cosine_similarity(o.outputs.data, theirs, dim=-1).min().item() >= 0.99999, (prefix, i)
            ours[f"{prefix}{i}"] = o.outputs.data.numpy()
    for qi in range(len(SAMPLE_QUERIES)):
        for di in range(len(SAMPLE_DOCUMENTS)):
            want = maxsim(outputs[f"{name}/q{qi}"], outputs[f"{name}/d{di}"])
            assert maxsim(ours[f"q{qi}"], ours[f"d{di}"]) == pytest.approx(want, rel=1e-4)
