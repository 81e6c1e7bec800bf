"""Continuous batching: aggregate output tokens/s through LlamaCppEngine at 1, 2, 4 and 8 concurrent clients.

    .venv/bin/python benchmarks/batching.py --out benchmarks/results/batching

For each slot count the default GGUF is loaded into its own engine, all with the same threads; `--slots 1` is the
one-request-at-a-time engine this repo had before batching. Each client sends `--requests` greedy completions back
to back, each a distinct prompt (the prefix cache saves only their first few tokens) and up to `--max-tokens` long.
Answers that end sooner make clients finish at different times, so a level's aggregate rate includes a ramp-down
where fewer requests share a step; beside it, the rate until the first client was done, while every client had a
request in (what "N concurrent clients" means in steady state). Every level is measured
`--rounds` times, interleaved across slot counts; the fastest round is reported, and beside it the median of the
rounds (on a shared host rounds of one level can differ widely, so the median ratio is the steadier verdict). Beside the
engine levels, the ceiling: llama_decode alone on the widest engine's own slots, B sequences advancing one
token per call, no sampling or Python around it; the engine's batched rate is judged against it. Writes
`<out>/results.json` and `<out>/results.md`. Timings mean something only on an otherwise idle machine: the CPU that
other processes used is recorded for every level, so a disturbed run shows as one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaptserve import llama_thread
from adaptserve.bench.run import machine_info
from adaptserve.models import resolve
from adaptserve.serve.engine import DEFAULT_PREFILL_CHUNK, SamplingParams, TextDelta
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, Feed
from adaptserve.serve.llama_engine import LlamaCppEngine

log = logging.getLogger("benchmarks.batching")
DISTURBED_CORES = 0.1  # CPU used by other processes during a level, above which its timing is suspect


@dataclass(frozen=True)
class Level:
    slots: int
    clients: int
    requests: int
    output_tokens: int
    wall_seconds: float
    tokens_per_second: float  # aggregate: all clients' output tokens over the level's wall time
    # Aggregate until the first client had all its answers: every client kept a request in, so no ramp-down (the
    # level's end, where clients whose answers ran shorter are done and fewer requests share a step).
    all_clients_tokens_per_second: float
    per_request_tokens_per_second: float  # what one client sees, on average, first token included
    mean_ttft: float  # seconds from submitting to the first token (queueing included), averaged
    other_cores: float | None  # cores kept busy by anything but this process during the level (Linux only)


async def _client(engine: LlamaCppEngine, client: int, requests: int, params: SamplingParams) -> list[tuple[int, float, float]]:
    """(completion tokens, seconds, time to first token) of each request, sent one after another.

    Times are the client's: from submitting, so time spent queued for a slot counts.
    """
    results = []
    for i in range(requests):
        prompt = engine.tokenize(f"Chapter {client * requests + i + 1}. The old lighthouse keeper")
        tick, first = time.perf_counter(), None
        async for event in engine.submit(prompt, params).events():
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
            else:
                results.append((event.completion_tokens, time.perf_counter() - tick, (first or tick) - tick))
    return results


def measure(engine: LlamaCppEngine, clients: int, requests: int, max_tokens: int) -> Level:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    busy, own = _busy_cpu_seconds(), time.process_time()

    first_done: list[tuple[float, int]] = []  # when the first client was done, and the engine's tokens by then

    async def client(c: int) -> list[tuple[int, float, float]]:
        results = await _client(engine, c, requests, params)
        if not first_done:
            first_done.append((time.perf_counter(), engine.tokens_generated))
        return results

    async def run() -> list[tuple[int, float, float]]:
        per_client = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in per_client for r in rs]

    tick, generated = time.perf_counter(), engine.tokens_generated
    results = asyncio.run(run())
    wall = time.perf_counter() - tick
    done_at, done_tokens = first_done[0]
    other = None if busy is None else (_busy_cpu_seconds() - busy - (time.process_time() - own)) / wall
    tokens = sum(n for n, _, _ in results)
    return Level(
        slots=engine.n_slots,
        clients=clients,
        requests=len(results),
        output_tokens=tokens,
        wall_seconds=round(wall, 2),
        tokens_per_second=round(tokens / wall, 1),
        all_clients_tokens_per_second=round((done_tokens - generated) / (done_at - tick), 1),
        per_request_tokens_per_second=round(sum(n / s for n, s, _ in results) / len(results), 1),
        mean_ttft=round(sum(t for _, _, t in results) / len(results), 3),
        other_cores=None if other is None else round(max(other, 0.0), 2),
    )


def decode_ceiling(engine: LlamaCppEngine, batch_sizes: list[int], steps: int = 48) -> dict[int, float]:
    """Tokens/s of bare llama_decode calls with B sequences of one token each, on the engine's own (idle) slots.

    Runs on the llama.cpp thread, in turn with the engine's scheduler, as the engine's own decode steps do."""
    return llama_thread.run(_ceiling, engine, batch_sizes, steps)


def _ceiling(engine: LlamaCppEngine, batch_sizes: list[int], steps: int) -> dict[int, float]:
    rates = {}
    for size in batch_sizes:
        held = engine.slots.slots[:size]  # consecutive ids, as the engine keeps its busy slots
        for slot in held:
            engine.slots.reset(slot)
        prompts = [Feed(slot, engine.tokenize(f"Sequence {slot.seq_id}: the ledger shows"), logits=False) for slot in held]
        engine.slots.decode(prompts)
        tick = time.perf_counter()
        for step in range(steps):
            engine.slots.decode([Feed(slot, (1000 + step,), logits=True) for slot in held])
        rates[size] = round(size * steps / (time.perf_counter() - tick), 1)
    return rates


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (steal included), from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def run_rounds(
    engines: list[LlamaCppEngine], clients: list[int], rounds: int, requests: int, max_tokens: int
) -> dict[tuple[int, int], list[Level]]:
    """Every (slots, clients) level `rounds` times; a round goes over every engine in turn, so a disturbance hits
    all configurations alike rather than one."""
    for engine in engines:
        measure(engine, 1, 1, 8)  # warm-up: first graph allocation and page faults stay out of the timings
    levels: dict[tuple[int, int], list[Level]] = {}
    for _ in range(rounds):
        for n in clients:
            for engine in engines:
                level = measure(engine, n, requests, max_tokens)
                levels.setdefault((engine.n_slots, n), []).append(level)
                log.info("%s", level)
    return levels


def summarize_rounds(rounds: dict[tuple[int, int], list[Level]]) -> dict[str, Any]:
    """Each level's fastest round (the least disturbed one), and every round's rate, for the results JSON."""
    return {
        "levels": [
            asdict(max(rounds[key], key=lambda lv: lv.tokens_per_second))
            | {
                "median_tokens_per_second": round(statistics.median(lv.tokens_per_second for lv in rounds[key]), 1),
                "median_all_clients_tokens_per_second": round(
                    statistics.median(lv.all_clients_tokens_per_second for lv in rounds[key]), 1
                ),
            }
            for key in sorted(rounds)
        ],
        "all_rounds_tokens_per_second": {
            f"{s} slots, {c} clients": [lv.tokens_per_second for lv in lvs] for (s, c), lvs in sorted(rounds.items())
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--rounds", type=int, default=3, help="each level is measured this often; the fastest counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", default=DEFAULT_KV_CACHE, help="serve --kv-cache: how the slots store K/V (f16 or q8_0)")
    parser.add_argument("--out", default="benchmarks/results/batching")
    parser.add_argument("--note", default="", help="what else was going on, for the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spec = resolve(args.model)
    engines = {
        slots: LlamaCppEngine(
            spec, n_ctx=512, n_threads=args.threads, n_slots=slots, prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache
        )
        for slots in args.slots
    }
    rounds = run_rounds(list(engines.values()), args.clients, args.rounds, args.requests, args.max_tokens)
    widest = engines[max(engines)]
    sizes = sorted({1, *args.clients} & set(range(1, widest.n_slots + 1)))
    ceilings = [decode_ceiling(widest, sizes) for _ in range(args.rounds)]
    for engine in engines.values():
        engine.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": spec.name,
        "gguf": spec.path.name,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prefill_chunk": args.prefill_chunk,
        "kv_cache": args.kv_cache,
        "machine": machine_info(),
        "rounds": args.rounds,
        "note": args.note,
        **summarize_rounds(rounds),
        "decode_ceiling_tokens_per_second": {size: max(c[size] for c in ceilings) for size in sizes},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    log.info("wrote %s", out)


def markdown(summary: dict[str, Any]) -> str:
    single = {lv["slots"]: lv["tokens_per_second"] for lv in summary["levels"] if lv["clients"] == 1}
    single_median = {lv["slots"]: lv["median_tokens_per_second"] for lv in summary["levels"] if lv["clients"] == 1}
    single_busy = {lv["slots"]: lv["median_all_clients_tokens_per_second"] for lv in summary["levels"] if lv["clients"] == 1}
    unbatched = {lv["clients"]: lv["tokens_per_second"] for lv in summary["levels"] if lv["slots"] == 1}
    lines = [
        f"`{summary['gguf']}` through `LlamaCppEngine`, {summary['threads']} threads, greedy, up to {summary['max_tokens']} "
        f"output tokens per request, {summary.get('kv_cache', 'f16')} K/V cache, on {summary['machine']['cpu']} ({summary['machine']['cores']} cores); "
        f"fastest of {summary['rounds']} interleaved rounds. 1 slot is the engine before batching (one request at a time).",
        "",
        *([summary["note"], ""] if summary.get("note") else []),
        "| slots | clients | aggregate tok/s | vs 1 client | median of rounds, vs 1 client "
        "| median while every client had a request in, vs 1 client | vs 1 slot | per-request tok/s "
        "| mean TTFT (s) | other CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in summary["levels"]:
        median, busy = lv["median_tokens_per_second"], lv["median_all_clients_tokens_per_second"]
        lines.append(
            f"| {lv['slots']} | {lv['clients']} | {lv['tokens_per_second']} | "
            f"{ratio(lv['tokens_per_second'], single.get(lv['slots']))} | {median}, {ratio(median, single_median.get(lv['slots']))} | "
            f"{busy}, {ratio(busy, single_busy.get(lv['slots']))} | "
            f"{ratio(lv['tokens_per_second'], unbatched.get(lv['clients']))} | {lv['per_request_tokens_per_second']} | "
            f"{lv['mean_ttft']} | {lv['other_cores']} |"
        )
    ceiling = summary["decode_ceiling_tokens_per_second"]
    lines += [
        "",
        "The ceiling: bare `llama_decode` calls on the same context settings, B sequences one token each per call "
        "(no sampling, no Python around it), fastest of the rounds:",
        "",
        "| sequences | tok/s | vs 1 |",
        "|---|---|---|",
        *(f"| {b} | {rate} | {ratio(rate, ceiling.get(1))} |" for b, rate in ceiling.items()),
    ]
    spread = max(max(v) / min(v) - 1 for v in summary["all_rounds_tokens_per_second"].values())
    lines += ["", f"Rounds of one level differed by up to {spread:.0%} (every round is in results.json)."]
    return "\n".join(lines + disturbance(summary["levels"])) + "\n"


def disturbance(levels: list[dict[str, Any]]) -> list[str]:
    """A warning for the report when other processes used the CPU during a level."""
    busiest = max((lv["other_cores"] or 0.0) for lv in levels)
    if busiest <= DISTURBED_CORES:
        return []
    return [
        "",
        f"Other processes kept up to {busiest:.2f} cores busy during a level, so these timings are disturbed. "
        "Re-run on an idle machine for numbers to quote.",
    ]


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


if __name__ == "__main__":
    main()
