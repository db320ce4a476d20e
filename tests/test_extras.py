"""A missing optional extra fails with one line naming what to install, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenpool.extras import EXTRAS, MissingExtraError, require


def _without(modules: list[str], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `modules` cannot be imported."""
    block = "".join(f"sys.modules[{m!r}] = None; " for m in modules)
    return subprocess.run([sys.executable, "-c", f"import sys; {block}\n{code}"], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "orjson"])
def test_serve_without_the_server_extra_is_one_line(missing):
    proc = _without([missing], "from tokenpool.entrypoints.cli import main; main(['serve', '--port', '0'])")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"tokenpool serve: the HTTP server (tokenpool serve) needs the 'server' extra (missing: {missing}): "
                     "pip install 'tokenpool[server]'"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_importing_the_server_without_the_extra_names_it():
    proc = _without(["fastapi"], "from tokenpool.entrypoints.server import build_app")
    assert proc.returncode == 1
    assert "MissingExtraError" in proc.stderr and "pip install 'tokenpool[server]'" in proc.stderr


def test_image_inputs_without_pillow(tiny_qwen2_5_vl):
    code = ("from tokenpool import LLM\n"
            "try:\n"
            f"    LLM({str(tiny_qwen2_5_vl)!r}, dtype='float32', device='cpu')\n"
            "except ImportError as e:\n"
            "    print('ERR', e)\n")
    proc = _without(["PIL"], code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR Loading a model with image inputs needs the 'image' extra (missing: PIL): pip install 'tokenpool[image]'" \
        in proc.stdout
    proc = _without(["PIL"], "from tokenpool.multimodal.utils import fetch_image\n"
                             "try:\n    fetch_image('x.png')\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert "ERR fetch_image needs the 'image' extra (missing: PIL)" in proc.stdout


def test_require_passes_when_installed():
    for extra in EXTRAS:
        require(extra)  # the test environment installs every extra
    with pytest.raises(KeyError):
        require("no-such-extra")
    assert issubclass(MissingExtraError, ImportError)


def test_embed_corpus_without_the_ray_extra_is_one_line(tmp_path):
    proc = _without(["ray"], f"from tokenpool.entrypoints.cli import main; main(['embed-corpus', {str(tmp_path)!r}, "
                             f"{str(tmp_path / 'out')!r}])")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tokenpool embed-corpus: tokenpool embed-corpus needs the 'ray' extra (missing: ray): "
        "pip install 'tokenpool[ray]'"], proc.stderr
    proc = _without(["ray"], "from tokenpool.ray import embed_dataset\n"
                             "try:\n    embed_dataset(None, None)\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert "ERR tokenpool.ray.embed_dataset needs the 'ray' extra (missing: ray)" in proc.stdout, proc.stderr
