"""Prometheus metrics: one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adaptserve.serve.engine import Finished

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adaptserve_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "adaptserve_request_seconds",
            "HTTP request latency, to the last byte (streams included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "adaptserve_tokens", "Tokens processed by model and kind", ["model", "kind"], registry=self.registry
        )
        self.ttft = Histogram(
            "adaptserve_time_to_first_token_seconds",
            "From the engine taking a request to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("adaptserve_queue_depth", "Requests waiting per model", ["model"], registry=self.registry)

        self.engines = _EngineCounters()
        self.registry.register(self.engines)

    def watch_engine(self, model: str, engine: EngineStats) -> None:
        self.queue_depth.labels(model).set_function(lambda: engine.queue_depth)
        self.engines.watched[model] = engine

    def unwatch_engine(self, model: str) -> None:
        self.queue_depth.remove(model)
        del self.engines.watched[model]

    def record_generation(self, model: str, finished: Finished) -> None:
        self.tokens.labels(model, "prompt").inc(finished.prompt_tokens)
        self.tokens.labels(model, "completion").inc(finished.completion_tokens)
        if finished.time_to_first_token is not None:
            self.ttft.labels(model).observe(finished.time_to_first_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineStats(Protocol):
    queue_depth: int
    tokens_generated: int
    requests_cancelled: int
    n_slots: int
    slots_busy: int
    prompt_tokens: int  # prompt tokens of the requests admitted into a slot
    cached_prompt_tokens: int  # those of them found in the prefix cache, not computed again


ENGINE_METRICS: list[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, Callable[[EngineStats], float]]] = [
    (CounterMetricFamily, "adaptserve_engine_generated_tokens", "Tokens the engine decoded", lambda e: e.tokens_generated),
    (
        CounterMetricFamily,
        "adaptserve_engine_cancelled_requests",
        "Requests dropped because their client left",
        lambda e: e.requests_cancelled,
    ),
    (
        CounterMetricFamily,
        "adaptserve_engine_prompt_tokens",
        "Prompt tokens of the requests admitted into a slot",
        lambda e: e.prompt_tokens,
    ),
    (
        CounterMetricFamily,
        "adaptserve_engine_prefix_cache_hit_tokens",
        "Prompt tokens reused from the prefix cache instead of computed",
        lambda e: e.cached_prompt_tokens,
    ),
    (
        GaugeMetricFamily,
        "adaptserve_engine_prefix_cache_hit_ratio",
        "Prefix cache hit tokens / prompt tokens since start",
        lambda e: e.cached_prompt_tokens / max(e.prompt_tokens, 1),
    ),
    (GaugeMetricFamily, "adaptserve_engine_slots", "Sequences the engine decodes together", lambda e: e.n_slots),
    (GaugeMetricFamily, "adaptserve_engine_slots_busy", "Slots running a request", lambda e: e.slots_busy),
]


class _EngineCounters(Collector):
    """Counters and gauges the engine worker keeps itself, so generations nobody waits for any more are counted too."""

    def __init__(self) -> None:
        self.watched: dict[str, EngineStats] = {}

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        families = []
        for kind, name, documentation, value in ENGINE_METRICS:
            family = kind(name, documentation, labels=["model"])
            for model, engine in self.watched.items():
                family.add_metric([model], value(engine))
            families.append(family)
        return families


PREFIXES = {"/v1/models/": "/v1/models/{model}", "/ui": "/ui"}  # paths under these get one label each


class MetricsMiddleware:
    """Counts every request and times it to its last body byte, which for SSE is the end of the stream.

    Routes outside `routes` are labelled "other" so random paths cannot blow up label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else next((v for k, v in PREFIXES.items() if path.startswith(k)), "other")
        started, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
