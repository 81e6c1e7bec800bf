"""OpenAI completions and chat completions: a request becomes engine generations (n per prompt, each with its own
seed), and their events become an OpenAI response or its SSE stream. Routes (app.py) call `complete` and `chat`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from adaptserve.serve.engine import Completion, Engine, EngineError, Finished, Generation, SamplingParams, TextDelta
from adaptserve.serve.errors import APIError, engine_failure, invalid
from adaptserve.serve.logprobs import chat_logprobs, completion_logprobs, mean_logprob
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
    SamplingFields,
    Usage,
)
from adaptserve.serve.structured import InvalidSchema, response_grammar

log = logging.getLogger(__name__)
T = TypeVar("T")


def sampling_params(
    req: SamplingFields, engine: Engine, cap: int, extra_stops: tuple[str, ...] = (), logprobs: int | None = None
) -> SamplingParams:
    """The request's sampling settings, checked against what this server and model allow."""
    limit = req.completion_limit()
    if limit is not None and limit > cap:
        param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        raise invalid(f"{param} must be at most {cap}", param=param)
    bias = req.logit_biases()
    if bias and bias[-1][0] >= engine.n_vocab:
        raise invalid(f"token id {bias[-1][0]} is outside {engine.name}'s vocabulary of {engine.n_vocab}", param="logit_bias")
    if req.user:
        log.info("request for user %r on %s", req.user, engine.name)
    try:
        grammar, field = response_grammar(req.response_format, req.grammar)
    except InvalidSchema as err:
        raise invalid(str(err), "invalid_schema", "response_format") from None
    if grammar is not None and (reason := engine.grammar_error(grammar)):
        raise invalid(reason, "invalid_grammar", field)
    return SamplingParams(
        max_tokens=limit,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list() + extra_stops,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=bias,
        logprobs=logprobs,
        grammar=grammar,
    )


def start_all(pool: ModelPool, engine: Engine, prompts: Sequence[list[int]], params: SamplingParams, n: int) -> list[Generation]:
    """n generations of each prompt, choice i seeded with seed + i; all are queued or none."""
    started: list[Generation] = []
    try:
        for prompt in prompts:
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                started.append(pool.start(engine, prompt, dataclasses.replace(params, seed=seed)))
    except APIError:
        for generation in started:
            generation.cancel()
        raise
    return started


async def collect_all(generations: Sequence[Generation]) -> list[Completion]:
    try:
        return list(await asyncio.gather(*(g.collect() for g in generations)))
    finally:  # one failed, or the client left: the others stop too
        for generation in generations:
            generation.cancel()


async def merged(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
    """The events of several generations as they come, each with its generation's index."""
    if len(generations) == 1:
        async for event in generations[0].events():
            yield 0, event
        return
    events: asyncio.Queue[tuple[int, TextDelta | Finished | EngineError]] = asyncio.Queue()

    async def pump(i: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                events.put_nowait((i, event))
        except EngineError as err:
            events.put_nowait((i, err))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            i, event = await events.get()
            if isinstance(event, EngineError):
                raise event
            running -= isinstance(event, Finished)
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage_of(prompts: Sequence[list[int]], finishes: Sequence[Finished]) -> Usage:
    prompt = sum(len(p) for p in prompts)
    completion = sum(f.completion_tokens for f in finishes)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def stream_sse(
    generations: Sequence[Generation],
    chunk: Callable[[int, TextDelta | None, str | None], dict],
    usage: Callable[[list[Finished]], dict] | None,
) -> AsyncIterator[str]:
    """Engine events -> OpenAI SSE lines; `chunk(choice, delta, finish_reason)` shapes one event for the endpoint,
    `usage` the closing usage chunk when the client asked for one."""
    finishes: list[Finished] = []
    try:
        async for i, event in merged(generations):
            if isinstance(event, TextDelta):
                yield sse(chunk(i, event, None))
            else:
                finishes.append(event)
                yield sse(chunk(i, None, event.finish_reason))
        if usage is not None:
            yield sse(usage(finishes))
    except EngineError as err:  # headers are gone already: report in-band, as OpenAI does
        yield sse(engine_failure(err).body())
    yield sse("[DONE]")


async def unless_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` while watching the connection: a client that hangs up on a non-streamed request cancels its
    generations, as a streamed one does (which notices by itself), rather than leaving them to run for nobody."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it is done; else its generations are cancelled with it
    if task not in done:  # nobody reads this answer, but the access log and /metrics show why it ended
        raise APIError(499, "the client closed the connection", "invalid_request_error", "client_closed")
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client goes: after the body, the next message on a connection is its disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Echo:
    """A completions choice's running state: the prompt text still to be echoed, and its text offset so far."""

    prompt: str
    offset: int = 0


def best(completions: list[Completion], per_prompt: int, n: int, echoed: Sequence[int]) -> list[Completion]:
    """best_of: of each prompt's `per_prompt` completions, the n whose tokens have the highest mean log-probability
    (`echoed[p]`: prompt p's log-probabilities at the front of its completions' lists, left out of the score)."""
    groups = [completions[i : i + per_prompt] for i in range(0, len(completions), per_prompt)]
    ranked = (sorted(g, key=lambda c: -mean_logprob(c.logprobs[skip:])) for g, skip in zip(groups, echoed, strict=True))
    return [c for group in ranked for c in group[:n]]


async def complete(pool: ModelPool, req: CompletionRequest, request: Request) -> StreamingResponse | CompletionResponse:
    engine, cap = pool.get(req.model), pool.config.max_tokens_cap
    prompts = [engine.tokenize(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    if any(not 0 <= t < engine.n_vocab for p in prompts for t in p):
        raise invalid(f"prompt token ids must lie in [0, {engine.n_vocab}) for {engine.name}", param="prompt")
    texts = [p if isinstance(p, str) else engine.detokenize(p) for p in req.prompts()] if req.echo else []
    per_prompt = max(req.n, req.best_of or 1)
    wants = req.logprobs if req.logprobs is not None else (0 if per_prompt > req.n else None)
    params = dataclasses.replace(
        sampling_params(req, engine, cap, logprobs=wants), echo=req.echo and wants is not None, end_logprob=True
    )
    generations = start_all(pool, engine, prompts, params, per_prompt)
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [_Echo(texts[i // per_prompt] if req.echo else "") for i in range(len(generations))]

    def chunk(i: int, delta: TextDelta | None, finish: str | None) -> dict:
        echo = echoes[i]
        text, echo.prompt = echo.prompt + (delta.text if delta else ""), ""
        logprobs = completion_logprobs(delta.logprobs, echo.offset) if delta and req.logprobs is not None else None
        echo.offset += len(text)
        choice = CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)
        return CompletionResponse(id=rid, created=now, model=engine.name, choices=[choice]).model_dump(exclude_none=True)

    def usage(finishes: list[Finished]) -> dict:
        body = CompletionResponse(id=rid, created=now, model=engine.name, choices=[], usage=usage_of(prompts, finishes))
        return body.model_dump(exclude_none=True)

    if req.stream:
        stream = stream_sse(generations, chunk, usage if req.wants_usage() else None)
        return StreamingResponse(stream, media_type="text/event-stream")
    done = await unless_gone(request, collect_all(generations))
    echoed = [len(p) if params.echo else 0 for p in prompts]
    kept = best(done, per_prompt, req.n, echoed) if per_prompt > req.n else done
    choices = [
        CompletionChoice(
            index=i,
            text=(echoes[i].prompt if req.echo else "") + c.text,
            logprobs=completion_logprobs(c.logprobs) if req.logprobs is not None else None,
            finish_reason=c.finish.finish_reason,
        )
        for i, c in enumerate(kept)
    ]
    usage_ = usage_of(prompts, [c.finish for c in done])
    return CompletionResponse(id=rid, created=now, model=engine.name, usage=usage_, choices=choices)


async def chat(pool: ModelPool, req: ChatCompletionRequest, request: Request) -> StreamingResponse | ChatCompletionResponse:
    engine, cap = pool.get(req.model), pool.config.max_tokens_cap
    try:
        prompt = engine.chat_prompt(req.message_dicts())
    except ValueError as err:  # the template itself rejected the conversation (e.g. roles out of order)
        raise invalid(f"chat template rejected the messages: {err}", param="messages") from None
    params = sampling_params(req, engine, cap, engine.chat_stops(), logprobs=req.logprobs_k())
    generations = start_all(pool, engine, [prompt], params, req.n)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    started = [False] * len(generations)

    def chunk(i: int, delta: TextDelta | None, finish: str | None) -> dict:
        role = None if started[i] else "assistant"
        started[i] = True
        logprobs = chat_logprobs(delta.logprobs) if delta and req.logprobs else None
        choice = ChatChunkChoice(
            index=i, delta=ChatDelta(role=role, content=delta.text if delta else None), logprobs=logprobs, finish_reason=finish
        )
        return ChatCompletionChunk(id=rid, created=now, model=engine.name, choices=[choice]).model_dump(exclude_none=True)

    def usage(finishes: list[Finished]) -> dict:
        body = ChatCompletionChunk(id=rid, created=now, model=engine.name, choices=[], usage=usage_of([prompt], finishes))
        return body.model_dump(exclude_none=True)

    if req.stream:
        stream = stream_sse(generations, chunk, usage if req.wants_usage() else None)
        return StreamingResponse(stream, media_type="text/event-stream")
    done = await unless_gone(request, collect_all(generations))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            logprobs=chat_logprobs(c.logprobs) if req.logprobs else None,
            finish_reason=c.finish.finish_reason,
        )
        for i, c in enumerate(done)
    ]
    usage_ = usage_of([prompt], [c.finish for c in done])
    return ChatCompletionResponse(id=rid, created=now, model=engine.name, usage=usage_, choices=choices)
