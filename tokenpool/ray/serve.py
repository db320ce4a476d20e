"""`tokenpool serve` replicas on Ray Serve: every replica runs `tokenpool serve`'s own FastAPI app (same routes,
errors, auth and limits) over its own engine; Ray Serve's proxy spreads requests over them.

    app = serve_app("BAAI/bge-m3", num_replicas=2, num_gpus_per_replica=1, dtype="bfloat16")
    ray.serve.run(app, route_prefix="/")          # or: tokenpool serve MODEL --ray-replicas 2

A replica answers Ray Serve's health checks from its engine thread's health (a dead engine loop gets the
replica replaced). `/health` and `/metrics` through the proxy are answered by whichever replica it picks
(each has its own registry, vLLM's gauges included). Per-replica series go through Ray's own metrics export
(each node's metrics agent, `ray.init(_metrics_export_port=...)`; `tokenpool serve --ray-metrics-port`), one
series per replica (tag `replica`): `ray_tokenpool_num_requests_running`, `ray_tokenpool_num_requests_waiting`,
`ray_tokenpool_engine_healthy` (gauges, updated every second), `ray_tokenpool_engine_steps_total` and
`ray_tokenpool_engine_tokens_total` (counters).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ray import serve

from tokenpool.config import EngineArgs
from tokenpool.entrypoints.server.serving import ServerConfig
from tokenpool.ray import replica_range

logger = logging.getLogger("tokenpool")

# Requests a replica accepts at once. Ray Serve's default (5) would starve the engine's batching: the
# engine packs whatever is queued into one batch, so a replica should hold many requests.
MAX_ONGOING_REQUESTS = 1024


@serve.ingress()
class TokenpoolReplica:
    """One engine (built, warmed up and run on its own thread) and `tokenpool serve`'s app over it."""

    def __init__(self, engine_args: EngineArgs, config: ServerConfig):
        from tokenpool.engine.async_engine import AsyncLLMEngine
        from tokenpool.engine.engine import LLMEngine

        self.engine_args, self.config = engine_args, config
        self.engine = AsyncLLMEngine(lambda: LLMEngine(engine_args)).start()

    def __serve_build_asgi_app__(self):
        from tokenpool.entrypoints.server import build_app

        pooler = self.engine_args.pooler_config
        default_task = self.engine_args.task or (pooler.task if pooler is not None else None)
        app = build_app(self.engine, self.config, default_task=default_task)
        self._export_metrics()  # after build_app, which installs the engine's step hook
        return app

    def _export_metrics(self) -> None:
        """This replica's series in Ray's metrics export (tag `replica`): gauges refreshed every second by a
        daemon thread, step counters from the engine thread's step hook."""
        import threading

        from ray.util.metrics import Counter, Gauge

        tags = {"replica": serve.get_replica_context().replica_id.unique_id}
        engine = self.engine
        gauges = [
            (Gauge("tokenpool_num_requests_running", "Prompts in the engine core.", tag_keys=("replica",)),
             lambda: engine.num_running),
            (Gauge("tokenpool_num_requests_waiting", "Prompts queued for the engine core.", tag_keys=("replica",)),
             lambda: engine.num_queued),
            (Gauge("tokenpool_engine_healthy", "1 while the engine loop is alive.", tag_keys=("replica",)),
             lambda: 1.0 if engine.is_healthy else 0.0),
        ]
        steps = Counter("tokenpool_engine_steps", "Engine steps (batches) run.", tag_keys=("replica",))
        tokens = Counter("tokenpool_engine_tokens", "Tokens run through the model.", tag_keys=("replica",))
        previous = engine.on_step

        def on_step(stats) -> None:
            if previous is not None:
                previous(stats)
            steps.inc(1, tags=tags)
            if stats.num_tokens:
                tokens.inc(stats.num_tokens, tags=tags)

        engine.on_step = on_step

        def refresh() -> None:
            while True:
                for gauge, read in gauges:
                    gauge.set(read(), tags=tags)
                time.sleep(1.0)

        threading.Thread(target=refresh, name="tokenpool-ray-metrics", daemon=True).start()

    def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise RuntimeError("the engine loop of this replica is not running")


def serve_app(model: str | None = None, *, num_replicas: int | tuple[int, int] = 1, num_gpus_per_replica: float = 0,
              num_cpus_per_replica: float | None = None, config: ServerConfig | None = None, **engine_kwargs: Any):
    """A Ray Serve application of `num_replicas` engines of `model` (a (min, max) pair autoscales on ongoing
    requests); `config`: the server's settings (API key, limits), as for `tokenpool serve`; engine_kwargs: as
    for `LLM(...)`. Run it with `ray.serve.run(app, route_prefix="/")`."""
    engine_args = EngineArgs.from_kwargs(model=model, **engine_kwargs)  # argument errors here, not in a replica
    if not num_gpus_per_replica and engine_args.device == "auto":
        # a replica without a GPU reservation must not take a GPU it happens to see
        engine_args = dataclasses.replace(engine_args, device="cpu")
    options: dict[str, Any] = {"max_ongoing_requests": MAX_ONGOING_REQUESTS,
                               "ray_actor_options": {"num_gpus": num_gpus_per_replica}}
    if num_cpus_per_replica is not None:
        options["ray_actor_options"]["num_cpus"] = num_cpus_per_replica
    low, high = replica_range(num_replicas)
    if high is None:
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 64}
    deployment = serve.deployment(TokenpoolReplica, name="tokenpool", **options)
    return deployment.bind(engine_args, config or ServerConfig())


def run(engine_args: EngineArgs, config: ServerConfig, *, replicas: int, gpus_per_replica: float = 0,
        cpus_per_replica: float | None = None, ray_address: str | None = None,
        metrics_port: int | None = None) -> None:
    """`tokenpool serve MODEL --ray-replicas N`: start (or join) Ray, serve on config.host:config.port until
    SIGINT / SIGTERM."""
    import os
    import signal

    import ray

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # SIGINT already raises KeyboardInterrupt
    local = {} if ray_address else {"num_cpus": os.cpu_count(),
                                    **({"_metrics_export_port": metrics_port} if metrics_port else {})}
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=True, **local)
    try:
        kwargs = {f: getattr(engine_args, f) for f in engine_args.__dataclass_fields__ if f != "model"}
        app = serve_app(engine_args.model, num_replicas=replicas, num_gpus_per_replica=gpus_per_replica,
                        num_cpus_per_replica=cpus_per_replica, config=config, **kwargs)
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name="tokenpool", route_prefix="/", blocking=False)
        logger.info("Serving %s on http://%s:%d with %d Ray Serve replicas", engine_args.model or "the default model",
                    config.host, config.port, replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("Shutting down the Ray Serve replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
