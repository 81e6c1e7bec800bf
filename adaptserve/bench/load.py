"""Latency and throughput against any OpenAI-compatible server: streamed chat requests at a given concurrency.

Each request streams (SSE) so that time to first token is seen as a client sees it. Output tokens are the content
chunks received (one token per chunk on llama.cpp-based servers); where the server sends usage
(`stream_options.include_usage`), its count is kept too, so the two can be checked against each other.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

log = logging.getLogger(__name__)

Message = dict[str, str]


class ServerGone(ConnectionError):
    """The server under test stopped accepting connections (crashed, killed): a run reports it and keeps what it had
    measured."""


@dataclass(frozen=True)
class RequestResult:
    status: int
    error: str | None
    ttft: float | None  # seconds from sending to the first content chunk
    e2e: float  # seconds from sending to the end of the stream
    tokens: int  # content chunks received
    usage_tokens: int | None  # completion_tokens the server reported, if it did
    text: str = ""  # the content received

    @property
    def tpot(self) -> float | None:
        """Seconds per content chunk after the first; None for a failed request or one below two chunks."""
        return (
            (self.e2e - self.ttft) / (self.tokens - 1)
            if self.error is None and self.ttft is not None and self.tokens > 1
            else None
        )


@dataclass
class LevelResult:
    model: str
    concurrency: int
    requests: int
    errors: int
    wall_seconds: float
    output_tokens: int
    usage_tokens: int | None
    tokens_per_second: float  # aggregate output tokens over the level's wall time
    requests_per_second: float
    ttft: dict[str, float] = field(default_factory=dict)  # p50/p95/p99 seconds
    tpot: dict[str, float] = field(default_factory=dict)  # time per output token after the first
    e2e: dict[str, float] = field(default_factory=dict)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {
        "p50": round(float(p50), 4),
        "p95": round(float(p95), 4),
        "p99": round(float(p99), 4),
        "mean": round(float(np.mean(values)), 4),
    }


@dataclass
class _Stream:
    """What one streamed chat request has received so far."""

    start: float
    ttft: float | None = None
    tokens: int = 0
    usage: int | None = None
    text: str = ""

    def add(self, line: str) -> str | None:
        """Takes one SSE line; returns the error it reports, if it is one (a stream that failed after its headers,
        on a timeout or a decode error, says so in-band)."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return None
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return f"in-stream error: {json.dumps(chunk['error'])[:200]}"
        if chunk.get("usage"):
            self.usage = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices", []):
            if content := choice.get("delta", {}).get("content"):
                self.tokens += 1
                self.text += content
                self.ttft = self.ttft if self.ttft is not None else time.perf_counter() - self.start
        return None

    def result(self, status: int, error: str | None = None) -> RequestResult:
        return RequestResult(status, error, self.ttft, time.perf_counter() - self.start, self.tokens, self.usage, self.text)


def _chat_body(model: str, messages: list[Message], max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, messages: list[Message], max_tokens: int) -> RequestResult:
    stream = _Stream(time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=_chat_body(model, messages, max_tokens)) as response:
            if response.status_code != 200:
                return stream.result(response.status_code, (await response.aread()).decode(errors="replace")[:200])
            async for line in response.aiter_lines():
                if error := stream.add(line):
                    return stream.result(response.status_code, error)
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return stream.result(0, f"{type(err).__name__}: {err}")
    return stream.result(200)


def stream_chat_blocking(url: str, model: str, messages: list[Message], max_tokens: int, timeout: float = 600.0) -> RequestResult:
    """`stream_chat` on a plain blocking connection, for timing one request at a time with the least client work:
    asyncio and httpx take enough CPU per token to slow a server that shares the client's cores
    (benchmarks/serving.md)."""
    parts = urlsplit(url)
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    stream = _Stream(time.perf_counter())
    try:
        body = json.dumps(_chat_body(model, messages, max_tokens))
        conn.request("POST", f"{parts.path.rstrip('/')}/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return stream.result(response.status, response.read().decode(errors="replace")[:200])
        while line := response.readline():
            if error := stream.add(line.decode().rstrip("\r\n")):
                return stream.result(response.status, error)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
        return stream.result(0, f"{type(err).__name__}: {err}")
    finally:
        conn.close()
    return stream.result(200)


async def run_level(
    url: str, model: str, conversations: Sequence[list[Message]], concurrency: int, requests: int, max_tokens: int
) -> tuple[LevelResult, list[RequestResult]]:
    """`requests` streamed requests, `concurrency` in flight at a time, prompts taken round-robin."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results.append(await stream_chat(client, url, model, conversations[i % len(conversations)], max_tokens))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    reported = [r.usage_tokens for r in ok]
    level = LevelResult(
        model=model,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        wall_seconds=round(wall, 3),
        output_tokens=tokens,
        usage_tokens=sum(reported) if reported and all(u is not None for u in reported) else None,  # type: ignore[misc]
        tokens_per_second=round(tokens / wall, 2),
        requests_per_second=round(len(ok) / wall, 3),
        ttft=percentiles([r.ttft for r in ok if r.ttft is not None]),
        tpot=percentiles([t for r in ok if (t := r.tpot) is not None]),
        e2e=percentiles([r.e2e for r in ok]),
    )
    return level, results


@dataclass
class Server:
    """An `adaptserve serve` this run started itself; cold start is process start to first answered request."""

    process: subprocess.Popen[bytes]
    url: str
    cold_start_seconds: float

    def peak_rss_bytes(self) -> int | None:
        status = Path(f"/proc/{self.process.pid}/status")
        for line in status.read_text().splitlines() if status.is_file() else []:
            if line.startswith("VmHWM:"):  # the kernel's high-water mark of the resident set, in kB
                return int(line.split()[1]) * 1024
        return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    models: Sequence[str], threads: int | None, log_path: Path, options: Sequence[str] = (), timeout: float = 600.0
) -> Server:
    """Our own server on a free loopback port, without the UI, with any further `serve` flags in `options`; waits
    until it answers a one-token request."""
    port = free_port()
    cmd = [sys.executable, "-m", "adaptserve", "serve", "--models", *models, "--port", str(port), "--no-ui", *options]
    if threads:
        cmd += ["--n-threads", str(threads)]
    return launch(cmd, f"http://127.0.0.1:{port}", models[0], log_path, timeout)


def launch(cmd: Sequence[str], url: str, model: str, log_path: Path, timeout: float = 600.0) -> Server:
    """Start any OpenAI-compatible server command listening at `url`; returns once `model` answers a one-token chat."""
    start = time.perf_counter()
    with log_path.open("wb") as server_log:
        process = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200:
                return Server(process, url, time.perf_counter() - start)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"the server did not answer within {timeout:.0f}s; see {log_path}")
