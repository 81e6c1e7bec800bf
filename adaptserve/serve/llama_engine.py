"""llama.cpp engine: one GGUF model, its request queue, its batch scheduler and its sampling.

The scheduler runs continuous batching on the process's one llama.cpp thread (`llama_thread.py`), a step at a time
in turn with the other engines': queued requests are admitted into free KV slots (`kvslots.py`), prompts are
prefilled a chunk per step, and every running sequence advances one token per `llama_decode`, each sampled from its
own logits row with its own sampler. ctypes drops the GIL during decode, so the event loop keeps serving HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from adaptserve import llama_thread
from adaptserve.models import ModelSpec
from adaptserve.models.prompt import Template, adds_bos, render
from adaptserve.serve.engine import (
    DEFAULT_CTX,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_SLOTS,
    SHUTTING_DOWN,
    ByteDetokenizer,
    Engine,
    Failed,
    Finished,
    Generation,
    InvalidGrammar,
    Job,
    JobQueue,
    Output,
    SamplingParams,
    TokenLogprob,
    logprobs_of,
)
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, Feed, KVSlots, Slot, common_prefix
from adaptserve.serve.llama_sampling import Sampler, grammar_reason

log = logging.getLogger(__name__)

_UNUSED_CTX = 256  # the Llama's own context: never decoded on, see LlamaCppEngine.__init__


@dataclass
class _Sequence:
    """An admitted request: the slot it decodes in, its sampler, and its output."""

    out: Output
    slot: Slot
    sampler: Sampler
    pending: list[int]  # prompt tokens not decoded yet
    next_token: int = -1  # sampled, to be decoded in the next step
    echo: list[TokenLogprob] | None = None  # prompt log-probabilities gathered during prefill, when asked for

    @property
    def job(self) -> Job:
        return self.out.job

    def close_sampler(self) -> None:
        self.sampler.close()


class LlamaCppEngine(Engine):
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
        # The Llama holds the weights, tokenizer and metadata, shared with the other engines on the same GGUF (a base
        # and the adapters served on it); decoding runs on the batched context of `slots`, which applies this
        # engine's LoRA if it has one, so the Llama's own context is left at the smallest size. Prefill and decode
        # use the same threads: one per physical core unless told (llama-cpp-python's defaults decode on half the
        # logical CPUs).
        self.llm = llama_thread.share(spec.path, n_threads, n_ctx=_UNUSED_CTX)
        try:
            self._lora = llama_thread.load_lora(self.llm, spec.lora) if spec.lora else None
            batch = max(prefill_chunk, n_slots)
            self.slots = KVSlots(self.llm, n_slots, n_ctx, max_batch=batch, kv_cache=kv_cache, lora=self._lora)
        except Exception:
            llama_thread.unshare(self.llm)
            raise
        self.n_threads: int = self.llm.n_threads
        self.prefill_chunk = prefill_chunk
        self.n_ctx = self.slots.n_ctx
        self.n_vocab = self.slots.n_vocab
        self._eog = functools.partial(llama_cpp.llama_vocab_is_eog, self.llm._model.vocab)
        # A request's grammar is checked by the HTTP layer and again at each submit (n choices): parse it once.
        self._grammar_reason = functools.lru_cache(maxsize=64)(functools.partial(grammar_reason, self.llm._model.vocab))
        self._template = self._chat_template()
        self._jobs = JobQueue(self.name, queue_size)
        self._held: list[tuple[Job, float]] = []  # taken off the queue, waiting for a slot or a shared prefix
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

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered as `adaptserve.models.prompt` says: the GGUF's chat template, else a plain transcript
        (which base models continue sensibly)."""
        return self.tokenize(render(messages, self._template), add_bos=adds_bos(self.has_chat_template))

    # ---- request side: async API for the HTTP layer ----

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        self.budget(prompt, params.max_tokens)
        if params.grammar is not None and (reason := self.grammar_error(params.grammar)):
            raise InvalidGrammar(reason)
        generation = Generation(asyncio.get_running_loop(), on_finish, timeout)
        self._jobs.put(Job(list(prompt), params, generation.put, generation.cancelled))
        llama_thread.wake()
        return generation

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

    def grammar_error(self, grammar: str) -> str | None:
        return self._grammar_reason(grammar)

    def tokenizer_info(self) -> dict[str, Any]:
        model = self.llm._model

        def text(token: int) -> str | None:
            return model.token_get_text(token) if token != -1 else None

        return {
            "eos_token": text(self.llm.token_eos()),
            "bos_token": text(self.llm.token_bos()),
            "pad_token": None,
            "chat_template": self.llm.metadata.get("tokenizer.chat_template"),
            "model_max_length": self.n_ctx,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "llama.cpp",
            "weights": llama_thread.gguf_name(self.spec),
            "threads": self.n_threads,
            "n_slots": self.n_slots,
            "n_ctx": self.n_ctx,
            "kv_cache": self.slots.kv_cache,
            "prefill_chunk": self.prefill_chunk,
            "chat_template": self.has_chat_template,
        }

    def drain(self, timeout: float) -> None:
        self._jobs.drain(timeout)

    def close(self) -> None:
        llama_thread.run(self._stop)
        self.slots.close()
        if self._lora is not None:
            llama_cpp.llama_adapter_lora_free(self._lora)
        llama_thread.unshare(self.llm)
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

    def _place(self, job: Job, dequeued: float, running: list[_Sequence]) -> None:
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

    def _awaits_prefix(self, job: Job, running: list[_Sequence]) -> bool:
        """Whether a running prompt is still prefilling a prefix it shares with this one, a chunk longer than any
        slot holds yet, or this whole prompt: requests that arrive together (FinQA with the same exemplars, the n
        choices of one request) then compute it only once."""
        if job.params.echo:  # computes its whole prompt anyway
            return False
        have = max(slot.prefix(job.prompt) for slot in self.slots.slots)
        for seq in running:
            shared = common_prefix(seq.job.prompt, job.prompt)
            worth = shared >= have + self.prefill_chunk or shared == len(job.prompt) > have + 1
            if seq.pending and worth and len(seq.slot.cached) < shared:
                return True
        return False

    def _start(self, job: Job, dequeued: float) -> _Sequence:
        limit = self.budget(job.prompt, job.params.max_tokens)
        sampler = Sampler(job.params, self.llm._model.vocab, self.n_vocab, limit)
        # A copy from another slot is worth it once it saves a prefill chunk; shorter shared prefixes are recomputed.
        slot, cached = self.slots.acquire(job.prompt, align=self.prefill_chunk, reuse=not job.params.echo)
        out = Output(job, limit, ByteDetokenizer(self._piece), dequeued)
        echo = [TokenLogprob(job.prompt[0], self._named_piece(job.prompt[0]), None)] if job.params.echo else None
        return _Sequence(out, slot, sampler, job.prompt[cached:], echo=echo)

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
            start = len(seq.slot.cached)
            echo = seq.echo is not None
            (row,) = self.slots.decode([Feed(seq.slot, chunk, logits=not seq.pending, every=echo)])
            if echo:
                self._echo(seq, start, len(chunk), row)
            if not seq.pending:
                self._advance(running, seq, row)
        decoding = [s for s in running if not s.pending]  # KVSlots.decode puts them in slot order, gaps filled
        if decoding:
            rows = self.slots.decode([Feed(s.slot, (s.next_token,), logits=True) for s in decoding])
            for seq, row in zip(decoding, rows, strict=True):
                self._advance(running, seq, row)

    def _echo(self, seq: _Sequence, start: int, n: int, last_row: int) -> None:
        """Log-probabilities of the prompt tokens that a prefill chunk's logits predict (the chunk held prompt
        positions start..start+n-1, in rows last_row-n+1..last_row); all of them go out once the prompt is in."""
        assert seq.echo is not None
        prompt = seq.job.prompt
        positions = [i for i in range(start, start + n) if i + 1 < len(prompt)]
        if positions:
            rows = np.stack([self.slots.logits(last_row - (start + n - 1) + i) for i in positions])
            next_tokens = [prompt[i + 1] for i in positions]
            seq.echo += logprobs_of(rows, next_tokens, seq.job.params.logprobs or 0, self._named_piece)
        if not seq.pending:
            seq.out.prompt_logprobs(seq.echo)

    def _piece(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    def _named_piece(self, token: int) -> bytes:
        """A token's text for log-probabilities: special tokens by name, as OpenAI lists `<|endoftext|>`."""
        return self.llm.detokenize([token], special=True)

    def _advance(self, running: list[_Sequence], seq: _Sequence, row: int) -> None:
        """Sample the sequence's next token from logits row `row` and pass it on."""
        token = seq.sampler.sample(self.slots.logits(row))
        k = seq.job.params.logprobs
        logprob = None if k is None else logprobs_of(self.slots.logits(row), [token], k, self._named_piece)[0]
        if self._eog(token):
            seq.out.end(logprob)
            self._finish(running, seq, "stop")
            return
        self.tokens_generated += 1
        reason = seq.out.add(token, logprob)
        if reason is not None:
            self._finish(running, seq, reason)
        else:
            seq.next_token = token

    def _finish(self, running: list[_Sequence], seq: _Sequence, reason: str) -> None:
        running.remove(seq)
        self.slots.release(seq.slot)
        seq.close_sampler()
        seq.out.finish(reason)

    def _fail(self, running: list[_Sequence], failure: Failed) -> None:
        for seq in running:
            self.slots.reset(seq.slot)
            seq.close_sampler()
            seq.out.fail(failure)
        running.clear()
