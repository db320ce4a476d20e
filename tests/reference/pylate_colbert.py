"""PyLate's own outputs on the tiny ColBERT fixtures: the reference of tests/test_colbert_pylate.py.

PyLate 1.6 pins sentence-transformers 5.3 and transformers <= 5.3, so it cannot share the project's venv. Its
outputs are computed in a venv of its own (`.peer-venvs/pylate`, made by `bash bench/peers/setup_peers.sh
. pylate`) and stored in `tests/reference/data/pylate-colbert.npz`; the test reads them there, or runs PyLate
live when that venv exists (TOKENPOOL_PYLATE_PYTHON overrides its path). Regenerate after changing a fixture:

    .venv/bin/python -m tests.reference.pylate_colbert            # builds the folders, runs PyLate, writes the file

Each folder's weights are fingerprinted (the float64 sum of |w| over every tensor of its checkpoints) so a
changed fixture is reported as such instead of as a wrong output. Run in the PyLate venv, `python
pylate_colbert.py --encode REQUEST.json OUT.npz` encodes the folders and texts REQUEST.json lists.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "reference" / "data" / "pylate-colbert.npz"
# name: (build_tiny_colbert format, attend to the expansion positions, backbone)
FOLDERS = {
    "pylate": ("pylate", False, "bert"),
    "pylate-attend": ("pylate", True, "bert"),
    "pylate-two-dense-residual": ("pylate2", False, "bert"),
    "stanford": ("stanford", False, "bert"),
    "dual": ("dual", False, "bert"),
    # GTE-ModernColBERT's layout: documents longer than the local window's reach, queries not
    "modernbert": ("pylate", False, "modernbert"),
    "modernbert-attend-two-dense": ("pylate2", True, "modernbert"),
}


def pylate_python() -> pathlib.Path | None:
    path = pathlib.Path(os.environ.get("TOKENPOOL_PYLATE_PYTHON", REPO / ".peer-venvs" / "pylate" / "bin" / "python"))
    return path if path.exists() else None


def fingerprint(folder: pathlib.Path) -> float:
    """The float64 sum of |w| over every weight file of the folder (backbone and Dense layers)."""
    import torch
    from safetensors.torch import load_file

    return float(sum(t.double().abs().sum() for f in sorted(folder.rglob("*.safetensors"))
                     for t in load_file(str(f)).values()))


def build_folders(root: pathlib.Path, minilm: pathlib.Path) -> dict[str, pathlib.Path]:
    from tests.fixtures.colbert import build_tiny_colbert

    return {name: build_tiny_colbert(root / name, minilm, fmt, attend, backbone=backbone)
            for name, (fmt, attend, backbone) in FOLDERS.items()}


def run_pylate(folders: dict[str, pathlib.Path], queries: list[str], documents: list[str],
               python: pathlib.Path) -> dict:
    """PyLate's outputs, computed by `python` (PyLate's venv): {"name/q0": array, "name/d0": ..., ...}."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        request = pathlib.Path(tmp) / "request.json"
        request.write_text(json.dumps({"folders": {k: str(v) for k, v in folders.items()},
                                       "queries": queries, "documents": documents}))
        out = pathlib.Path(tmp) / "out.npz"
        subprocess.run([str(python), __file__, "--encode", str(request), str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        with np.load(out) as data:
            return dict(data)


def _encode(request_file: str, out_file: str) -> None:
    """In PyLate's venv: ColBERT(folder).encode(queries, is_query=True) and (documents, is_query=False)."""
    import numpy as np
    import pylate
    from pylate import models

    request = json.loads(pathlib.Path(request_file).read_text())
    arrays = {"pylate_version": np.array(pylate.__version__)}
    for name, folder in request["folders"].items():
        model = models.ColBERT(model_name_or_path=folder, device="cpu")
        for prefix, texts, is_query in (("q", request["queries"], True), ("d", request["documents"], False)):
            for i, rows in enumerate(model.encode(texts, is_query=is_query, convert_to_numpy=True)):
                arrays[f"{name}/{prefix}{i}"] = np.asarray(rows, dtype=np.float32)
    np.savez_compressed(out_file, **arrays)


def regenerate() -> None:
    import numpy as np

    from tests.fixtures.colbert import SAMPLE_DOCUMENTS, SAMPLE_QUERIES

    python = pylate_python()
    if python is None:
        sys.exit("PyLate's venv is missing: bash bench/peers/setup_peers.sh .peer-venvs pylate")
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_folders(pathlib.Path(tmp), REPO / "bench" / "minilm_files")
        arrays = run_pylate(folders, SAMPLE_QUERIES, SAMPLE_DOCUMENTS, python)
        arrays.update({f"{name}/fingerprint": np.array(fingerprint(f)) for name, f in folders.items()})
    DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DATA, **arrays)
    print(f"wrote {DATA} (PyLate {arrays['pylate_version']}, {len(folders)} folders)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--encode":
        _encode(sys.argv[2], sys.argv[3])
    else:
        sys.path.insert(0, str(REPO))
        regenerate()
