"""The HTTP server: vLLM- and OpenAI-compatible pooling routes over an `AsyncLLMEngine`.

    app = build_app(AsyncLLMEngine(LLMEngine(EngineArgs(model=...))), ServerConfig(...))

`tokenpool serve` (entrypoints/cli.py) builds the same app and runs it with uvicorn.
"""

from tokenpool.extras import require

require("server")

from tokenpool.entrypoints.server.app import build_app  # noqa: E402
from tokenpool.entrypoints.server.serving import ServerConfig  # noqa: E402

__all__ = ["build_app", "ServerConfig"]
