"""How the slots store K/V (`serve --kv-cache f16|q8_0`): memory, prompt processing and decoding speed.

    .venv/bin/python benchmarks/kv_cache.py --out benchmarks/results/kv-cache

For each served model (the base's Q4_1 GGUF, the adapter's cached q4_k_m export) and each cache type, a KVSlots is
set up as `adaptserve serve` sets one up (4 slots x 2048 tokens by default) and measured with bare llama_decode
calls, no sampling or HTTP around them:
- memory: growth of the process's resident set while the context is created (llama.cpp clears the whole cache
  then, so this is what the cache and its compute buffers cost whether used or not);
- prompt processing: a `--prompt-tokens` prompt decoded in prefill chunks, as the engine feeds it;
- decoding: one and `--slots` sequences advancing a token per call, with a short (64-token) and a long
  (`--prompt-tokens`) prompt behind each.
Rounds alternate the cache types, so a disturbance of the host hits both; the median of `--rounds` is reported.
Writes `<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import llama_cpp
import psutil

from adaptserve import llama_thread
from adaptserve.bench.run import machine_info
from adaptserve.bench.speed import served_model
from adaptserve.models import default_models
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.engine import DEFAULT_CTX, DEFAULT_PREFILL_CHUNK, DEFAULT_SLOTS
from adaptserve.serve.kvslots import KV_CACHE_TYPES, Feed, KVSlots

log = logging.getLogger("benchmarks.kv_cache")
TEXT = b"Net revenue rose from $ 5,735 million in 2014 to $ 5,829 million in 2015, while operating costs fell 12%. "


def measure(llm: llama_cpp.Llama, kv_cache: str, slots: int, n_ctx: int, long_prompt: list[int], steps: int) -> dict[str, float]:
    rss = psutil.Process().memory_info().rss
    kv = KVSlots(llm, slots, n_ctx, max_batch=max(DEFAULT_PREFILL_CHUNK, slots), kv_cache=kv_cache)
    result = {"context_mib": (psutil.Process().memory_info().rss - rss) / 2**20}
    try:
        for context, prompt in (("short", long_prompt[:64]), ("long", long_prompt)):
            for slot in kv.slots:
                kv.reset(slot)
            tick = time.perf_counter()
            for slot in kv.slots:
                for start in range(0, len(prompt), DEFAULT_PREFILL_CHUNK):
                    kv.decode([Feed(slot, prompt[start : start + DEFAULT_PREFILL_CHUNK], logits=False)])
            if context == "long":
                result["prompt_tokens_per_second"] = slots * len(prompt) / (time.perf_counter() - tick)
            for batch in (1, slots):
                tick = time.perf_counter()
                for step in range(steps):
                    kv.decode([Feed(slot, (1000 + step,), logits=True) for slot in kv.slots[:batch]])
                result[f"decode_{batch}x_{context}"] = batch * steps / (time.perf_counter() - tick)
    finally:
        kv.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=default_models())
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS)
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_CTX, help="tokens per slot")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32, help="decode calls per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv-cache"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rows = []
    for name in args.models:
        llm = llama_thread.open_model(served_model(name, ServeConfig.adapter_quant, args.threads), args.threads, n_ctx=256)
        long_prompt = llm.tokenize(TEXT * (args.prompt_tokens // 20 + 1))[: args.prompt_tokens]
        runs: dict[str, list[dict[str, float]]] = {kv: [] for kv in KV_CACHE_TYPES}
        for _ in range(args.rounds):
            for kv_cache, measured in runs.items():
                measured.append(measure(llm, kv_cache, args.slots, args.n_ctx, long_prompt, args.steps))
                log.info("%s %s %s", name, kv_cache, {k: round(v, 1) for k, v in measured[-1].items()})
        llm.close()
        for kv_cache, measured in runs.items():
            medians = {key: round(statistics.median(m[key] for m in measured), 1) for key in measured[0]}
            rows.append({"model": name, "kv_cache": kv_cache, **medians})
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "slots": args.slots,
        "n_ctx": args.n_ctx,
        "prompt_tokens": args.prompt_tokens,
        "prefill_chunk": DEFAULT_PREFILL_CHUNK,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": machine_info(),
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(summary))
    log.info("wrote %s", args.out / "results.md")


def markdown(summary: dict[str, Any]) -> str:
    n, p = summary["slots"], summary["prompt_tokens"]
    lines = [
        f"K/V cache types on {summary['slots']} slots x {summary['n_ctx']} tokens, {summary['threads']} threads, "
        f"median of {summary['rounds']} interleaved rounds; tokens/s of bare llama_decode calls.",
        "",
        f"| model | --kv-cache | context memory | prompt processing ({p} tokens) | decode 1 seq, 64-token prompt | "
        f"decode {n} seqs, 64-token prompts | decode 1 seq, {p}-token prompt | decode {n} seqs, {p}-token prompts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {r['kv_cache']} | {r['context_mib']:.0f} MiB | {r['prompt_tokens_per_second']:.0f} | "
            f"{r['decode_1x_short']:.0f} | {r[f'decode_{n}x_short']:.0f} | {r['decode_1x_long']:.0f} | {r[f'decode_{n}x_long']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
