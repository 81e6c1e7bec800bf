"""Shared fixtures: a real `adaptserve serve` process on a free loopback port, driven over real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = [sys.executable, "-m", "adaptserve", "serve", "--port", "{port}", "--n-threads", "2"]


class Server:
    """`command` (`{port}` in it becomes a free port, which $PORT also holds) run in `cwd`, plus `args`; ready once
    /health answers."""

    def __init__(self, args: list[str], tmp: Path, command: list[str] = SERVE, cwd: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        env = {**os.environ, "ADAPTSERVE_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "PORT": str(self.port)}
        cmd = [part.format(port=self.port) for part in command] + args
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> None:  # the first start exports the shipped adapter (~1 min)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()}")

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(f"{self.url}/health", timeout=5).status_code == 200

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SmolLM2 (chat template) and Gemma 3 270M base (no template), each with its shipped FinQA adapter."""
    srv = Server(
        [
            *("--models", "smollm2-135m", "smollm2-135m-finqa", "gemma3-270m", "gemma3-270m-finqa"),
            *("--max-tokens-cap", "512", "--n-ctx", "2048"),
        ],
        tmp_path_factory.mktemp("server"),
    )
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
