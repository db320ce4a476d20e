"""Optional extras: one clear line naming what to install when a feature's packages are missing.

    require("server")   # before importing FastAPI & co.

raises `MissingExtraError` ("... needs the 'server' extra (missing: fastapi): pip install 'tokenpool[server]'"),
which the CLI prints as one line instead of a traceback.
"""

from __future__ import annotations

import importlib.util

# extra -> (what it enables, the top-level modules it must provide). Keep in step with pyproject.toml.
EXTRAS = {
    "server": ("the HTTP server (tokenpool serve)", ("fastapi", "starlette", "pydantic", "uvicorn", "orjson",
                                                     "prometheus_client")),
    "image": ("Reading images", ("PIL",)),
    "ray": ("tokenpool on Ray (embed_dataset, embed-corpus)", ("ray", "pyarrow")),
    "lance": ("Writing to LanceDB", ("lancedb", "lance")),
    "qdrant": ("Writing to Qdrant", ("qdrant_client",)),
}


class MissingExtraError(ImportError):
    """A feature's optional packages are not installed; the message says what to install."""


def require(extra: str, feature: str | None = None) -> None:
    """Raise `MissingExtraError` unless every module of `extra` can be imported."""
    what, modules = EXTRAS[extra]
    missing = [m for m in modules if _missing(m)]
    if missing:
        raise MissingExtraError(f"{feature or what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
                                f"pip install 'tokenpool[{extra}]'")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package that fails to import, or sys.modules[m] = None
        return True
