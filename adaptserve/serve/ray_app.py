"""The server as Ray Serve deployments: `Ingress` reads each request's model id and hands the raw HTTP request to a
`ModelReplica` holding that model (Ray Serve model multiplexing); the replica runs the same app as `adaptserve
serve` (create_app) and streams its ASGI messages back.

Ray's HTTP proxy routes by a header only, so the model id in an OpenAI body needs this one hop to become a
multiplexed model id. The ingress also retries a request whose replica died before it answered, and ends a stream
cut by one with an error event, so a client sees a 2xx, a 503 with Retry-After, or an in-band error, never a hang.

    serve run deploy/serve.yaml                         # a Ray Serve config file: import_path app_builder
    serve.run(build(ServeConfig(models=[...])))         # Python
    adaptserve serve --ray [ADDRESS] --replicas 2       # the CLI (run)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from prometheus_client import Counter, Gauge
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import Message, Receive, Scope, Send

from adaptserve.models import resolve
from adaptserve.serve import asgi
from adaptserve.serve.app import create_app
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.errors import APIError
from adaptserve.serve.guard import all_keys
from adaptserve.serve.serving import sse
from adaptserve.serve.ui_mount import LazyUI

log = logging.getLogger(__name__)

APP = "adaptserve"
REPLICA_HEADER = b"x-adaptserve-replica"
RETRY_FOR_S = 15.0  # how long the ingress retries a request on other replicas before answering 503
SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "headers",
    "client",
    "server",
)


def unavailable(message: str) -> APIError:
    return APIError(503, f"{message}; retry shortly", "server_error", "replica_unavailable", headers={"Retry-After": "1"})


class _Held:
    """A model a replica holds for Ray's multiplexer, which calls __del__ to evict it (least recently used)."""

    def __init__(self, replica: ModelReplica, name: str) -> None:
        self.replica: ModelReplica | None = replica
        self.name = name

    def __del__(self) -> None:
        if self.replica is not None:  # Ray calls it on eviction, the garbage collector again later
            self.replica, replica = None, self.replica
            replica.unload(self.name)


class ModelReplica:
    """The app of `adaptserve serve` (routes, middleware, errors, auth, limits, metrics) on one Ray Serve replica:
    the first model stays loaded, the others load on first use, up to `max_models_per_replica` of them."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = dataclasses.replace(config, ui=False)  # the ingress serves the UI (see Ingress)
        self.app = create_app(self.config, replica=True)
        self.pool = self.app.state.pool
        self.id = serve.get_replica_context().replica_id.unique_id
        registry = self.app.state.metrics.registry
        self.answered = Counter(
            "adaptserve_replica_requests", "Requests by replica and model", ["replica", "model"], registry=registry
        )
        self.held = Gauge("adaptserve_replica_models", "Models a replica holds loaded", ["replica", "model"], registry=registry)
        if self.pool.backend == "llama.cpp":
            self.pool.load_one(self.pool.names[0])
        else:  # transformers: adapters share the loaded base, so all load
            self.pool.load()
        for name in self.pool.engines:
            self.held.labels(self.id, name).set(1)
        self.model = self._multiplexed(config.max_models_per_replica)
        self.busy: Tally[str] = Tally()  # requests in flight per loaded model: eviction waits for them
        log.info("replica %s serving %s", self.id, list(self.pool.engines))

    def _multiplexed(self, most: int) -> Callable[[str], Awaitable[_Held]]:
        @serve.multiplexed(max_num_models_per_replica=most)
        async def load(name: str) -> _Held:
            await asyncio.to_thread(self.pool.load_one, name)
            self.held.labels(self.id, name).set(1)
            return _Held(self, name)

        return load

    def unload(self, name: str) -> None:
        """Evict `name` once its requests are done, or after --shutdown-timeout (they then fail cleanly)."""
        if self.pool.backend != "llama.cpp":
            return
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.busy[name] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pool.unload(name, max(deadline - time.monotonic(), 0.0))
        self.held.remove(self.id, name)

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[list[Message]]:
        """Run one HTTP request through the app; yield its ASGI messages in batches of what is ready, the response
        start (with the replica's header) held back to travel with the first body bytes."""
        model = serve.get_multiplexed_model_id()
        if model:
            await self.model(model)
        self.busy[model] += 1  # in the same event-loop step as the load returned: no eviction in between
        self.answered.labels(self.id, model or self.pool.names[0]).inc()
        held: list[Message] = []
        try:  # the client leaving (Ray cancels this generator) closes the call: the app sees a disconnect
            async with contextlib.aclosing(asgi.call(self.app, request["scope"], request["body"])) as batches:
                async for batch in batches:
                    if batch[0]["type"] == "http.response.start":
                        start = batch[0]
                        batch[0] = {**start, "headers": [*start.get("headers", []), (REPLICA_HEADER, self.id.encode())]}
                    held, batch = [], [*held, *batch]
                    if len(batch) == 1 and batch[0]["type"] == "http.response.start":
                        held = batch
                        continue
                    yield batch
            if held:
                yield held
        finally:
            self.busy[model] -= 1

    async def __del__(self) -> None:
        """Ray stops a replica after its requests finished or `graceful_shutdown_timeout_s` passed: the rest fail
        cleanly (an error event for a stream), as on the single server's SIGTERM."""
        await asyncio.to_thread(self.pool.drain, 0.0)
        await asyncio.sleep(0.5)  # the failed requests' last events leave
        await asyncio.to_thread(self.pool.close)


class Ingress:
    """Raw HTTP in, the `ModelReplica` holding the request's model out, with retries while replicas come and go.

    The ingress also serves the UI at /ui: Gradio's session spans requests, which the one ingress replica sees all
    of, and the UI calls the API through this same routing, as any client does."""

    def __init__(self, config: ServeConfig, replicas: DeploymentHandle) -> None:
        self.replicas = replicas.options(stream=True)
        self.names = [resolve(ref).name for ref in config.models]
        self.max_body = config.max_body_bytes
        self.timeout = config.request_timeout + 30 if config.request_timeout else None  # the replica answers first
        self.ui = self._ui(config) if config.ui else None

    def _ui(self, config: ServeConfig) -> FastAPI:
        app = FastAPI(openapi_url=None)
        app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
        app.mount("/ui", LazyUI(self.names, all_keys(config.api_keys), api=self.asgi))
        return app

    def __serve_build_asgi_app__(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:  # a function: uvicorn takes it for ASGI 3
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.ui is not None and (scope["path"] in ("/", "/ui") or scope["path"].startswith("/ui/")):
            await self.ui(scope, receive, send)
            return
        body = await self._body(receive)
        model = self._model(scope, body)
        request = {"scope": {k: scope[k] for k in SCOPE_KEYS if k in scope} | {"root_path": ""}, "body": body}
        stream, first = await self._first(request, model)
        if stream is None:
            await unavailable("no replica could take the request").response()(scope, receive, send)
            return
        pump = asyncio.create_task(self._pump(stream, first, send))
        left = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({pump, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not pump.done():  # the client left: the replica cancels the request
                pump.cancel()
                stream.cancel()

    async def _body(self, receive: Receive) -> bytes:
        """The body, up to one byte past the limit: the replica's guard then answers 413."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _model(self, scope: Scope, body: bytes) -> str:
        """The multiplexed model id: the model a body or query names, unless it is the resident base or unknown."""
        name = None
        if body[:1] == b"{":
            try:
                name = json.loads(body).get("model")
            except (ValueError, AttributeError):  # the replica answers what is wrong with it
                pass
        for key, _, value in (p.partition(b"=") for p in scope.get("query_string", b"").split(b"&")):
            if key == b"model":
                name = value.decode(errors="replace")
        return name if isinstance(name, str) and name in self.names[1:] else ""

    async def _first(self, request: dict[str, Any], model: str) -> tuple[Any, list[Message]]:
        """The replica's stream and its first messages, retried on another replica until one answers."""
        deadline, pause = time.monotonic() + RETRY_FOR_S, 0.1
        while True:
            stream = self.replicas.options(multiplexed_model_id=model).handle.remote(request)
            try:
                return stream, await asyncio.wait_for(stream.__anext__(), self.timeout)
            except Exception as err:  # a replica died or was not there yet; a wedged one timed out
                stream.cancel()
                if time.monotonic() + pause > deadline:
                    log.error("giving up on a request after %.0f s: %s", RETRY_FOR_S, err)
                    return None, []
                log.warning("retrying a request on another replica: %s", type(err).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _pump(self, stream: Any, first: list[Message], send: Send) -> None:
        event_stream, done = False, False
        try:
            batch: list[Message] | None = first
            while batch is not None:
                for message in batch:
                    if message["type"] == "http.response.start":
                        event_stream = any(
                            k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"]
                        )
                    await send(message)
                    done = message["type"] == "http.response.body" and not message.get("more_body", False)
                batch = await anext(stream, None)
        except Exception as err:  # the replica died mid-response: end it, in-band for a stream
            if done:
                return
            log.warning("a replica failed mid-response: %s", type(err).__name__)
            tail = sse(unavailable("the replica serving this request failed").body()) + sse("[DONE]") if event_stream else ""
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        kind = message["type"].rpartition(".")[2]  # lifespan.startup / lifespan.shutdown
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def build(config: ServeConfig) -> serve.Application:
    """The Ray Serve application for `config`: an ingress in front of the model replicas (fixed or autoscaled)."""
    config.validate()
    scale: dict[str, Any] = {"num_replicas": config.replicas}
    if config.max_replicas is not None:
        low = config.min_replicas if config.min_replicas is not None else 1
        scale = {
            "autoscaling_config": {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        }
    replicas = serve.deployment(ModelReplica).options(
        name="ModelReplica",
        ray_actor_options={"num_cpus": config.n_threads or 1},
        max_ongoing_requests=config.n_slots + config.queue_size,  # past it the engine's queue answers 503, as alone
        graceful_shutdown_timeout_s=config.shutdown_timeout,
        logging_config={"enable_access_log": False},  # the ingress logs each request once
        **scale,
    )
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    return ingress.bind(config, replicas.bind(config))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: adaptserve.serve.ray_app:app_builder` in a Serve config file; `args` are ServeConfig fields."""
    return build(ServeConfig(**args))


def run(config: ServeConfig) -> None:
    """`adaptserve serve --ray`: deploy on the cluster (a new local one for "local") and serve until SIGINT/SIGTERM,
    then stop the replicas, whose in-flight requests get --shutdown-timeout to finish."""
    app = build(config)
    ray.init(address=config.ray, include_dashboard=False if config.ray == "local" else None)  # "local": always a new one
    # after ray.init, whose own SIGTERM handler exits at once: a signal during start-up still shuts down in order
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(app, name=APP, route_prefix="/")
    log.info("serving %s on http://%s:%d through Ray Serve", config.models, config.host, config.port)
    stop.wait()
    log.info("shutting down: in-flight requests have %g s to finish", config.shutdown_timeout)
    serve.delete(APP)
    if config.ray == "local":
        serve.shutdown()
        ray.shutdown()
