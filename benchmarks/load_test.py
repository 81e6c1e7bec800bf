"""A bounded load test on loopback: many clients, mixed good and bad requests, some hanging up mid-stream.

    .venv/bin/python benchmarks/load_test.py --clients 32 --requests 1000 --out benchmarks/results/reliability

Without `--url` it starts its own `adaptserve serve` (SmolLM2-135M, `--threads`, no UI) and measures that process's
resident memory; with `--url` (and `--pid`, to read the memory) it drives a server already running. Each client
sends requests back to back, drawn from a fixed mix (chat, completion, both streamed, FinQA, malformed JSON,
invalid fields, clients that hang up after two chunks). Passes when no request got a 5xx other than a 503 with
Retry-After (a clean refusal from a full queue), every well-formed request was answered or cleanly refused,
every bad one got a 4xx with an error body, every stream ended with [DONE], and the server's RSS after the run
is within 10% of its RSS after warm-up. Writes `<out>/<name>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adaptserve import finqa
from adaptserve.bench.load import free_port, launch

log = logging.getLogger("benchmarks.load_test")
RSS_TOLERANCE = 0.10
# kind -> weight in the mix
MIX = {
    "chat": 25,
    "completion": 20,
    "chat_stream": 15,
    "completion_stream": 5,
    "finqa": 10,
    "malformed_json": 8,
    "invalid_field": 7,
    "disconnect": 10,
}
BAD = {"malformed_json", "invalid_field"}
TOPICS = ["colors", "rivers", "prime numbers", "planets", "trees", "bridges", "violins", "tides"]


@dataclass
class Outcome:
    kind: str
    status: int
    ok: bool  # what the request should get: an answer or a clean refusal, or a 4xx for bad input
    why: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    clients: int
    requests: int
    max_tokens: int
    wall_seconds: float
    by_kind: dict[str, dict[str, int]]
    server_errors: int  # 5xx other than a clean 503
    refused: int  # 429/503 with Retry-After
    failures: list[str]
    rss_after_warmup_bytes: int | None
    rss_after_run_bytes: int | None
    rss_growth: float | None
    healthy_after: bool
    passed: bool = False
    latency_seconds: dict[str, float] = field(default_factory=dict)


def rss_bytes(pid: int | None) -> int | None:
    status = Path(f"/proc/{pid}/status")
    if pid is None or not status.is_file():
        return None
    line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def request_for(kind: str, rng: random.Random, max_tokens: int, record: finqa.FinQARecord) -> tuple[str, Any]:
    """(path, JSON body or raw bytes) for one request of this kind."""
    topic = rng.choice(TOPICS)
    messages = [{"role": "user", "content": f"Name {rng.randint(2, 5)} {topic}."}]
    sampling = {"max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.7]), "seed": rng.randint(0, 99)}
    if kind in ("chat", "chat_stream", "disconnect"):
        return "/v1/chat/completions", {"messages": messages, "stream": kind != "chat", **sampling}
    if kind in ("completion", "completion_stream"):
        return "/v1/completions", {"prompt": f"A short note on {topic}:", "stream": kind != "completion", **sampling}
    if kind == "finqa":
        fields = {"question": record.question, "table": record.table, "pre_text": record.pre_text[:2]}
        return "/v1/finqa", {**fields, "max_tokens": 2 * max_tokens}
    if kind == "malformed_json":
        return "/v1/chat/completions", rng.choice([b'{"messages": [', b"", b"\xff\xfe", b'{"prompt": "x",}', b"null"])
    bad = rng.choice(
        [
            {"messages": messages, "max_tokens": -1},
            {"messages": messages, "temperature": "hot"},
            {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": messages, "n": 17},
            {"messages": messages, "model": "../../etc/passwd"},
            {"prompt": [{"text": "a"}]},
            {"messages": messages, "stop": ["x"] * 9},
        ]
    )
    return ("/v1/completions" if "prompt" in bad else "/v1/chat/completions"), bad


async def one(client: httpx.AsyncClient, kind: str, path: str, body: Any) -> Outcome:
    start = time.perf_counter()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    streamed = isinstance(body, dict) and body.get("stream", False)
    async with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        if kind == "disconnect" and r.status_code == 200:
            async for _ in aiter_limit(r.aiter_lines(), 2):
                pass
            return Outcome(kind, r.status_code, True, seconds=time.perf_counter() - start)  # hung up
        text = (await r.aread()).decode("utf-8", "replace")
    outcome = Outcome(kind, r.status_code, False, seconds=time.perf_counter() - start)
    if r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers):
        outcome.why = f"{kind}: {r.status_code} {text[:200]}"
    elif kind in BAD:
        outcome.ok = 400 <= r.status_code < 500 and "error" in json.loads(text)
        outcome.why = "" if outcome.ok else f"{kind}: expected a 4xx error body, got {r.status_code} {text[:200]}"
    elif r.status_code in (429, 503):
        outcome.ok = True  # refused cleanly, with Retry-After (checked above)
    elif r.status_code != 200:
        outcome.why = f"{kind}: {r.status_code} {text[:200]}"
    elif streamed and not text.rstrip().endswith("data: [DONE]"):
        outcome.why = f"{kind}: stream did not end with [DONE]: {text[-200:]}"
    else:
        outcome.ok = True
    return outcome


async def aiter_limit(it: Any, n: int) -> Any:
    async for item in it:
        if n <= 0:
            return
        n -= 1
        yield item


async def drive(url: str, kinds: list[str], clients: int, max_tokens: int, headers: dict[str, str], seed: int) -> list[Outcome]:
    record = finqa.load_finqa(split="test")[0]
    work: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, kind in enumerate(kinds):
        work.put_nowait((i, kind))
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not work.empty():
            i, kind = work.get_nowait()
            path, body = request_for(kind, random.Random(seed * 100_003 + i), max_tokens, record)
            try:
                outcomes.append(await one(client, kind, path, body))
            except httpx.HTTPError as err:  # a connection the server dropped: the worst failure
                outcomes.append(Outcome(kind, 0, False, f"{kind}: {type(err).__name__}: {err}"))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return outcomes


def run(url: str, pid: int | None, clients: int, requests: int, max_tokens: int, api_key: str | None, seed: int) -> Report:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    warmup = [kind for kind in MIX for _ in range(2)]
    asyncio.run(drive(url, warmup, clients, max_tokens, headers, seed + 1))
    rss_warm = rss_bytes(pid)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=requests)
    start = time.perf_counter()
    outcomes = asyncio.run(drive(url, kinds, clients, max_tokens, headers, seed))
    wall = time.perf_counter() - start
    time.sleep(1.0)  # let the engine drop what the hung-up clients left
    rss_after = rss_bytes(pid)
    healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[str(o.status)] += 1  # type: ignore[index]
    growth = (rss_after - rss_warm) / rss_warm if rss_warm and rss_after else None
    latencies = sorted(o.seconds for o in outcomes if o.kind not in BAD)
    report = Report(
        clients=clients,
        requests=requests,
        max_tokens=max_tokens,
        wall_seconds=round(wall, 2),
        by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
        server_errors=sum(o.status >= 500 and o.status != 503 for o in outcomes),
        refused=sum(o.status in (429, 503) for o in outcomes),
        failures=[o.why for o in outcomes if not o.ok],
        rss_after_warmup_bytes=rss_warm,
        rss_after_run_bytes=rss_after,
        rss_growth=round(growth, 4) if growth is not None else None,
        healthy_after=healthy,
        latency_seconds={q: round(latencies[int(p * (len(latencies) - 1))], 3) for q, p in (("p50", 0.5), ("p99", 0.99))}
        if latencies
        else {},
    )
    report.passed = not report.failures and healthy and (growth is None or abs(growth) <= RSS_TOLERANCE)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server; default: start one")
    parser.add_argument("--pid", type=int, help="the running server's process id, to read its memory")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the server it starts")
    parser.add_argument("--queue-size", type=int, default=64, help="--queue-size of the server it starts")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="load_test", help="the results file is <out>/<name>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    server = None
    if args.url is None:
        out = args.out or Path(".")
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = [sys.executable, "-m", "adaptserve", "serve", "--models", "smollm2-135m", "--port", str(port)]
        cmd += ["--no-ui", "--n-threads", str(args.threads), "--queue-size", str(args.queue_size)]
        server = launch(cmd, f"http://127.0.0.1:{port}", "smollm2-135m", out / "load_test_server.log")
        args.url, args.pid = server.url, server.process.pid
    try:
        report = run(args.url, args.pid, args.clients, args.requests, args.max_tokens, args.api_key, args.seed)
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(asdict(report), indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(text + "\n")
    log.info("%s", text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
