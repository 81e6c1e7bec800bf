"""FastAPI app: translates OpenAI-compatible HTTP into engine calls, and engine events back into HTTP.

Nothing here owns a model or samples a token: the routes speak to the `Engine` interface (engine.py) of the models
the `ModelPool` serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from adaptserve.models import resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.engine import EngineError, Finished, Generation, SamplingParams, TextDelta
from adaptserve.serve.errors import APIError, add_error_handlers, engine_failure, invalid
from adaptserve.serve.finqa_answer import answer_finqa
from adaptserve.serve.guard import Guard, env_keys
from adaptserve.serve.metrics import Metrics, MetricsMiddleware
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    FinQARequest,
    FinQAResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from adaptserve.serve.ui_mount import LazyUI

log = logging.getLogger(__name__)
T = TypeVar("T")

API_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/finqa", "/health", "/metrics")


def sampling_params(req: SamplingFields, cap: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    if req.max_tokens is not None and req.max_tokens > cap:
        raise invalid(f"max_tokens must be at most {cap}", param="max_tokens")
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list() + extra_stops,
        seed=req.seed,
    )


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage_of(finish: Finished) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


async def stream_sse(
    generation: Generation, chunk: Callable[[str | None, str | None], dict], include_usage: bool
) -> AsyncIterator[str]:
    """Engine events -> OpenAI SSE lines; `chunk(text, finish_reason)` shapes one event for the endpoint."""
    try:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield sse(chunk(event.text, None))
            else:
                yield sse(chunk(None, event.finish_reason))
                if include_usage:  # OpenAI's closing chunk: no choices, just the usage
                    yield sse({**chunk(None, None), "choices": [], "usage": usage_of(event).model_dump()})
    except EngineError as err:  # headers are gone already: report in-band, as OpenAI does
        yield sse(engine_failure(err).body())
    yield sse("[DONE]")


async def unless_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` while watching the connection: a client that hangs up on a non-streamed request cancels its
    generation, as a streamed one does (which notices by itself), rather than leaving it to run for nobody."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it is done; else its generation is cancelled with it
    if task not in done:  # nobody reads this answer, but the access log and /metrics show why it ended
        raise APIError(499, "the client closed the connection", "invalid_request_error", "client_closed")
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client goes: after the body, the next message on a connection is its disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    config.validate()  # before any model loads: the CLI turns its error into one line and exit 2
    metrics = Metrics()
    pool = ModelPool([resolve(ref) for ref in config.models], config, metrics)
    ui = LazyUI(pool) if config.ui else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.load()
        log.info("serving %s on http://%s:%d", pool.names, config.host, config.port)
        yield
        if ui is not None:
            await ui.close()
        pool.close()

    app = FastAPI(
        title="adaptserve",
        version="0.1.0",
        lifespan=lifespan,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)},
    )
    app.state.pool, app.state.config, app.state.metrics = pool, config, metrics
    keys = [*config.api_keys, *env_keys()]
    # Outermost last: CORS answers preflights (which carry no key) and labels refusals; metrics count refusals.
    app.add_middleware(Guard, keys=keys, max_body_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=API_ROUTES)
    if pool.backend == "transformers":  # only its engine attaches adapters without merging them
        from adaptserve.serve.admin import admin_router

        app.include_router(admin_router(pool, [Path(d) for d in config.adapter_dir]))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if keys and config.ui:
        log.warning("API keys guard /v1 and /admin, but not the UI at /ui: pass --no-ui where the port is exposed")

    add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/" if config.ui else "/docs")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": pool.names, "engines": {n: e.describe() for n, e in pool.engines.items()}}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        now = int(time.time())
        return ModelList(data=[ModelCard(id=s.name, created=now, description=s.description) for s in pool.specs])

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest, request: Request) -> Response | CompletionResponse:
        engine = pool.get(req.model)
        generation = pool.start(engine, engine.tokenize(req.prompt_text()), sampling_params(req, config.max_tokens_cap))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict:
            choice = CompletionChoice(text=text or "", finish_reason=finish)
            return CompletionResponse(id=rid, created=now, model=engine.name, choices=[choice]).model_dump(exclude_none=True)

        if req.stream:
            return StreamingResponse(stream_sse(generation, chunk, req.wants_usage()), media_type="text/event-stream")
        done = await unless_gone(request, generation.collect())
        return CompletionResponse(
            id=rid,
            created=now,
            model=engine.name,
            usage=usage_of(done.finish),
            choices=[CompletionChoice(text=done.text, finish_reason=done.finish.finish_reason)],
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        engine = pool.get(req.model)
        try:
            prompt = engine.chat_prompt(req.message_dicts())
        except ValueError as err:  # the template itself rejected the conversation (e.g. roles out of order)
            raise invalid(f"chat template rejected the messages: {err}", param="messages") from None
        generation = pool.start(engine, prompt, sampling_params(req, config.max_tokens_cap, engine.chat_stops()))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = True

        def chunk(text: str | None, finish: str | None) -> dict:
            nonlocal first
            delta = ChatDelta(role="assistant" if first else None, content=text)
            first = False
            return ChatCompletionChunk(
                id=rid, created=now, model=engine.name, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]
            ).model_dump(exclude_none=True)

        if req.stream:
            return StreamingResponse(stream_sse(generation, chunk, req.wants_usage()), media_type="text/event-stream")
        done = await unless_gone(request, generation.collect())
        return ChatCompletionResponse(
            id=rid,
            created=now,
            model=engine.name,
            usage=usage_of(done.finish),
            choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish.finish_reason)],
        )

    @app.post("/v1/finqa", response_model=FinQAResponse)
    async def finqa_answer(req: FinQARequest, request: Request) -> FinQAResponse:
        engine = pool.get(req.model)
        return await unless_gone(request, answer_finqa(pool, engine, req))

    if ui is not None:
        app.mount("/ui", ui)
    return app
