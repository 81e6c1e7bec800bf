"""Engine speed without HTTP, on the GGUF the server serves: in the style of llama-bench, prompt processing of 512
tokens (pp512) and generation of 128 tokens one at a time (tg128); and what HTTP costs, measured in pairs: each
single-client conversation streamed by llama-cpp-python's own chat completion in this process ("direct"), then at
once through the server, from a blocking client that does as little as it can. Pairing keeps the two sides in the
same minute: on a shared machine the host's speed drifts by more than the few percent HTTP costs (measured in
benchmarks/serving.md)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
from tqdm import tqdm

from adaptserve import llama_thread
from adaptserve.bench.load import Message, ServerGone, percentiles, stream_chat_blocking
from adaptserve.models import ModelSpec, resolve
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs


@dataclass(frozen=True)
class Speed:
    model: str
    gguf: str
    threads: int
    pp_tokens: int
    pp_tokens_per_second: float  # mean over repeats
    pp_std: float
    tg_tokens: int
    tg_tokens_per_second: float
    tg_std: float
    repeats: int


@dataclass(frozen=True)
class Overhead:
    """HTTP against direct generation of the same conversations, one pair at a time (seconds per token after the
    first, as a streaming client times them)."""

    model: str
    pairs: int  # conversations both sides answered in two or more tokens (one token has no time per token)
    same_text: int  # pairs whose two replies are the same text: the same tokens were generated on both sides
    direct_tpot: dict[str, float]
    http_tpot: dict[str, float]
    # The rates and their ratio are None without a pair: no conversation gave both sides a time per token.
    direct_chat_tokens_per_second: float | None  # 1 / mean direct tpot
    http_decode_tokens_per_second: float | None
    ratio: float | None  # HTTP over direct


def served_model(model: str, quant: str, threads: int | None, beside: Sequence[str] = ()) -> ModelSpec:
    """The GGUF (and LoRA GGUF) `adaptserve serve --models <beside>` runs for `model`, one of `beside`: an adapter in
    its form @quant, else `quant`, where "auto" depends on whether its base is served too."""
    from adaptserve.export import served

    return served(resolve(model), quant, threads, beside=[resolve(m).location for m in beside])


def llama_bench(
    model: str,
    spec: ModelSpec,
    threads: int | None,
    pp: int = 512,
    tg: int = 128,
    repeats: int = 3,
    kv_cache: str = DEFAULT_KV_CACHE,
) -> Speed:
    """pp/tg on random tokens, `repeats` times each, with the K/V cache the server keeps (as llama-bench's -ctk/-ctv/-fa)."""
    llm = llama_thread.open_model(spec, threads, n_ctx=pp + tg + 8, n_batch=pp, **kv_cache_kwargs(kv_cache))
    try:
        rng = random.Random(0)  # llama-bench also feeds random tokens: speed does not depend on the text
        prompt = [rng.randrange(llm.n_vocab()) for _ in range(pp)]
        _timed(llm, [prompt[:16]])  # warm-up, excluded
        pp_runs = [pp / _timed(llm, [prompt]) for _ in range(repeats)]
        tg_runs = [tg / _timed(llm, [[token] for token in prompt[:tg]]) for _ in range(repeats)]
    finally:
        llm.close()
    return Speed(
        model=model,
        gguf=llama_thread.gguf_name(spec),
        threads=llm.n_threads,
        pp_tokens=pp,
        pp_tokens_per_second=round(statistics.mean(pp_runs), 2),
        pp_std=round(statistics.stdev(pp_runs), 2) if repeats > 1 else 0.0,
        tg_tokens=tg,
        tg_tokens_per_second=round(statistics.mean(tg_runs), 2),
        tg_std=round(statistics.stdev(tg_runs), 2) if repeats > 1 else 0.0,
        repeats=repeats,
    )


def http_vs_direct(
    url: str,
    model: str,
    spec: ModelSpec,
    threads: int | None,
    chats: Sequence[list[Message]],
    max_tokens: int,
    n_ctx: int,
    kv_cache: str = DEFAULT_KV_CACHE,
) -> Overhead:
    """Each of `chats` greedily, up to `max_tokens`: directly on `spec` in an `n_ctx` window with the server's K/V
    cache type, then from the server at `url` serving it as `model`. Nothing else may run meanwhile."""
    llm = llama_thread.open_model(spec, threads, n_ctx=n_ctx, n_batch=512, **kv_cache_kwargs(kv_cache))
    try:
        llama_thread.run(_direct_chat, llm, chats[0], max_tokens)  # warm-up, excluded
        pairs = _pairs(llm, url, model, chats, max_tokens)
    finally:
        llm.close()
    return overhead(model, pairs)


def overhead(model: str, pairs: Sequence[tuple[_Reply, _Reply]]) -> Overhead:
    """The comparison over (direct, HTTP) reply pairs; without a pair it reports the rates as unavailable (None)."""
    direct, http = [d.tpot for d, _ in pairs], [h.tpot for _, h in pairs]
    direct_rate = 1 / statistics.mean(direct) if direct else None
    http_rate = 1 / statistics.mean(http) if http else None
    return Overhead(
        model=model,
        pairs=len(pairs),
        same_text=sum(d.text == h.text for d, h in pairs),
        direct_tpot=percentiles(direct),
        http_tpot=percentiles(http),
        direct_chat_tokens_per_second=None if direct_rate is None else round(direct_rate, 2),
        http_decode_tokens_per_second=None if http_rate is None else round(http_rate, 2),
        ratio=None if direct_rate is None or http_rate is None else round(http_rate / direct_rate, 3),
    )


@dataclass(frozen=True)
class _Reply:
    """One streamed chat reply: seconds per content chunk after the first, and its text."""

    tpot: float
    text: str


def _pairs(
    llm: llama_cpp.Llama, url: str, model: str, chats: Sequence[list[Message]], max_tokens: int
) -> list[tuple[_Reply, _Reply]]:
    pairs = []
    for chat in tqdm(chats, desc=f"{model}: direct vs HTTP", unit="pair"):
        direct = llama_thread.run(_direct_chat, llm, chat, max_tokens)
        http = stream_chat_blocking(url, model, chat, max_tokens)
        if http.status == 0:  # no HTTP answer at all: the connection failed
            raise ServerGone(f"{url}: {http.error}")
        if direct is not None and http.tpot is not None:
            pairs.append((direct, _Reply(http.tpot, http.text)))
    return pairs


def _timed(llm: llama_cpp.Llama, batches: list[list[int]]) -> float:
    """Seconds to decode `batches` one after another from an empty context (one batch of n tokens = pp,
    n batches of one token = tg)."""
    llm.reset()
    start = time.perf_counter()
    for batch in batches:
        llama_thread.run(llm.eval, batch)  # where the server decodes, at the same cost of a hand-off
    return time.perf_counter() - start


def _direct_chat(llm: llama_cpp.Llama, chat: list[Message], max_tokens: int) -> _Reply | None:
    """Seconds per content chunk after the first of one streamed chat completion, timed as the HTTP client times
    a request, and its text; None below two chunks."""
    first, chunks, text = 0.0, 0, ""
    # Start from an empty context: llama-cpp-python would re-decode a repeated prompt's last token alone, and a call
    # of another size computes other numbers (the reply can change; see kvslots.py). Only the first token's wait
    # would differ, and it is not timed.
    llm.reset()
    for chunk in llm.create_chat_completion(chat, max_tokens=max_tokens, temperature=0.0, stream=True):  # type: ignore[arg-type]
        if chunk["choices"] and (content := chunk["choices"][0]["delta"].get("content")):  # type: ignore[index,union-attr]
            chunks, text = chunks + 1, text + content
            first = first or time.perf_counter()
    return _Reply((time.perf_counter() - first) / (chunks - 1), text) if chunks > 1 else None
