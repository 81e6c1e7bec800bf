"""n choices of one prompt against one: output tokens/s of a chat completion with `n` > 1, over HTTP with the `openai`
client, against the same request with n = 1, measured in interleaved rounds on one server.

    .venv/bin/python benchmarks/n_choices.py --out benchmarks/results/n-choices

Each round sends every n of `--n` once, in turn, with the round's prompt (a different one each round, so no round
finds the last one's prompt cached), temperature 0.7 and a fixed seed. A request's rate is its completion tokens
over its wall time, prefill included; the report gives each n's median rate and its ratio to n = 1. Writes
`<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import openai

from adaptserve.bench.load import start_server
from adaptserve.bench.run import machine_info, short_commit

log = logging.getLogger("benchmarks.n_choices")
TOPICS = ["tides", "bridges", "violins", "glaciers", "lighthouses", "beehives", "comets", "canals", "deserts", "orchards"]


def one(client: openai.OpenAI, model: str, topic: str, n: int, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write a short paragraph about {topic}."}],
        n=n,
        temperature=0.7,
        seed=0,
        max_tokens=max_tokens,
    )
    seconds = time.perf_counter() - start
    assert reply.usage is not None and len(reply.choices) == n
    tokens = reply.usage.completion_tokens
    return {"n": n, "topic": topic, "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_second": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/n-choices")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if 1 not in args.n or args.rounds < 1:
        parser.error("--n must include 1 (the baseline) and --rounds must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slots = ["--n-slots", str(max(args.n))]
    server = start_server([args.model], args.threads, out / "server.log", slots)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        rows = [one(client, args.model, TOPICS[r % len(TOPICS)], n, args.max_tokens) for r in range(args.rounds) for n in args.n]
    finally:
        server.stop()
    medians = {n: statistics.median(r["tokens_per_second"] for r in rows if r["n"] == n) for n in args.n}
    machine = machine_info()
    summary = {
        "machine": machine,
        "commit": short_commit(machine),
        "config": vars(args),
        "median_tokens_per_second": medians,
        "ratio_to_one": {n: medians[n] / medians[1] for n in args.n},
        "requests": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    for n in args.n:
        log.info("n=%d: %.1f tokens/s (%.2fx n=1)", n, medians[n], medians[n] / medians[1])


def markdown(summary: dict[str, Any]) -> str:
    config, machine = summary["config"], summary["machine"]
    lines = [
        f"{config['model']}, {config['threads']} llama.cpp threads, {config['rounds']} rounds of chat completions "
        f"(temperature 0.7, up to {config['max_tokens']} tokens per choice); commit {summary['commit']}; {machine['cpu']}.",
        "",
        "| n | median output tokens/s (prefill included) | x n = 1 |",
        "|---|---|---|",
    ]
    for n, rate in summary["median_tokens_per_second"].items():
        lines.append(f"| {n} | {rate:.1f} | {summary['ratio_to_one'][n]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
