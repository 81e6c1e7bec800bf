"""FastAPI app: the routes, middleware and lifespan. The OpenAI endpoints' work is in serving.py, FinQA's in
finqa_answer.py; both speak to the `Engine` interface (engine.py) of the models the `ModelPool` serves."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse, Response

from adaptserve.models import resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.errors import APIError, add_error_handlers, invalid
from adaptserve.serve.finqa_answer import answer_finqa
from adaptserve.serve.guard import Guard, all_keys
from adaptserve.serve.metrics import Metrics, MetricsMiddleware
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    FinQARequest,
    FinQAResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from adaptserve.serve.serving import chat, complete, unless_gone
from adaptserve.serve.ui_mount import LazyUI

log = logging.getLogger(__name__)

API_ROUTES = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/finqa",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
)


def create_app(config: ServeConfig | None = None, replica: bool = False) -> FastAPI:
    """The server's app; `replica`: one of several behind Ray Serve (ray_app), which places the models itself."""
    config = config or ServeConfig()
    config.validate()  # before any model loads: the CLI turns its error into one line and exit 2
    metrics = Metrics()
    pool = ModelPool([resolve(ref) for ref in config.models], config, metrics)
    keys = all_keys(config.api_keys)
    ui = LazyUI(pool.names, keys) if config.ui else None

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
    # Outermost last: CORS answers preflights (which carry no key) and labels refusals; metrics count refusals.
    app.add_middleware(Guard, keys=keys, max_body_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=API_ROUTES)
    if replica:  # an adapter loaded at runtime would live on this replica alone, which Ray's routing cannot know

        @app.api_route("/admin/{path:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
        async def admin_on_cluster(path: str) -> None:
            message = "runtime adapter loading is off on a Ray Serve cluster: name adapters in --models instead"
            raise APIError(400, message, "invalid_request_error", "unsupported_on_cluster")

    elif pool.backend == "transformers":  # only its engine attaches adapters without merging them
        from adaptserve.serve.admin import admin_router

        app.include_router(admin_router(pool, [Path(d) for d in config.adapter_dir]))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if keys and config.ui:
        log.warning(
            "API keys guard /v1 and /admin; the UI at /ui is open and uses the first key: pass --no-ui where the port is exposed"
        )

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

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def retrieve_model(model: str) -> ModelCard:
        spec = pool.spec(model)
        return ModelCard(id=spec.name, created=int(time.time()), description=spec.description)

    # The tokenizer routes of vLLM's server, which evaluation harnesses (lm_eval's remote tokenizer) look for.
    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        engine = pool.get(req.model)
        tokens = engine.tokenize(req.prompt, add_bos=req.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.n_ctx)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        engine = pool.get(req.model)
        if any(not 0 <= t < engine.n_vocab for t in req.tokens):
            raise invalid(f"token ids must lie in [0, {engine.n_vocab})", param="tokens")
        return DetokenizeResponse(prompt=engine.detokenize(req.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        return pool.get(model).tokenizer_info()

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest, request: Request) -> Response | CompletionResponse:
        return await complete(pool, req, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        return await chat(pool, req, request)

    @app.post("/v1/finqa", response_model=FinQAResponse)
    async def finqa_answer(req: FinQARequest, request: Request) -> FinQAResponse:
        engine = pool.get(req.model)
        return await unless_gone(request, answer_finqa(pool, engine, req))

    if ui is not None:
        app.mount("/ui", ui)
    return app
