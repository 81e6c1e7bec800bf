"""The engine interface: what the HTTP layer, the UI and bench may use of a served model, and the per-request state
every engine shares.

An engine owns its model, its request queue, its scheduler and its sampling. A caller tokenizes through it, submits
a prompt with `SamplingParams`, and reads `TextDelta`s then one `Finished` from the returned `Generation` (leaving
the stream, or `Generation.cancel()`, cancels it). `LlamaCppEngine` (llama_engine.py) and `HFEngine` (hf_engine.py)
implement `Engine`; on their scheduler threads both turn sampled tokens into events through `Output`.
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from adaptserve.models import ModelSpec
from adaptserve.models.prompt import stop_strings

# Server defaults for both engines; benchmarks/batching.md and benchmarks/footprint.md measure the choice.
DEFAULT_SLOTS = 4  # sequences decoded together
DEFAULT_CTX = 2048  # tokens of context per slot: every FinQA prompt of the shipped styles fits
DEFAULT_PREFILL_CHUNK = 64  # prompt tokens per scheduling step: as fast as larger chunks, shorter stalls


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


class InvalidGrammar(ValueError):
    """A grammar the engine cannot enforce: it does not parse, or the engine has no grammar sampler."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted from the logit of every token the completion holds already
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the completion so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with the k most likely alternatives
    echo: bool = False  # also the prompt tokens' log-probabilities (with `logprobs`), computed without the prefix cache
    grammar: str | None = None  # GBNF (root rule `root`) the output must follow, enforced while sampling
    end_logprob: bool = False  # with `logprobs`: also the end-of-generation token's, as legacy completions list it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Nothing to apply to the logits before picking a token: no penalties, no bias."""
        return not (self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (before temperature, penalties and bias), from the logits row
    it was sampled from, and the most likely tokens of that row. A prompt's first token has none."""

    token: int
    piece: bytes
    logprob: float | None
    top: tuple[tuple[int, bytes, float], ...] = ()  # (token, piece, logprob), most likely first


def logprobs_of(rows: np.ndarray, tokens: Sequence[int], k: int, piece: Callable[[int], bytes]) -> list[TokenLogprob]:
    """Each token's log-probability in the softmax of its logits row (rows x vocabulary), with the k most likely
    tokens of the row; the chosen and the top ones come from one computation, so they compare exactly."""
    rows = np.atleast_2d(rows)
    peak = rows.max(axis=1, keepdims=True)
    norm = peak[:, 0] + np.log(np.exp(rows - peak, dtype=np.float64).sum(axis=1))
    out = []
    for row, token, lse in zip(rows, tokens, norm, strict=True):
        top = np.argpartition(row, -k)[-k:] if k else np.empty(0, dtype=np.int64)
        top = top[np.argsort(-row[top], kind="stable")]
        alternatives = tuple((int(t), piece(int(t)), float(row[t]) - float(lse)) for t in top)
        out.append(TokenLogprob(int(token), piece(int(token)), float(row[token]) - float(lse), alternatives))
    return out


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this text came from, when asked for


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
    logprobs: tuple[TokenLogprob, ...] = ()  # the prompt's first when echoed, then the text's tokens


class Generation:
    """The caller's end of one queued request: an async stream of events, cancelled when left early, by cancel(), or
    when `timeout` seconds (queueing included) pass before it finishes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._loop, self._on_finish, self.timeout = loop, on_finish, timeout
        self._events: asyncio.Queue[Event | _Expired] = asyncio.Queue()
        self.cancelled = threading.Event()
        # One timer per request rather than a wait_for per token, which costs the event loop a task per token.
        self._timer = loop.call_later(timeout, self._events.put_nowait, _EXPIRED) if timeout else None

    def put(self, event: Event) -> None:
        """Called from the engine's scheduler thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next token (or before it starts)."""
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
        finally:  # client gone or consumer done
            self.cancel()
            if self._timer is not None:
                self._timer.cancel()

    async def collect(self) -> Completion:
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        async for event in self.events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
                logprobs += event.logprobs
            else:
                return Completion("".join(parts), event, tuple(logprobs))
        raise EngineError("generation ended without a result")


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


class Engine(Protocol):
    """A served model, as every caller sees it. Counters are written by the engine's scheduler and read by /metrics;
    they count abandoned work too."""

    name: str
    spec: ModelSpec
    n_ctx: int  # context window of one request, prompt and completion together
    n_vocab: int  # token ids run from 0 to n_vocab - 1
    has_chat_template: bool  # else chats are rendered as the plain transcript (models.prompt)
    queue_depth: int  # requests waiting for a slot
    n_slots: int
    slots_busy: int
    prompt_tokens: int  # prompt tokens of admitted requests
    cached_prompt_tokens: int  # of those, reused from the prefix cache
    tokens_generated: int
    requests_cancelled: int

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered as `adaptserve.models.prompt` says, tokenized."""
        ...

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Queue a generation; raises InvalidPrompt or EngineBusy at once, before anything is streamed."""
        ...

    def drain(self, timeout: float) -> None:
        """Refuse new requests; those running or queued may finish within `timeout` seconds, then fail cleanly."""

    def close(self) -> None:
        """Stop after the step in hand (running and queued requests fail) and free the model."""

    def describe(self) -> dict[str, Any]:
        """What runs this model (backend, weights, threads, slots, context), for /health and reports."""
        ...

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens and chat template, as vLLM's /tokenizer_info gives them."""
        ...

    def grammar_error(self, grammar: str) -> str | None:
        """Why this engine cannot enforce `grammar` (GBNF), or None when it can."""
        ...

    # Shared by every engine: a protocol's methods with bodies are inherited by classes that subclass it.

    def chat_stops(self) -> tuple[str, ...]:
        """Stop strings a chat adds to the request's own: the plain transcript's turn markers, if it is used."""
        return stop_strings(self.has_chat_template)

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        return completion_budget(prompt, max_tokens, self.n_ctx)

    async def complete(self, prompt: list[int], params: SamplingParams) -> Completion:
        return await self.submit(prompt, params).collect()


@dataclass
class Job:
    """A queued request: what to generate, and where its events go."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event
    adapter: str | None = None  # on a transformers base: the LoRA adapter of its row (None: the base itself)


class JobQueue:
    """The bounded FIFO in front of an engine's scheduler, and the shutdown deadline set by drain()."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self._drain_by: float | None = None  # set by drain(): when whatever still runs is failed

    def put(self, job: Job) -> None:
        """Queue a job, or raise EngineBusy: the queue is full or the server is shutting down."""
        if self._drain_by is not None:
            raise EngineBusy(f"model {self.name} is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"model {self.name} has {self._jobs.maxsize} requests queued") from None

    def get(self, block: bool = True, timeout: float | None = None) -> Job | None:
        """The next job; None when wake() interrupts a blocked get. Raises queue.Empty as queue.Queue does."""
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
        self._jobs.put(None)  # wakes a scheduler blocked in get()


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


class Detokenizer(Protocol):
    """Token ids in, text out, a token at a time; a character split across tokens comes out once whole."""

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...  # what is held back, at the end of the output


class ByteDetokenizer:
    """For tokenizers that give each token's bytes (llama.cpp): an incremental UTF-8 decoder over them."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class WindowDetokenizer:
    """For tokenizers that only decode id lists (transformers): a new token is decoded together with the tokens since
    the last emitted text, and its text is the difference. A token's text can depend on the one before it (a word's
    leading space, byte fallback), and the window keeps the cost per token constant however long the output."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # the window's first token: context for the decode
        self._read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[self._start : self._read])
        text = self._decode(self._ids[self._start :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._read = self._read, len(self._ids)
        return text[len(before) :]


class Output:
    """A running request's output, the same in every engine: sampled tokens in; text through the detokenizer and
    the stop matcher out to the caller; then one Finished with its counts and time to first token."""

    def __init__(self, job: Job, limit: int, detokenizer: Detokenizer, started: float) -> None:
        self.job, self.limit, self.started = job, limit, started  # limit: completion tokens it may have
        self.detokenizer = detokenizer
        self.stops = StopMatcher(job.params.stop)
        self.n = 0
        self.first_token_at: float | None = None
        self.cut = False  # a stop string ended it
        self.done = False  # finished or failed: nothing more is emitted
        self._logprobs: list[TokenLogprob] = []  # of tokens whose text is not out yet

    def prompt_logprobs(self, logprobs: Sequence[TokenLogprob]) -> None:
        """The prompt's tokens with their log-probabilities (echo): emitted ahead of any completion text."""
        self.job.emit(TextDelta("", tuple(logprobs)))

    def add(self, token: int, logprob: TokenLogprob | None = None) -> str | None:
        """Take a sampled token that is not end-of-generation; the finish reason if the request ends with it."""
        self.n += 1
        self.first_token_at = self.first_token_at or time.perf_counter()
        if logprob is not None:
            self._logprobs.append(logprob)
        text, self.cut = self.stops.push(self.detokenizer.push(token))
        if text:
            self._emit(text)
        if self.cut:
            return "stop"
        return "length" if self.n >= self.limit else None

    def end(self, logprob: TokenLogprob | None) -> None:
        """The end-of-generation token that stops it: no text, but its log-probability goes out with the rest (a
        scorer reading the completion's last entry as the generated token needs it there)."""
        if logprob is not None and self.job.params.end_logprob:
            self._logprobs.append(logprob)

    def _emit(self, text: str) -> None:
        self.job.emit(TextDelta(text, tuple(self._logprobs)))
        self._logprobs.clear()

    def finish(self, reason: str) -> None:
        if not self.cut:  # text held back as a possible stop-string prefix, or an unfinished character, is output
            tail = self.stops.flush() + self.detokenizer.flush()
            if tail or self._logprobs:
                self._emit(tail)
        self.done = True
        ttft = self.first_token_at - self.started if self.first_token_at else None
        self.job.emit(Finished(reason, len(self.job.prompt), self.n, ttft))

    def fail(self, failure: Failed) -> None:
        self.done = True
        self.job.emit(failure)
