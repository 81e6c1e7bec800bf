"""The single server against the same app on Ray Serve: what Ray's proxy and the ingress hop cost, and what a second
replica buys. Side by side in one run: `adaptserve serve` and `--ray --replicas 1` running together, then the
single server and `--ray --replicas 2`, every replica at the same llama.cpp threads,
measured by the same streamed chat load at each concurrency, the servers taking turns. Then a fault:
two replicas under a mixed load (base and two adapters, chat and completions, streamed and not), one SIGKILLed.

    .venv/bin/python benchmarks/cluster.py --out benchmarks/results/cluster     # ~15 min on 2 cores

Writes `<out>/cluster.json` and `<out>/cluster.md`: output tokens/s, p50 time to first token and their ratios to the
single server; the fault's outcome counts and the time until a replacement replica answered; the host's CPU flags
and the commit measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from adaptserve.bench.load import free_port, launch, run_level, start_server, stream_chat_blocking
from adaptserve.bench.run import machine_info, short_commit

log = logging.getLogger("benchmarks.cluster")
MODEL = "smollm2-135m"
ADAPTERS = ["smollm2-135m-finqa", "smollm2-135m-finqa@lora"]
REPLICA = "x-adaptserve-replica"
MIN_REQUESTS = 12  # per level: a p50 of fewer is one noisy request on a shared machine
PAIRS = 60  # requests to each server in the paired time-to-first-token measurement
PROMPTS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "What is a balance sheet?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain compound interest in two sentences."}],
]


def ray_server(replicas: int, threads: int, log_path: Path, models: list[str] = [MODEL]) -> Any:  # noqa: B006
    port = free_port()
    cmd = [sys.executable, "-m", "adaptserve", "serve", "--ray", "--replicas", str(replicas), "--n-threads", str(threads)]
    cmd += ["--models", *models, "--port", str(port), "--no-ui"]
    return launch(cmd, f"http://127.0.0.1:{port}", MODEL, log_path)


def idle_cores(pid: int, seconds: float = 10.0) -> float:
    """CPU cores a server's process tree (for Ray: the whole local cluster) uses while it serves nothing."""

    def used() -> float:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    before = used()
    time.sleep(seconds)
    return round((used() - before) / seconds, 3)


def paired_ttft(reference: Any, other: Any, pairs: int) -> dict[str, Any]:
    """Added time to first token, measured in pairs: one request to each server back to back, the order alternating,
    so the other jobs' load, which drifts over seconds on a shared machine, falls on both members of a pair alike.
    Also the round trip of `GET /health` (no model work): what the hops alone cost."""

    def ttft(server: Any, i: int) -> float:
        result = stream_chat_blocking(server.url, MODEL, PROMPTS[i % len(PROMPTS)], 4)
        if result.ttft is None:
            raise RuntimeError(f"no first token from {server.url}: {result.error}")
        return result.ttft

    def health(server: Any) -> float:
        start = time.perf_counter()
        httpx.get(f"{server.url}/health", timeout=30).raise_for_status()
        return time.perf_counter() - start

    added, hop = [], []
    for i in range(pairs):
        order = (reference, other) if i % 2 == 0 else (other, reference)
        times = {server.url: ttft(server, i) for server in order}  # in that order
        added.append(times[other.url] - times[reference.url])
        hop.append(health(other) - health(reference))
    ms = 1000 * np.asarray(added)
    low, high = np.percentile([np.median(np.random.default_rng(i).choice(ms, ms.size)) for i in range(1000)], [2.5, 97.5])
    return {
        "pairs": pairs,
        "added_ttft_ms_p50": round(float(np.median(ms)), 1),
        "added_ttft_ms_p50_ci95": [round(float(low), 1), round(float(high), 1)],
        "added_health_ms_p50": round(1000 * float(np.median(hop)), 1),
    }


def compare(
    servers: dict[str, Any], levels: list[int], per_client: int, max_tokens: int, rounds: int, pairs: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each level on each server in turn, `rounds` times, so the machine's other load falls on all of them alike;
    and the paired time to first token of each server against the first."""
    runs: dict[tuple[str, int], list[Any]] = {}
    try:
        idle = {name: idle_cores(server.process.pid) for name, server in servers.items()}
        for server in servers.values():
            asyncio.run(run_level(server.url, MODEL, PROMPTS, 2, 4, max_tokens))  # warm-up: each replica's first request
        reference, *others = servers
        paired = {name: paired_ttft(servers[reference], servers[name], pairs) for name in others}
        log.info("paired time to first token against %s: %s", reference, paired)
        for _ in range(rounds):
            for clients in levels:
                for name, server in servers.items():
                    requests = max(clients * per_client, MIN_REQUESTS)
                    level, _ = asyncio.run(run_level(server.url, MODEL, PROMPTS, clients, requests, max_tokens))
                    log.info(
                        "%s at %d clients: %.1f tokens/s, p50 TTFT %.3f s",
                        name,
                        clients,
                        level.tokens_per_second,
                        level.ttft["p50"],
                    )
                    runs.setdefault((name, clients), []).append(level)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (name, clients), levels_run in runs.items():
        tokens, wall = sum(r.output_tokens for r in levels_run), sum(r.wall_seconds for r in levels_run)
        rows.append(
            {
                "server": name,
                "clients": clients,
                "requests": sum(r.requests for r in levels_run),
                "errors": sum(r.errors for r in levels_run),
                "tokens_per_second": round(tokens / wall, 2),
                "ttft_p50_by_round": [r.ttft["p50"] for r in levels_run],
                "ttft_p50": float(np.median([r.ttft["p50"] for r in levels_run])),
                "idle_cores": idle[name],
                "cold_start_s": round(servers[name].cold_start_seconds, 1),
            }
        )
    return rows, paired


async def _mixed(client: httpx.AsyncClient, i: int, seen: dict[str, float]) -> str:
    """One request of the fault's load; its outcome: ok, 503+retry-after, hung, or what else came back."""
    body: dict[str, Any] = {"model": [MODEL, *ADAPTERS][i % 3], "max_tokens": 32, "stream": i % 2 == 0}
    route = "/v1/chat/completions" if i % 4 < 2 else "/v1/completions"
    body |= {"messages": PROMPTS[i % len(PROMPTS)]} if i % 4 < 2 else {"prompt": "The quarterly report shows"}
    try:
        r = await client.post(route, json=body)
    except httpx.TimeoutException:
        return "hung"
    except httpx.HTTPError as err:
        return f"broken: {type(err).__name__}"
    seen.setdefault(r.headers.get(REPLICA, ""), time.monotonic())
    if r.status_code == 503 and r.headers.get("retry-after"):
        return "503+retry-after"
    if r.status_code != 200:
        return f"status {r.status_code}"
    if body["stream"]:
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        if events[-1:] != ["data: [DONE]"]:
            return "stream without [DONE]"
        if any('"error"' in e for e in events):
            return "stream ended by an error event"
    return "ok"


def fault(threads: int, requests: int, clients: int, out: Path) -> dict[str, Any]:
    """SIGKILL one of two replicas a third of the way into `requests` mixed requests; count outcomes, time the
    replacement (the first replica id not seen before the kill to answer)."""
    server = ray_server(2, threads, out / "fault.log", [MODEL, *ADAPTERS])
    seen: dict[str, float] = {}  # replica id: when it first answered

    async def load() -> tuple[list[str], float, set[str]]:
        pending = list(range(requests))
        outcomes: list[str] = []

        async def client_loop(client: httpx.AsyncClient) -> None:
            while pending:
                outcomes.append(await _mixed(client, pending.pop(0), seen))

        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120.0)) as client:
            loops = asyncio.gather(*(client_loop(client) for _ in range(clients)))
            while len(outcomes) < requests // 3:
                await asyncio.sleep(0.2)
            replicas = [
                p for p in psutil.Process(server.process.pid).children(recursive=True) if "ModelReplica" in " ".join(p.cmdline())
            ]
            replicas[0].kill()
            killed, before = time.monotonic(), set(seen)
            await loops
        return outcomes, killed, before

    try:
        outcomes, killed, before = asyncio.run(load())
        while time.monotonic() - killed < 120 and not set(seen) - before:
            seen.setdefault(httpx.get(f"{server.url}/health", timeout=10).headers.get(REPLICA, ""), time.monotonic())
            time.sleep(0.2)
        new = [at for replica, at in seen.items() if replica not in before]
        replaced = round(min(new) - killed, 1) if new else None
    finally:
        server.stop()
    result = {"requests": requests, "clients": clients, "outcomes": dict(Counter(outcomes)), "replacement_serving_s": replaced}
    log.info("fault: %s", result)
    return result


def host() -> dict[str, Any]:
    machine = machine_info()
    return {"cpu_flags": machine["cpu_flags"], "commit": short_commit(machine), "python": machine["python"]}


def report(rows: list[dict[str, Any]], paired: dict[str, Any], meta: dict[str, Any], killed: dict[str, Any]) -> str:
    single = {r["clients"]: r for r in rows if r["server"] == "single"}  # ray x1's reference; ray x2's is "single (2nd)"
    second = {r["clients"]: r for r in rows if r["server"] == "single (2nd)"}
    lines = [
        f"# Single server vs Ray Serve ({MODEL}, {meta['threads']} llama.cpp thread per replica)",
        "",
        f"Commit {meta['commit']}, CPU flags {' '.join(meta['cpu_flags'])}, {meta['max_tokens']} tokens per request, "
        f"{meta['rounds']} rounds of each level, servers taking turns within a round. Ratios are to the single server "
        "at the same concurrency; TTFT is the median of the rounds' p50s; idle: CPU cores the server's processes "
        "(for Ray, its whole local cluster) use serving nothing.",
        "",
        "| server | clients | output tokens/s | x single | p50 TTFT ms | + vs single ms | errors | idle cores | cold start s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = (second if r["server"] in ("ray x2", "single (2nd)") else single)[r["clients"]]
        ttft, base_ttft = r["ttft_p50"] * 1000, base["ttft_p50"] * 1000
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / base['tokens_per_second']:.2f} | {ttft:.0f} | {ttft - base_ttft:+.0f} | "
            f"{r['errors']} | {r['idle_cores']} | {r['cold_start_s']} |"
        )
    lines += [
        "",
        f"## Added time to first token, paired ({meta['pairs']} pairs of 4-token streamed chats, one client)",
        "",
        "Each pair sends one request to the single server and one to Ray Serve back to back, alternating which goes first;",
        "the added time is the median of the pairs' differences (95% bootstrap interval). `GET /health` does no model",
        "work: its added round trip is what the hops alone cost.",
        "",
        "| server | against | added p50 TTFT ms | 95% interval | added /health ms |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {'single (2nd)' if name == 'ray x2' else 'single'} | {p['added_ttft_ms_p50']:+.1f} | "
            f"{p['added_ttft_ms_p50_ci95'][0]:+.1f} to {p['added_ttft_ms_p50_ci95'][1]:+.1f} | {p['added_health_ms_p50']:+.1f} |"
            for name, p in paired.items()
        ),
        "",
        f"## A replica killed under load: {killed['requests']} mixed requests, {killed['clients']} clients, two replicas",
        "",
        "| outcome | requests |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(killed["outcomes"].items())),
        "",
        f"A replacement replica answered {killed['replacement_serving_s']} s after the SIGKILL.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cluster"))
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the single server and each replica")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8], help="concurrent clients")
    parser.add_argument("--per-client", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="times each level runs on each server, in turn")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="request pairs of the paired time-to-first-token test")
    parser.add_argument("--fault-requests", type=int, default=200, help="requests of the load a replica is killed under")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    run = (args.levels, args.per_client, args.max_tokens, args.rounds, args.pairs)
    single = start_server([MODEL], args.threads, args.out / "single.log")
    rows, paired = compare({"single": single, "ray x1": ray_server(1, args.threads, args.out / "ray-1.log")}, *run)
    # two replicas, with the single server again as their ratios' reference
    servers = {"single (2nd)": start_server([MODEL], args.threads, args.out / "single.log")}
    servers["ray x2"] = ray_server(2, args.threads, args.out / "ray-2.log")
    more_rows, more_paired = compare(servers, *run)
    rows, paired = rows + more_rows, paired | more_paired
    killed = fault(args.threads, args.fault_requests, 8, args.out)
    meta = {
        **host(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "per_client": args.per_client,
        "rounds": args.rounds,
        "pairs": args.pairs,
    }
    (args.out / "cluster.json").write_text(
        json.dumps({"meta": meta, "levels": rows, "paired_ttft": paired, "fault": killed}, indent=2) + "\n"
    )
    (args.out / "cluster.md").write_text(report(rows, paired, meta, killed))
    log.info("wrote %s", args.out / "cluster.md")


if __name__ == "__main__":
    main()
