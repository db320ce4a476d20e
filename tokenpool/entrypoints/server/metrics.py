"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from tokenpool.engine.tickets import StepStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)
_BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServerMetrics:
    """Counters and histograms the middleware, the routes and the engine thread update."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series (process-wide setting of prometheus_client)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tokenpool_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("tokenpool_http_request_duration_seconds", "Time from request to response.",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tokenpool_http_requests_in_flight", "Requests being served now.", registry=r)
        self.prompt_tokens = Counter("tokenpool_prompt_tokens", "Prompt tokens processed.", ["route"], registry=r)
        self.prompts = Counter("tokenpool_prompts", "Prompts (inputs) processed, by task.", ["task"], registry=r)
        self.queue_depth = Gauge("tokenpool_queue_depth", "Prompts waiting for or in the engine.", registry=r)
        self.batch_requests = Histogram("tokenpool_batch_size_requests", "Prompts per engine step.",
                                        buckets=_BATCH_REQUEST_BUCKETS, registry=r)
        self.batch_tokens = Histogram("tokenpool_batch_size_tokens", "Tokens per engine step.",
                                      buckets=_BATCH_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("tokenpool_engine_step_duration_seconds", "Wall time of one engine step.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.aborted = Gauge("tokenpool_aborted_prompts", "Prompts dropped before running because their client "
                             "disconnected (since start).", registry=r)
        self.engine_healthy = Gauge("tokenpool_engine_healthy", "1 while the engine loop is alive.", registry=r)
        # vLLM's names, which load-aware routers (e.g. the Gateway API inference extension) read
        self.vllm_running = Gauge("vllm:num_requests_running", "Prompts in the engine core (vLLM's name).",
                                  ["model_name"], registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Prompts queued for the engine core (vLLM's name).",
                                  ["model_name"], registry=r)

    def bind_engine(self, num_waiting: Callable[[], int], healthy: Callable[[], bool],
                    aborted: Callable[[], int], running: Callable[[], int] | None = None,
                    queued: Callable[[], int] | None = None, model_name: str = "") -> None:
        """Gauges read from the engine when scraped."""
        self.queue_depth.set_function(num_waiting)
        if running is not None and queued is not None:
            self.vllm_running.labels(model_name=model_name).set_function(running)
            self.vllm_waiting.labels(model_name=model_name).set_function(queued)
        self.engine_healthy.set_function(lambda: 1.0 if healthy() else 0.0)
        self.aborted.set_function(aborted)

    def on_step(self, stats: StepStats) -> None:
        """Engine-thread hook: one observation per step."""
        self.batch_requests.observe(stats.num_requests)
        self.batch_tokens.observe(stats.num_tokens)
        self.step_seconds.observe(stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
