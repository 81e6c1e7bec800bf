"""Engine speed without HTTP, on the GGUF the server serves: in the style of llama-bench, prompt processing of 512
tokens (pp512) and generation of 128 tokens one at a time (tg128); and llama-cpp-python's own streamed chat
completion on the conversations the single-client load level sends, the "direct" side of HTTP / direct."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from adaptserve import llama_thread
from adaptserve.bench.load import Message, percentiles
from adaptserve.models import resolve


@dataclass(frozen=True)
class Speed:
    model: str
    gguf: str
    threads: int | None
    pp_tokens: int
    pp_tokens_per_second: float  # mean over repeats
    pp_std: float
    tg_tokens: int
    tg_tokens_per_second: float
    tg_std: float
    repeats: int
    chat_requests: int
    chat_tpot: dict[str, float]  # seconds per streamed token after the first, llama-cpp-python's chat completion


def served_gguf(model: str, quant: str, threads: int | None) -> Path:
    """The GGUF `adaptserve serve` runs for `model`: the file itself, or an adapter's cached merged export
    (at its @quant, else `quant`)."""
    spec = resolve(model)
    if spec.format != "adapter":
        return spec.path
    from adaptserve.export import ensure_gguf

    return ensure_gguf(spec.path, spec.quant or quant, threads)


def llama_bench(
    model: str,
    path: Path,
    threads: int | None,
    chats: Sequence[list[Message]],
    max_tokens: int,
    n_ctx: int,
    pp: int = 512,
    tg: int = 128,
    repeats: int = 3,
) -> Speed:
    """pp/tg on random tokens, then each of `chats` streamed greedily up to `max_tokens` in an `n_ctx` window."""
    threads = llama_thread.n_threads(threads)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(n_ctx, pp + tg + 8), n_batch=pp, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    try:
        rng = random.Random(0)  # llama-bench also feeds random tokens: speed does not depend on the text
        prompt = [rng.randrange(llm.n_vocab()) for _ in range(pp)]
        _timed(llm, [prompt[:16]])  # warm-up, excluded
        pp_runs = [pp / _timed(llm, [prompt]) for _ in range(repeats)]
        tg_runs = [tg / _timed(llm, [[token] for token in prompt[:tg]]) for _ in range(repeats)]
        llm.reset()
        chat_tpot = [t for chat in chats if (t := llama_thread.run(_chat_tpot, llm, chat, max_tokens)) is not None]
    finally:
        llm.close()
    return Speed(
        model=model,
        gguf=path.name,
        threads=threads,
        pp_tokens=pp,
        pp_tokens_per_second=round(statistics.mean(pp_runs), 2),
        pp_std=round(statistics.stdev(pp_runs), 2),
        tg_tokens=tg,
        tg_tokens_per_second=round(statistics.mean(tg_runs), 2),
        tg_std=round(statistics.stdev(tg_runs), 2),
        repeats=repeats,
        chat_requests=len(chats),
        chat_tpot=percentiles(chat_tpot),
    )


def _timed(llm: llama_cpp.Llama, batches: list[list[int]]) -> float:
    """Seconds to decode `batches` one after another from an empty context (one batch of n tokens = pp,
    n batches of one token = tg)."""
    llm.reset()
    start = time.perf_counter()
    for batch in batches:
        llama_thread.run(llm.eval, batch)  # where the server decodes, at the same cost of a hand-off
    return time.perf_counter() - start


def _chat_tpot(llm: llama_cpp.Llama, chat: list[Message], max_tokens: int) -> float | None:
    """Seconds per content chunk after the first of one streamed chat completion, timed as the HTTP client times
    a request; None below two chunks."""
    first, chunks = 0.0, 0
    for chunk in llm.create_chat_completion(chat, max_tokens=max_tokens, temperature=0.0, stream=True):  # type: ignore[arg-type]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):  # type: ignore[index,union-attr]
            chunks += 1
            first = first or time.perf_counter()
    return (time.perf_counter() - first) / (chunks - 1) if chunks > 1 else None
