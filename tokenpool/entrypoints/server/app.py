"""The FastAPI app: routes, error handlers, the guard middleware, the engine thread's lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.routing import APIRoute

from tokenpool.engine.async_engine import AsyncLLMEngine
import tokenpool.entrypoints.server.routes_index as routes_index
import tokenpool.entrypoints.server.routes_misc as routes_misc
import tokenpool.entrypoints.server.routes_pooling as routes_pooling
import tokenpool.entrypoints.server.routes_score as routes_score
from tokenpool.entrypoints.server.errors import install_error_handlers
from tokenpool.entrypoints.server.metrics import ServerMetrics
from tokenpool.entrypoints.server.middleware import PUBLIC_PATHS, GuardMiddleware, Load
from tokenpool.entrypoints.server.openapi import install_openapi
from tokenpool.entrypoints.server.serving import ServerConfig, ServingState
from tokenpool.version import __version__

# Routes that do model or tokenizer work: they count against --max-concurrent-requests.
LIMITED_PATHS = frozenset({"/pooling", "/v1/embeddings", "/v1/bge_m3", "/score", "/v1/score", "/rerank",
                           "/v1/rerank", "/tokenize", "/detokenize"}) | routes_index.INDEX_PATHS

_DESCRIPTION = """Pooling models over HTTP, wire-compatible with vLLM's pooling routes and OpenAI embeddings.
Every task the model supports is served: `/pooling` picks it with `task`. Errors have the body
`{"error": {"message", "type", "param", "code"}}`."""


def build_app(engine: AsyncLLMEngine, config: ServerConfig | None = None, *,
              default_task: str | None = None) -> FastAPI:
    """An app serving `engine`; starts the engine (build + warm-up on its thread) if it is not running yet.

    The app's lifespan stops the engine thread at shutdown.
    """
    config = config or ServerConfig()
    metrics = ServerMetrics()
    load = Load()
    state = ServingState(engine, config, metrics, default_task, load)
    engine.on_step = metrics.on_step
    engine.expected_callers = load.expected
    metrics.bind_engine(lambda: engine.num_waiting, lambda: engine.is_healthy, lambda: engine.counters.aborted,
                        running=lambda: engine.num_running, queued=lambda: engine.num_queued,
                        model_name=state.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="tokenpool", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.serving = state
    install_error_handlers(app)
    routers = [module.router for module in (routes_pooling, routes_score, routes_index, routes_misc)]
    for router in routers:
        app.include_router(router)
    known = frozenset(route.path for router in routers for route in router.routes if isinstance(route, APIRoute))
    known |= {"/openapi.json", "/docs", "/redoc"}
    app.add_middleware(GuardMiddleware, metrics=metrics, load=load, known_paths=known, limited_paths=LIMITED_PATHS,
                       api_key=config.api_key, max_body_bytes=config.max_request_body_bytes,
                       max_concurrent=config.max_concurrent_requests)
    install_openapi(app, state, PUBLIC_PATHS)
    return app
