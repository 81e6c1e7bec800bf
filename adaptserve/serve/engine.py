"""llama.cpp engine: owns one GGUF model, its request queue, its batch scheduler and its sampling.

The HTTP layer never touches the model. It tokenizes through the engine, submits a prompt with
`SamplingParams`, and reads `TextDelta`s then one `Finished` from the returned `Generation`. The scheduler
runs continuous batching on the process's one llama.cpp thread (`llama_thread.py`), a step at a time in turn with
the other engines': queued requests are admitted into free KV slots (see `kvslots.py`), prompts are prefilled a
chunk per step, and every running sequence advances one token per `llama_decode`, each sampled from its own
logits row with its own sampler. ctypes drops the GIL during decode, so the event loop keeps serving HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import llama_cpp
from llama_cpp import _internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from adaptserve import llama_thread
from adaptserve.models import ModelSpec
from adaptserve.models.prompt import Template, adds_bos, render, stop_strings
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, Feed, KVSlots, Slot, common_prefix

log = logging.getLogger(__name__)

# Measured on 2 cores (benchmarks/results/batching/kv-cache-q8_0/packed): 4 slots serve 4-8 clients at 1.47-1.60x one
# client's tokens/s, 8 slots at 1.53-1.91x, while each slot holds n_ctx tokens of KV, about 12 KiB per token for
# SmolLM2-135M in the default 8-bit cache. 4 slots of 2048 tokens fit every FinQA prompt but one 2-shot base prompt
# and serve base + adapted in 558 MiB (730 with an f16 cache; 8 slots would add ~190; benchmarks/results/footprint).
# Prefill runs as fast in chunks of 64 as in larger ones, and a smaller chunk stalls the running streams less while
# a long prompt goes in.
DEFAULT_SLOTS = 4
DEFAULT_CTX = 2048
DEFAULT_PREFILL_CHUNK = 64
_UNUSED_CTX = 256  # the Llama's own context: never decoded on, see LlamaCppEngine.__init__


class EngineError(RuntimeError):
    """The engine failed while generating."""


class EngineBusy(EngineError):
    """The request queue is full, or the server is shutting down; the caller should retry later."""


class TimedOut(EngineError):
    """The request ran past its time limit and was cancelled."""


class InvalidPrompt(ValueError):
    """A prompt the engine cannot run: the caller's fault."""


class PromptTooLong(InvalidPrompt):
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
    retry: bool = False  # not the request's fault (shutdown): the client may send it again


SHUTTING_DOWN = Failed("server shutting down", retry=True)


Event = TextDelta | Finished | Failed


class _Expired:
    """Put into a Generation's events when its time limit passes."""


_EXPIRED = _Expired()


@dataclass(frozen=True)
class Completion:
    text: str
    finish: Finished


class Generation:
    """The caller's end of one queued request: an async stream of events, cancelled when left early or when
    `timeout` seconds (queueing included) pass before it finishes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._loop, self._on_finish, self.timeout = loop, on_finish, timeout
        self._events: asyncio.Queue[Event | _Expired] = asyncio.Queue()
        self.cancelled = threading.Event()
        # One timer per request, not a wait_for per token: that made a task each time, ~20 us of the event loop's
        # time per streamed token.
        self._timer = loop.call_later(timeout, self._events.put_nowait, _EXPIRED) if timeout else None

    def put(self, event: Event) -> None:  # called from the engine's thread (llama.cpp's, or the transformers worker)
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, _Expired):
                    raise TimedOut(f"the request ran past the server's limit of {self.timeout:g} s and was cancelled")
                if isinstance(event, Failed):
                    raise (EngineBusy if event.retry else EngineError)(event.message)
                if isinstance(event, Finished) and self._on_finish is not None:
                    self._on_finish(event)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # Client gone or consumer done: the worker drops the job at its next token (or before it starts).
            self.cancelled.set()
            if self._timer is not None:
                self._timer.cancel()

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


class Emits(Protocol):
    emit: Callable[[Event], None]


J = TypeVar("J", bound=Emits)


class JobQueue(Generic[J]):
    """The bounded FIFO in front of an engine's worker, and the shutdown deadline set by drain(); both engines'."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._jobs: queue.Queue[J | None] = queue.Queue(maxsize=size)
        self._drain_by: float | None = None  # set by drain(): when whatever still runs is failed

    def put(self, job: J) -> None:
        """Queue a job, or raise EngineBusy: the queue is full or the server is shutting down."""
        if self._drain_by is not None:
            raise EngineBusy(f"model {self.name} is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"model {self.name} has {self._jobs.maxsize} requests queued") from None

    def get(self, block: bool = True, timeout: float | None = None) -> J | None:
        """The next job; None when close() wakes the worker. Raises queue.Empty as queue.Queue does."""
        return self._jobs.get(block, timeout)

    def qsize(self) -> int:
        return self._jobs.qsize()

    def drain(self, timeout: float) -> None:
        self._drain_by = time.perf_counter() + timeout

    def past_deadline(self) -> bool:
        return self._drain_by is not None and time.perf_counter() >= self._drain_by

    def fail_queued(self) -> None:
        """Fail every job still waiting, so that shutdown does not wait for them."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(SHUTTING_DOWN)

    def wake(self) -> None:
        self._jobs.put(None)  # wakes a worker waiting for work


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


@dataclass
class _Sequence:
    """An admitted request: the slot it decodes in, its sampler, and its streaming state."""

    job: _Job
    slot: Slot
    sampler: _internals.LlamaSampler | None  # None: greedy (KVSlots.sample)
    limit: int  # completion tokens it may have
    pending: list[int]  # prompt tokens not decoded yet
    stops: StopMatcher
    started: float  # taken off the queue
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    next_token: int = -1  # sampled, to be decoded in the next step
    n: int = 0
    first_token_at: float | None = None
    cut: bool = False  # a stop string ended it

    def close_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def completion_budget(prompt: list[int], max_tokens: int | None, n_ctx: int) -> int:
    """Completion tokens this prompt may have in a context of `n_ctx`; raises InvalidPrompt for an empty prompt and
    PromptTooLong like OpenAI's context check."""
    if not prompt:  # e.g. "" where the tokenizer adds no BOS
        raise InvalidPrompt("the prompt is empty: there is nothing to continue from")
    room = n_ctx - len(prompt)
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = f" plus {max_tokens} completion tokens" if max_tokens is not None else ""
        raise PromptTooLong(
            f"this model's maximum context length is {n_ctx} tokens, but the request has {len(prompt)} prompt tokens{asked}"
        )
    return room if max_tokens is None else max_tokens


def _sampler(params: SamplingParams) -> _internals.LlamaSampler | None:
    """llama-cpp-python's own chain for these settings, less its filters that are no-ops here (top_k, min_p,
    penalties); None for greedy, which KVSlots.sample does itself."""
    if params.temperature == 0:
        return None
    sampler = _internals.LlamaSampler()
    sampler.add_top_p(params.top_p, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(params.seed if params.seed is not None else random.getrandbits(32))
    return sampler


class LlamaCppEngine:
    """One GGUF model on CPU (or whatever llama.cpp was built for): a bounded FIFO queue in front of `n_slots`
    sequences that decode together, each with a context window of `n_ctx` tokens.

    `prefill_chunk` caps the prompt tokens one scheduling step takes beside the running sequences' one token each,
    so a long prompt delays the running streams by a chunk per step rather than by its whole prefill.
    """

    def __init__(
        self,
        spec: ModelSpec,
        n_ctx: int = DEFAULT_CTX,
        n_threads: int | None = None,
        queue_size: int = 64,
        n_slots: int = DEFAULT_SLOTS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_cache: str = DEFAULT_KV_CACHE,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be positive")
        self.name = spec.name
        self.spec = spec
        # The Llama holds the weights, tokenizer and metadata; decoding runs on the batched context of `slots`,
        # so the Llama's own context is left at the smallest size. Prefill and decode use the same threads: one per
        # physical core unless told (llama-cpp-python's defaults decode on half the logical CPUs).
        self.llm = llama_thread.load(spec.path, n_threads, n_ctx=_UNUSED_CTX, lora_path=spec.lora)
        self.n_threads: int = self.llm.n_threads
        self.prefill_chunk = prefill_chunk
        self.slots = KVSlots(self.llm, n_slots, n_ctx, max_batch=max(prefill_chunk, n_slots), kv_cache=kv_cache)
        self.n_ctx = self.slots.n_ctx
        self._eog = functools.partial(llama_cpp.llama_vocab_is_eog, self.llm._model.vocab)
        self._template = self._chat_template()
        self._jobs: JobQueue[_Job] = JobQueue(self.name, queue_size)
        self._held: list[tuple[_Job, float]] = []  # taken off the queue, waiting for a slot or a shared prefix
        self._running: list[_Sequence] = []  # in admission order: earlier prompts get the prefill budget first
        # Written by the scheduler only; read by /metrics. Counted here, not in HTTP, so abandoned work shows too.
        self.tokens_generated = 0
        self.requests_cancelled = 0
        llama_thread.attach(self._tick)
        log.info(
            "loaded %s (%s) threads=%d slots=%d n_ctx=%d per slot kv_cache=%s prefill_chunk=%d chat_template=%s",
            self.name,
            llama_thread.gguf_name(spec),
            self.n_threads,
            n_slots,
            self.n_ctx,
            kv_cache,
            prefill_chunk,
            self.has_chat_template,
        )

    # ---- prompt side: runs on the caller's thread, touches only the tokenizer ----

    def _chat_template(self) -> Template | None:
        """The GGUF's own chat template, rendered by llama-cpp-python's Jinja2 formatter; None if it has none."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        return lambda messages: formatter(messages=list(messages)).prompt

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered as `adaptserve.models.prompt` says: the GGUF's chat template, else a plain transcript
        (which base models continue sensibly)."""
        return self.tokenize(render(messages, self._template), add_bos=adds_bos(self.has_chat_template))

    def chat_stops(self) -> tuple[str, ...]:
        return stop_strings(self.has_chat_template)

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        return completion_budget(prompt, max_tokens, self.n_ctx)

    # ---- request side: async API for the HTTP layer ----

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Queue a generation; raises InvalidPrompt or EngineBusy at once, before anything is streamed."""
        self.budget(prompt, params.max_tokens)
        generation = Generation(asyncio.get_running_loop(), on_finish, timeout)
        self._jobs.put(_Job(list(prompt), params, generation.put, generation.cancelled))
        llama_thread.wake()
        return generation

    async def complete(self, prompt: list[int], params: SamplingParams) -> Completion:
        return await self.submit(prompt, params).collect()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize() + len(self._held)

    # Slot occupancy and prefix-cache counters, for /metrics
    @property
    def n_slots(self) -> int:
        return len(self.slots.slots)

    @property
    def slots_busy(self) -> int:
        return self.slots.busy

    @property
    def prompt_tokens(self) -> int:
        return self.slots.prompt_tokens

    @property
    def cached_prompt_tokens(self) -> int:
        return self.slots.cached_prompt_tokens

    def drain(self, timeout: float) -> None:
        """Refuse new requests; those running or queued may finish within `timeout` seconds, then fail cleanly."""
        self._jobs.drain(timeout)

    def close(self) -> None:
        """Stop scheduling after the decode step in hand (running and queued requests fail) and free the model."""
        llama_thread.run(self._stop)
        self.slots.close()
        self.llm.close()
        log.info("closed %s", self.name)

    # ---- the scheduler: runs on the llama.cpp thread, a step at a time, in turn with the other engines ----

    def _tick(self) -> bool:
        """Admit what fits, then one decode step; whether there is more to do without new requests (sequences
        running, or requests waiting for the slots this step may have freed)."""
        running = self._running
        if self._jobs.past_deadline():
            self._shed(running)
        self._admit(running)
        try:
            self._step(running)
        except Exception as err:  # a failed decode leaves every sequence in it unusable, not the scheduler
            log.exception("decode step failed on %s", self.name)
            self._fail(running, Failed(f"{type(err).__name__}: {err}"))
        return bool(running or self._held) or self._jobs.qsize() > 0

    def _stop(self) -> None:
        llama_thread.detach(self._tick)
        self._shed(self._running)

    def _shed(self, running: list[_Sequence]) -> None:
        """Fail every request the engine holds, running or waiting: the server is going away."""
        self._fail(running, SHUTTING_DOWN)
        for job, _ in self._held:
            job.emit(SHUTTING_DOWN)
        self._held.clear()
        self._jobs.fail_queued()

    def _admit(self, running: list[_Sequence]) -> None:
        """Start jobs in free slots: held-back ones first, then queued ones."""
        held, self._held = self._held, []
        for job, dequeued in held:
            self._place(job, dequeued, running)
        while self.slots.has_free():
            try:
                job = self._jobs.get(block=False)
            except queue.Empty:
                return
            if job is not None:  # None only wakes a worker blocked in get(), which this one never is
                self._place(job, time.perf_counter(), running)

    def _place(self, job: _Job, dequeued: float, running: list[_Sequence]) -> None:
        if job.cancelled.is_set():
            self.requests_cancelled += 1
        elif not self.slots.has_free() or self._awaits_prefix(job, running):
            self._held.append((job, dequeued))
        else:
            try:
                running.append(self._start(job, dequeued))
            except Exception as err:  # a broken request must not stop the scheduler
                log.exception("could not start a generation on %s", self.name)
                job.emit(Failed(f"{type(err).__name__}: {err}"))

    def _awaits_prefix(self, job: _Job, running: list[_Sequence]) -> bool:
        """Whether a running prompt is still prefilling a prefix it shares with this one, a chunk longer than any
        slot holds yet: requests that arrive together (FinQA with the same exemplars) then compute it only once."""
        have = max(slot.prefix(job.prompt) for slot in self.slots.slots)
        for seq in running:
            shared = common_prefix(seq.job.prompt, job.prompt)
            if seq.pending and shared >= have + self.prefill_chunk and len(seq.slot.cached) < shared:
                return True
        return False

    def _start(self, job: _Job, dequeued: float) -> _Sequence:
        limit, sampler = self.budget(job.prompt, job.params.max_tokens), _sampler(job.params)
        # A copy from another slot is worth it once it saves a prefill chunk; shorter shared prefixes are recomputed.
        slot, cached = self.slots.acquire(job.prompt, align=self.prefill_chunk)
        return _Sequence(job, slot, sampler, limit, job.prompt[cached:], StopMatcher(job.params.stop), dequeued)

    def _step(self, running: list[_Sequence]) -> None:
        """Up to `prefill_chunk` prompt tokens, then each running sequence's next token in one llama_decode.

        With the f16 cache prompts advance by chunks of their grid (positions cut at multiples of `prefill_chunk`;
        see kvslots.py); with the 8-bit cache, where any cut gives the same K/V, by whole chunks from wherever a
        prefix hit ended, so that a hit off the grid costs no extra call. The earliest admitted go first, each chunk
        in a llama_decode of its own: in the same call as other sequences' tokens, llama.cpp's micro-batching took
        one of its tokens in with theirs, decoded like a lone token. Prefill goes first so that a prompt finished in
        this step joins the decode in it: its slot idles one step less (an idle slot is a placeholder row or a
        second pass; see KVSlots.decode).
        """
        for seq in [s for s in running if s.job.cancelled.is_set()]:
            self.requests_cancelled += 1
            self._finish(running, seq, "cancelled")
        budget, grid = self.prefill_chunk, 1 if self.slots.cut_anywhere else self.prefill_chunk
        for seq in [s for s in running if s.pending]:
            take = min(self.prefill_chunk - len(seq.slot.cached) % grid, len(seq.pending))
            if take > budget:
                continue
            chunk, seq.pending = seq.pending[:take], seq.pending[take:]
            budget -= take
            (row,) = self.slots.decode([Feed(seq.slot, chunk, logits=not seq.pending)])
            if row >= 0:
                self._advance(running, seq, self.slots.sample(seq.sampler, row))
        decoding = [s for s in running if not s.pending]  # KVSlots.decode puts them in slot order, gaps filled
        if decoding:
            rows = self.slots.decode([Feed(s.slot, (s.next_token,), logits=True) for s in decoding])
            for seq, row in zip(decoding, rows, strict=True):
                self._advance(running, seq, self.slots.sample(seq.sampler, row))

    def _advance(self, running: list[_Sequence], seq: _Sequence, token: int) -> None:
        if self._eog(token):
            self._finish(running, seq, "stop")
            return
        seq.n += 1
        self.tokens_generated += 1
        seq.first_token_at = seq.first_token_at or time.perf_counter()
        text, seq.cut = seq.stops.push(seq.decoder.decode(self.llm.detokenize([token])))
        if text:
            seq.job.emit(TextDelta(text))
        if seq.cut:
            self._finish(running, seq, "stop")
        elif seq.n >= seq.limit:
            self._finish(running, seq, "length")
        else:
            seq.next_token = token

    def _finish(self, running: list[_Sequence], seq: _Sequence, reason: str) -> None:
        running.remove(seq)
        self.slots.release(seq.slot)
        seq.close_sampler()
        if not seq.cut:  # text held back as a possible stop-string prefix is real output after all
            tail = seq.stops.flush() + seq.decoder.decode(b"", final=True)
            if tail:
                seq.job.emit(TextDelta(tail))
        ttft = seq.first_token_at - seq.started if seq.first_token_at else None
        seq.job.emit(Finished(reason, len(seq.job.prompt), seq.n, ttft))

    def _fail(self, running: list[_Sequence], failure: Failed) -> None:
        for seq in running:
            self.slots.reset(seq.slot)
            seq.close_sampler()
            seq.job.emit(failure)
        running.clear()
