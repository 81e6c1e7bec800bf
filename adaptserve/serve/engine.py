"""llama.cpp engine: owns one GGUF model, its request queue and its sampling.

The HTTP layer never touches the model. It tokenizes through the engine, submits a prompt with
`SamplingParams`, and reads `TextDelta`s then one `Finished` from the returned `Generation`. A single worker
thread runs the requests in arrival order, so llama.cpp state is never shared between requests;
ctypes drops the GIL during decode, so the event loop keeps serving HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from adaptserve.models import ModelSpec

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while generating."""


class EngineBusy(EngineError):
    """The request queue is full; the caller should retry later."""


class PromptTooLong(ValueError):
    """Prompt plus requested completion does not fit the context window."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None  # seconds from dequeue to first token


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed


@dataclass(frozen=True)
class Completion:
    text: str
    finish: Finished


class Generation:
    """The caller's end of one queued request: an async stream of events, cancelled when left early."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finish: Callable[[Finished], None] | None = None) -> None:
        self._loop, self._on_finish = loop, on_finish
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, event: Event) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, Failed):
                    raise EngineError(event.message)
                if isinstance(event, Finished) and self._on_finish is not None:
                    self._on_finish(event)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # Client gone or consumer done: the worker drops the job at its next token (or before it starts).
            self.cancelled.set()

    async def collect(self) -> Completion:
        parts: list[str] = []
        async for event in self.events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return Completion("".join(parts), event)
        raise EngineError("generation ended without a result")


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back only what could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LlamaCppEngine:
    """One GGUF model on CPU (or whatever llama.cpp was built for) behind a FIFO request queue."""

    def __init__(self, spec: ModelSpec, n_ctx: int = 4096, n_threads: int | None = None, queue_size: int = 64) -> None:
        self.name = spec.name
        self.spec = spec
        # n_threads_batch too: left alone it takes every core, and prompt processing stalls when one is busy.
        self.llm = llama_cpp.Llama(
            model_path=str(spec.path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False
        )
        self.n_ctx = self.llm.n_ctx()
        self._chat = self._chat_formatter()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        # Written by the worker only; read by /metrics. Counted here, not in HTTP, so abandoned work shows too.
        self.tokens_generated = 0
        self.requests_cancelled = 0
        self._worker = threading.Thread(target=self._work, name=f"engine-{self.name}", daemon=True)
        self._worker.start()
        log.info("loaded %s (%s) n_ctx=%d chat_template=%s", self.name, spec.location, self.n_ctx, self._chat is not None)

    # ---- prompt side: runs on the caller's thread, touches only the tokenizer ----

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the GGUF's own chat template (the template adds BOS itself).

        A model without a template (a base model) gets a plain transcript, which base models continue sensibly.
        """
        if self._chat is None:
            turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return self.tokenize(turns + "Assistant:")
        return self.tokenize(self._chat(messages=messages).prompt, add_bos=False)

    def chat_stops(self) -> tuple[str, ...]:
        # Base models without a template would otherwise go on to write the user's next turn.
        return () if self._chat is not None else ("\nUser:",)

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """Completion tokens this prompt may have; raises PromptTooLong like OpenAI's context check."""
        room = self.n_ctx - len(prompt)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = f" plus {max_tokens} completion tokens" if max_tokens is not None else ""
            raise PromptTooLong(
                f"this model's maximum context length is {self.n_ctx} tokens, "
                f"but the request has {len(prompt)} prompt tokens{asked}"
            )
        return room if max_tokens is None else max_tokens

    # ---- request side: async API for the HTTP layer ----

    def submit(
        self, prompt: list[int], params: SamplingParams, on_finish: Callable[[Finished], None] | None = None
    ) -> Generation:
        """Queue a generation; raises PromptTooLong or EngineBusy at once, before anything is streamed."""
        self.budget(prompt, params.max_tokens)
        generation = Generation(asyncio.get_running_loop(), on_finish)
        job = _Job(list(prompt), params, generation.put, generation.cancelled)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"model {self.name} has {self._jobs.maxsize} requests queued") from None
        return generation

    async def complete(self, prompt: list[int], params: SamplingParams) -> Completion:
        return await self.submit(prompt, params).collect()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        """Stop the worker after the job in hand and free the model."""
        while True:  # drop queued jobs so shutdown does not wait for them
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(Failed("server shutting down"))
        self._jobs.put(None)
        self._worker.join(timeout=30)
        self.llm.close()
        log.info("closed %s", self.name)

    # ---- worker thread ----

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                self.requests_cancelled += 1
                continue
            try:
                self._generate(job)
            except Exception as err:  # a broken request must not kill the worker
                log.exception("generation failed on %s", self.name)
                job.emit(Failed(f"{type(err).__name__}: {err}"))

    def _generate(self, job: _Job) -> None:
        params, llm = job.params, self.llm
        limit = self.budget(job.prompt, params.max_tokens)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        started, first_token_at = time.perf_counter(), None
        n, reason, cut = 0, "length", False
        # top_k=0 and min_p=0 switch those filters off, so temperature/top_p mean what OpenAI clients expect.
        tokens = llm.generate(job.prompt, temp=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0)
        for token in tokens:
            if job.cancelled.is_set():
                reason = "cancelled"
                self.requests_cancelled += 1
                break
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                reason = "stop"
                break
            n += 1
            self.tokens_generated += 1
            first_token_at = first_token_at or time.perf_counter()
            text, cut = stops.push(decoder.decode(llm.detokenize([token])))
            if text:
                job.emit(TextDelta(text))
            if cut:
                reason = "stop"
                break
            if n >= limit:
                break
        tokens.close()
        if not cut:  # text held back as a possible stop-string prefix is real output after all
            tail = stops.flush() + decoder.decode(b"", final=True)
            if tail:
                job.emit(TextDelta(tail))
        ttft = first_token_at - started if first_token_at else None
        job.emit(Finished(reason, len(job.prompt), n, ttft))
