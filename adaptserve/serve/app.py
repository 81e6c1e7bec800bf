"""FastAPI app: translates OpenAI-compatible HTTP into engine calls, and engine events back into HTTP.

Nothing here owns a model or samples a token; see `engine.py` for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from adaptserve import finqa
from adaptserve.models import ModelSpec, default_models, resolve
from adaptserve.serve.engine import (
    DEFAULT_CTX,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_SLOTS,
    EngineBusy,
    EngineError,
    Finished,
    Generation,
    InvalidPrompt,
    LlamaCppEngine,
    PromptTooLong,
    SamplingParams,
    TextDelta,
    TimedOut,
)
from adaptserve.serve.guard import Guard, env_keys
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs
from adaptserve.serve.metrics import Metrics, MetricsMiddleware
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

if TYPE_CHECKING:
    from adaptserve.serve.hf_engine import HFBase, HFEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKENDS = ("auto", "llama.cpp", "transformers")
API_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/finqa", "/health", "/metrics")


@dataclass
class ServeConfig:
    """Everything `adaptserve serve` takes; `create_app(ServeConfig(...))` is the same thing from Python."""

    models: list[str] = field(default_factory=default_models)
    host: str = "127.0.0.1"
    port: int = 8000
    n_ctx: int = DEFAULT_CTX  # context window of each slot (prompt + completion)
    n_threads: int | None = None  # None: one per physical core (llama_thread.n_threads)
    max_tokens_cap: int = 2048
    queue_size: int = 64  # requests that may wait per model while all its slots are busy
    n_slots: int = DEFAULT_SLOTS  # requests per model decoded together (continuous batching)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per decode step beside the running sequences
    kv_cache: str = field(
        default=DEFAULT_KV_CACHE,
        metadata={
            "help": "how the llama.cpp backend stores each slot's K/V: q8_0, or f16 at twice the memory (both models' "
            "caches 190 -> 360 MiB at the default slots) for ~39%% faster prompt processing"
        },
    )
    ui: bool = True
    adapter_quant: str = field(
        default="q4_k_m",
        metadata={
            "help": "how llama.cpp serves an adapter: merged into its base and quantized to f16, q8_0 or q4_k_m "
            "(once, then cached), or lora: its LoRA GGUF applied to the base's GGUF at load time (no merge; a "
            "request's output then depends on what it is batched with). One adapter can pick its own with a "
            "suffix: name@q8_0"
        },
    )
    backend: str = "auto"  # auto: transformers (4-bit NF4, adapters unmerged) with CUDA, llama.cpp without
    adapter_dir: list[str] = field(default_factory=list)  # where POST /admin/adapters may load adapters from
    precision: str = "auto"  # transformers backend: nf4, bf16 or fp32; auto: nf4 on CUDA, bf16 or fp32 on CPU
    api_keys: list[str] = field(
        default_factory=list,
        repr=False,  # never in a log line or a traceback
        metadata={
            "flag": "--api-key",
            "help": "require 'Authorization: Bearer KEY' on /v1/* and /admin/*; repeat for several keys, or set "
            "$ADAPTSERVE_API_KEYS (comma-separated). /health, /metrics and the /ui are not behind it",
        },
    )
    cors_origins: list[str] = field(
        default_factory=list,
        metadata={"flag": "--cors-origin", "help": "a browser origin allowed to call the API (CORS); repeatable"},
    )
    max_body_bytes: int = 1 << 20  # larger request bodies get a 413 before they are read
    request_timeout: float = 300.0  # seconds from queueing to the last token; past it it is cancelled (0: no limit)
    shutdown_timeout: float = 10.0  # seconds running requests get to finish after SIGTERM; then they fail cleanly


def pick_backend(choice: str) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "transformers" and not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        raise ValueError("backend transformers needs torch, transformers and peft: pip install 'adaptserve[train]'")
    if choice != "auto":
        return choice
    return "transformers" if _has_cuda() else "llama.cpp"


def _has_cuda() -> bool:
    if not Path("/proc/driver/nvidia/version").exists():  # no NVIDIA driver: spares importing torch (seconds)
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, code: str = "invalid_value", param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def overloaded(err: EngineBusy) -> APIError:
    """A full queue, or a server shutting down: not the client's fault, and worth retrying."""
    return APIError(503, f"{err}; retry shortly", "server_error", "overloaded", headers={"Retry-After": "1"})


def engine_failure(err: EngineError) -> APIError:
    if isinstance(err, EngineBusy):  # shutting down while the request waited or ran
        return overloaded(err)
    if isinstance(err, TimedOut):
        return APIError(504, str(err), "server_error", "timeout")
    return APIError(500, str(err), "server_error")


class ModelPool:
    """The served models by id. Requests can only name these: no path from a request reaches the filesystem."""

    def __init__(self, specs: list[ModelSpec], config: ServeConfig, metrics: Metrics) -> None:
        self.specs, self.config, self.metrics = specs, config, metrics
        self.backend = pick_backend(config.backend)
        kv_cache_kwargs(config.kv_cache)  # a bad name fails here, before any model loads
        self.engines: dict[str, LlamaCppEngine | HFEngine] = {}
        self.finqa_styles: dict[str, finqa.PromptStyle] = {}
        self.bases: dict[str, HFBase] = {}  # transformers backend: one loaded base per base location

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def adapter_names(self) -> list[str]:
        """Served names that are LoRA adapters on a shared transformers base (loadable and unloadable)."""
        return [name for name, engine in self.engines.items() if getattr(engine, "adapter", None) is not None]

    def load(self) -> None:
        if self.backend == "transformers":
            for spec in self.specs:
                self._load_hf(spec)
            return
        for spec in self.specs:
            engine = LlamaCppEngine(
                self._runnable(spec),
                self.config.n_ctx,
                self.config.n_threads,
                self.config.queue_size,
                n_slots=self.config.n_slots,
                prefill_chunk=self.config.prefill_chunk,
                kv_cache=self.config.kv_cache,
            )
            self.engines[spec.name] = engine
            self.metrics.watch_engine(spec.name, engine)

    def _runnable(self, spec: ModelSpec) -> ModelSpec:
        """An adapter is served on its base's GGUF as a LoRA GGUF, or merged into it (see export.served)."""
        if spec.format != "adapter":
            return spec
        from adaptserve.export import served

        self.finqa_styles[spec.name] = finqa.adapter_style(spec.path)
        return served(spec, self.config.adapter_quant, self.config.n_threads)

    def _load_hf(self, spec: ModelSpec) -> None:
        """A base, or an adapter on the base it records: N adapters of a base cost that base once in memory."""
        from adaptserve.serve.hf_engine import recorded_base

        if spec.format != "adapter":
            self._serve_hf(self._hf_base(spec), spec, None)
            return
        base = self._hf_base(resolve(recorded_base(spec.path)))
        base.load_adapter(spec.name, spec.path)
        self._serve_hf(base, spec, spec.name)

    def _serve_hf(self, base: HFBase, spec: ModelSpec, adapter: str | None) -> None:
        from adaptserve.serve.hf_engine import HFEngine

        if adapter is not None:
            self.finqa_styles[spec.name] = finqa.adapter_style(spec.path)
        self.engines[spec.name] = HFEngine(base, spec, adapter)
        self.metrics.watch_engine(spec.name, self.engines[spec.name])

    def _hf_base(self, spec: ModelSpec) -> HFBase:
        from adaptserve.serve.hf_engine import HFBase

        if spec.location not in self.bases:
            c = self.config
            self.bases[spec.location] = HFBase(spec, c.n_ctx, c.queue_size, c.n_slots, c.n_threads, precision=c.precision)
        return self.bases[spec.location]

    def add_adapter(self, name: str, path: Path) -> None:
        """Serve the adapter at `path` as `name`, on the loaded base it was trained for (runtime loading)."""
        from adaptserve.serve.hf_engine import AdapterError

        if self.backend != "transformers":
            raise AdapterError("adapters load at runtime only on the transformers backend (serve --backend transformers)")
        base = self._base_for(path)
        spec = ModelSpec(name, "adapter", str(path), f"PEFT adapter {path.name}, loaded at runtime")
        base.load_adapter(name, path)
        self._serve_hf(base, spec, name)
        self.specs.append(spec)

    def _base_for(self, path: Path) -> HFBase:
        """The one loaded base, or the one the adapter records; check_adapter then compares shapes."""
        from adaptserve.serve.hf_engine import AdapterError, recorded_base

        if len(self.bases) == 1:
            return next(iter(self.bases.values()))
        recorded = recorded_base(path)
        for base in self.bases.values():
            if recorded in (base.spec.name, base.spec.location):
                return base
        raise AdapterError(f"adapter {path.name} records base {recorded!r}, which this server does not serve")

    def remove_adapter(self, name: str) -> None:
        engine = self.engines.pop(name)
        self.specs = [s for s in self.specs if s.name != name]
        self.finqa_styles.pop(name, None)
        self.metrics.unwatch_engine(name)
        engine.base.unload_adapter(name)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()

    def start(self, engine: LlamaCppEngine | HFEngine, prompt: list[int], params: SamplingParams) -> Generation:
        """Submit with the server's error mapping: a too-long prompt is the client's fault, a full queue is not."""
        if params.max_tokens is None:  # "up to the end of the context", but never past the server's cap
            room = max(engine.n_ctx - len(prompt), 0)  # 0 lets budget() raise the context error
            params = dataclasses.replace(params, max_tokens=min(room, self.config.max_tokens_cap) or None)
        try:
            # /metrics counts every finished generation, whoever asked for it (HTTP or UI)
            return engine.submit(
                prompt, params, lambda f: self.metrics.record_generation(engine.name, f), self.config.request_timeout
            )
        except PromptTooLong as err:
            raise invalid(str(err), "context_length_exceeded", "messages") from None
        except InvalidPrompt as err:
            raise invalid(str(err), param="prompt") from None
        except EngineBusy as err:
            raise overloaded(err) from None

    def drain(self, timeout: float) -> None:
        for engine in self.engines.values():
            engine.drain(timeout)

    def finqa_style(self, name: str) -> finqa.PromptStyle:
        return self.finqa_styles.get(name, finqa.BASE_STYLE)

    def get(self, name: str | None) -> LlamaCppEngine | HFEngine:
        name = name or self.names[0]
        if name not in self.engines:
            raise APIError(
                404,
                f"model {name!r} does not exist; served models: {self.names}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return self.engines[name]


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

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        message = (
            "request body is not valid JSON" if code == "invalid_json" else f"{loc or 'body'}: {first.get('msg', 'invalid')}"
        )
        return invalid(message, code, loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = "request_too_large" if err.status_code == 413 else None
        return APIError(err.status_code, str(err.detail), kind, code, headers=dict(err.headers or {})).response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, err: EngineError) -> JSONResponse:
        return engine_failure(err).response()

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/" if config.ui else "/docs")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": pool.names}

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


class LazyUI:
    """The Gradio UI at /ui, imported and built at its first request: gradio takes ~2.5 s to import and ~45 MiB
    (benchmarks/results/footprint) that a server only ever used through its API would pay for nothing."""

    def __init__(self, pool: ModelPool) -> None:
        self._pool = pool
        self._app: ASGIApp | None = None
        self._building = asyncio.Lock()
        self._running = contextlib.AsyncExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            async with self._building:
                if self._app is None:
                    self._app = await self._start(scope["app"])
        await self._app(scope, receive, send)

    async def _start(self, parent: FastAPI) -> ASGIApp:
        log.info("starting the UI at /ui")
        # The import runs off the event loop, so that streams in flight do not stall for it.
        ui = await asyncio.to_thread(importlib.import_module, "adaptserve.serve.ui")
        app = ui.gradio_app(parent, self._pool)
        await self._running.enter_async_context(ui.running(app))
        return app

    async def close(self) -> None:
        await self._running.aclose()


def as_sentences(text: list[str] | str) -> list[str]:
    return [text] if isinstance(text, str) else text


async def answer_finqa(pool: ModelPool, engine: LlamaCppEngine | HFEngine, req: FinQARequest) -> FinQAResponse:
    """The model writes a FinQA program for the question; the server executes it, so arithmetic is exact."""
    prompt_parts = finqa.task_prompt(
        req.question,
        req.table,
        as_sentences(req.pre_text),
        as_sentences(req.post_text),
        pool.finqa_style(engine.name),
        chat=engine.has_chat_template,
    )
    prompt = engine.chat_prompt(prompt_parts) if isinstance(prompt_parts, list) else engine.tokenize(prompt_parts)
    # Greedy and one line: the program is the whole answer, and sampling only adds wrong digits.
    generation = pool.start(engine, prompt, SamplingParams(max_tokens=req.max_tokens, temperature=0.0, stop=("\n",)))
    raw = (await generation.collect()).text
    program = finqa.extract_program(raw)
    if program is None:
        return FinQAResponse(answer=None, program=None, raw=raw, model=engine.name, error="no program found in the model output")
    try:
        answer = finqa.execute_program(program, req.table)
    except finqa.ProgramError as err:
        return FinQAResponse(answer=None, program=program, raw=raw, model=engine.name, error=f"program did not execute: {err}")
    return FinQAResponse(answer=answer, program=program, raw=raw, model=engine.name)
