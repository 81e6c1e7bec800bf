"""Perplexity of a GGUF on a text file, computed the way llama.cpp's `llama-perplexity` computes it, so that numbers
are comparable with the ones published for llama.cpp quantizations.

The whole text is tokenized once (with BOS where the vocabulary adds one) and cut into non-overlapping chunks of
n_ctx tokens; a trailing partial chunk is dropped. Each chunk is evaluated from an empty context, its first token
replaced by BOS where the vocabulary adds one. Only the second half of each chunk is scored, so that every scored
token has at least n_ctx/2 tokens of context: the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens at
n_ctx/2+1 .. n_ctx-1 (n_ctx/2 - 1 tokens per chunk for an even n_ctx, as in llama.cpp's `process_logits`).
PPL = exp(mean NLL); its uncertainty is llama.cpp's: ppl * sqrt(var(NLL) / (count - 1)).

The model runs with the server's llama.cpp settings, its K/V cache type included, so the number is the served
model's. Where those differ from llama-perplexity's defaults (its f16 cache, flash attention on for CPU), the change
on SmolLM2 is well inside the uncertainty (benchmarks/serving.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np
from tqdm import tqdm

from adaptserve import llama_thread
from adaptserve.bench.config import BenchError
from adaptserve.models import ModelSpec
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs


@dataclass(frozen=True)
class Perplexity:
    model: str
    gguf: str
    ppl: float
    error: float  # llama.cpp's "+/-": the standard error of the mean NLL, propagated through exp
    tokens_scored: int
    chunks: int
    n_ctx: int
    text_tokens: int  # the whole text; the chunks cover chunks * n_ctx of them
    seconds: float  # evaluation and scoring, without model load and tokenization


def chunks(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping n_ctx-token chunks, the first token of each replaced by `bos` (None: left as is)."""
    out = [tokens[start : start + n_ctx] for start in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    return [[bos, *chunk[1:]] for chunk in out] if bos is not None else out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] per row, in float64 (llama.cpp sums in double too)."""
    x = logits.astype(np.float64)
    picked = x[np.arange(len(targets)), targets]
    top = x.max(axis=1)
    x -= top[:, None]
    np.exp(x, out=x)  # in place: the vocabulary-wide rows are the memory here (256 x 262k doubles for Gemma)
    return top + np.log(x.sum(axis=1)) - picked


def estimate(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its uncertainty) exactly as llama.cpp's `perplexity` prints `PPL = %.4lf +/- %.5lf`."""
    mean = float(nll.mean())
    variance = float((nll * nll).mean()) - mean * mean
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(max(variance, 0.0) / (len(nll) - 1))  # variance < 0 only by rounding


def perplexity(
    model: str,
    spec: ModelSpec,
    text: bytes,
    n_ctx: int,
    threads: int | None,
    max_chunks: int | None = None,
    kv_cache: str = DEFAULT_KV_CACHE,
) -> Perplexity:
    llm = llama_thread.open_model(spec, threads, n_ctx=n_ctx, n_batch=n_ctx, **kv_cache_kwargs(kv_cache))
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    try:
        tokens = llm.tokenize(text, add_bos=True, special=False)  # = llama.cpp's common_tokenize(ctx, text, true)
        if len(tokens) < 2 * n_ctx:
            raise BenchError(
                f"ppl: {model} tokenizes the text to {len(tokens)} tokens, but perplexity with a context of {n_ctx} "
                f"needs at least {2 * n_ctx}: use a longer text or a smaller ppl_ctx"
            )
        adds_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
        first = n_ctx // 2
        start = time.perf_counter()
        nll: list[np.ndarray] = []
        with tqdm(
            chunks(tokens, n_ctx, llm.token_bos() if adds_bos else None)[:max_chunks], desc=f"ppl {model}", unit="chunk"
        ) as bar:
            for chunk in bar:
                logits = _decode(llm, batch, chunk, first)
                nll.append(token_nll(logits[:-1], np.asarray(chunk[first + 1 :])))
                bar.set_postfix(ppl=f"{math.exp(np.concatenate(nll).mean()):.4f}")  # the running value llama.cpp prints
        seconds = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.close()
    scored = np.concatenate(nll)
    ppl, error = estimate(scored)
    return Perplexity(
        model=model,
        gguf=llama_thread.gguf_name(spec),
        ppl=round(ppl, 4),
        error=round(error, 5),
        tokens_scored=len(scored),
        chunks=len(nll),
        n_ctx=n_ctx,
        text_tokens=len(tokens),
        seconds=round(seconds, 2),
    )


def _decode(llm: llama_cpp.Llama, batch: llama_cpp.llama_batch, chunk: list[int], first: int) -> np.ndarray:
    """The logits at positions first.. of `chunk`, decoded as one batch from an empty context. Like llama.cpp, only
    those positions ask for logits: the vocabulary-wide output layer is then not run for the context half, as
    `Llama(logits_all=True)` would run it, at a cost in time per chunk (benchmarks/serving.md)."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    for i, token in enumerate(chunk):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, i >= first
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(chunk)
    if llama_thread.run(llama_cpp.llama_decode, llm.ctx, batch) != 0:
        raise RuntimeError(f"llama_decode failed on a {len(chunk)}-token chunk")
    # outputs are stored contiguously, in batch order, for the positions that asked for them
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(len(chunk) - first, llm.n_vocab()))
