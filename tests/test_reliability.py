"""Reliability and security over real HTTP: API keys, CORS, limits, timeouts, disconnects, a full queue, SIGTERM,
a small load test, names that look like paths, and training runs killed at random moments."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adaptserve.bench.load import RequestResult, stream_chat
from adaptserve.serve import ServeConfig, create_app
from adaptserve.serve.guard import KEYS_ENV
from tests.conftest import REPO, Server

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Name three colors."}]
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0}  # greedy counting goes on to max_tokens
COUNTING_CHAT = [{"role": "user", "content": "Write the numbers from 1 to 1000, separated by commas."}]
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One thread: on 2 cores shared with other work, two llama.cpp threads wait on each other
    (benchmarks/reliability.md)."""
    args = ["--models", "smollm2-135m", "--no-ui", "--n-threads", "1", "--api-key", "other-key", "--api-key", KEY]
    args += ["--cors-origin", "https://app.example", "--max-body-bytes", "65536", "--request-timeout", str(TIMEOUT)]
    args += ["--n-slots", "2", "--queue-size", "2"]
    srv = Server(args, tmp_path_factory.mktemp("guarded"))
    yield srv
    srv.stop()


@pytest.fixture
def client(guarded: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=120, headers=AUTH) as c:
        yield c


def metric(client: httpx.Client, name: str) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith((name + " ", name + "{")))


def wait_idle(client: httpx.Client, within: float = 5.0) -> float:
    """Seconds until no slot runs a request and none waits."""
    start = time.monotonic()
    while metric(client, "adaptserve_engine_slots_busy") or metric(client, "adaptserve_queue_depth"):
        assert time.monotonic() - start < within, "the engine did not go idle"
        time.sleep(0.05)
    return time.monotonic() - start


# ---- API keys and CORS ----


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "no scheme", "basic", "empty"],
)
@pytest.mark.parametrize(
    "method,path", [("GET", "/v1/models"), ("POST", CHAT), ("GET", "/admin/adapters"), ("GET", "/v1/nothing")]
)
def test_api_routes_need_a_key(guarded: Server, headers: dict[str, str], method: str, path: str) -> None:
    r = httpx.request(method, guarded.url + path, headers=headers, json={"messages": HELLO})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["message"]


def test_any_configured_key_opens_the_api_and_health_stays_open(guarded: Server, client: httpx.Client) -> None:
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "bearer other-key"}).status_code == 200
    r = client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert client.get("/admin/nothing").status_code == 404  # past the key, an unknown admin route is a plain 404
    assert KEY not in guarded.log.read_text() and "other-key" not in guarded.log.read_text()


def test_keys_from_the_environment_and_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, " env-key-1 ,env-key-2,")
    config = ServeConfig(models=["smollm2-135m"], ui=False, api_keys=["flag-key"])
    assert "flag-key" not in repr(config)
    with TestClient(create_app(config)) as tc:  # in-process, with the model loaded: the key check comes first
        for key, status in [("env-key-1", 200), ("env-key-2", 200), ("flag-key", 200), ("env-key-3", 401)]:
            assert tc.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status


def test_cors_only_for_configured_origins(guarded: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{guarded.url}{CHAT}", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{guarded.url}{CHAT}", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # A refusal still carries the header, so the browser app can read why it was refused.
    refused = httpx.get(f"{guarded.url}/v1/models", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_is_off_by_default() -> None:
    tc = TestClient(create_app(ServeConfig(models=["smollm2-135m"], ui=False)))
    r = tc.options("/v1/models", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


# ---- limits ----


def test_oversized_body_is_413_before_it_is_read(client: httpx.Client) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    r = client.post(CHAT, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'

    r = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 1}).status_code == 200


def test_request_past_its_timeout_is_cancelled_cleanly(client: httpx.Client) -> None:
    wait_idle(client)
    start = time.monotonic()
    r = client.post("/v1/completions", json={**COUNTING, "max_tokens": 2000})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 2
    r = client.post("/v1/completions", json={**COUNTING, "max_tokens": 2000, "stream": True})
    assert r.status_code == 200
    events = [ln.removeprefix("data: ") for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert len(events) > 3  # it streamed for a while first
    wait_idle(client, within=2)


def test_bench_counts_a_stream_that_ends_in_an_error_as_failed(guarded: Server, client: httpx.Client) -> None:
    """The load client of `adaptserve bench`: a stream cut by the server's timeout is an error in its numbers, not a
    short success (a stalled run once looked clean because of that)."""

    async def one() -> RequestResult:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            return await stream_chat(c, guarded.url, "smollm2-135m", COUNTING_CHAT, 2000)

    wait_idle(client)
    result = asyncio.run(one())
    assert result.status == 200 and result.tokens > 2, result
    assert result.error is not None and '"timeout"' in result.error and result.tpot is None
    wait_idle(client, within=2)


def test_disconnect_mid_stream_frees_the_engine_at_once(guarded: Server, client: httpx.Client) -> None:
    wait_idle(client)
    cancelled = metric(client, "adaptserve_engine_cancelled_requests_total")
    with (
        httpx.Client(base_url=guarded.url, timeout=60, headers=AUTH) as c,
        c.stream("POST", "/v1/completions", json={**COUNTING, "max_tokens": 1000, "stream": True}) as r,
    ):
        for _ in zip(range(6), r.iter_lines(), strict=False):
            pass  # a few chunks, then hang up
        assert metric(client, "adaptserve_engine_slots_busy") == 1
    took = wait_idle(client, within=2)
    generated = metric(client, "adaptserve_engine_generated_tokens_total")
    time.sleep(0.5)
    assert metric(client, "adaptserve_engine_generated_tokens_total") == generated, "tokens kept coming after the hang-up"
    assert metric(client, "adaptserve_engine_cancelled_requests_total") == cancelled + 1
    assert took < 1.0
    assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_disconnect_before_a_plain_answer_frees_the_engine_too(guarded: Server, client: httpx.Client) -> None:
    wait_idle(client)
    cancelled = metric(client, "adaptserve_engine_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
        httpx.post(f"{guarded.url}/v1/completions", json={**COUNTING, "max_tokens": 1000}, headers=AUTH, timeout=1.0)
    assert wait_idle(client, within=2) < 1.0
    assert metric(client, "adaptserve_engine_cancelled_requests_total") == cancelled + 1
    assert 'adaptserve_requests_total{route="/v1/completions",status="499"}' in client.get("/metrics").text


def test_full_queue_is_a_clean_503_with_retry_after(guarded: Server, client: httpx.Client) -> None:
    """2 slots + 2 queued: of 8 requests at once, those that find the queue full are refused at once; none fails.
    Short replies, so that the queued ones end well inside the 3 s request timeout even on a slow moment."""
    wait_idle(client)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, headers=AUTH) as ac:
            body = {**COUNTING, "max_tokens": 8}
            return await asyncio.gather(*(ac.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 2, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


NOT_MODELS = ["../../etc/passwd", "/etc/passwd", "smollm2-135m/../../../etc/passwd", "~/.ssh/id_rsa", "file:///etc/passwd"]
NOT_MODELS += ["C:\\Windows\\win.ini", "%2e%2e%2fetc%2fpasswd", "smollm2-135m\x00", "./smollm2-135m", "SMOLLM2-135M"]


def test_model_names_never_reach_the_filesystem() -> None:
    """In-process, with an audit hook: the requests open, list or stat nothing on disk, and all get a 404."""
    touched: list[tuple[str, tuple]] = []
    watching = False

    def hook(event: str, args: tuple) -> None:
        if watching and event in ("open", "os.listdir", "os.scandir", "glob.glob", "os.chdir", "shutil.copyfile"):
            touched.append((event, args))

    sys.addaudithook(hook)
    with TestClient(create_app(ServeConfig(models=["smollm2-135m"], ui=False))) as tc:
        # FastAPI reads an endpoint's own source file (inspect.getsourcelines) at the first error it raises: done once
        # here, so that the audit sees only what the requests themselves cause.
        tc.post(CHAT, json={"model": NOT_MODELS[0], "messages": HELLO})
        watching = True
        codes = [
            tc.post(path, json={"model": name, **body}).json()["error"]["code"]
            for name in NOT_MODELS
            for path, body in [
                (CHAT, {"messages": HELLO}),
                ("/v1/completions", {"prompt": "x"}),
                ("/v1/finqa", {"question": "q"}),
            ]
        ]
        watching = False
    assert codes == ["model_not_found"] * len(codes)
    assert touched == []


# ---- a small load test and a SIGTERM ----


def test_small_load_test_holds(tmp_path: Path) -> None:
    """benchmarks/load_test.py at 4 clients and 60 requests, on a server of its own with the default limits (the
    guarded one's 3 s timeout is shorter than a cold FinQA prompt on a busy 2-core machine)."""
    cmd = [sys.executable, "benchmarks/load_test.py", "--clients", "4", "--requests", "60", "--max-tokens", "4"]
    done = subprocess.run([*cmd, "--threads", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "load_test.json").read_text())
    assert done.returncode == 0 and report["passed"], {k: report[k] for k in ("failures", "rss_growth", "by_kind")}
    assert report["server_errors"] == 0 and report["healthy_after"]


def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    deadline = 2.0
    srv = Server(["--models", "smollm2-135m", "--no-ui", "--n-threads", "1", "--shutdown-timeout", str(deadline)], tmp_path)
    try:
        with (
            httpx.Client(base_url=srv.url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json={**COUNTING, "max_tokens": 1500, "stream": True}) as r,
        ):
            lines = r.iter_lines()
            head = [next(lines) for _ in range(6)]
            srv.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            events = [ln.removeprefix("data: ") for ln in [*head, *lines] if ln.startswith("data: ")]
        code = srv.proc.wait(timeout=deadline + 10)
        took = time.monotonic() - sent
    finally:
        srv.stop()
    assert code == 0 and took < deadline + 6, (code, took)
    # The stream ended cleanly: its own finish, or an error event saying why, and then [DONE].
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last.get("error", {}).get("code") == "overloaded" or last["choices"][0]["finish_reason"] == "length"
    assert "Finished server process" in srv.log.read_text()


# ---- training killed at random moments ----


def test_training_killed_at_random_moments_resumes_to_a_loadable_adapter(tmp_path: Path) -> None:
    """SIGKILL a real tiny run at random moments (checkpoint every step, so some kills land mid-write); each time the
    latest checkpoint must load, and a final --resume must finish the run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptserve.models.hf import base_dir
    from adaptserve.train.checkpoint import latest

    rows = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(2, 3), (10, 7), (41, 1), (5, 5)]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    steps = 12
    cmd = [sys.executable, "-m", "adaptserve", "train", "--data", str(data), "--rank", "4", "--alpha", "8"]
    cmd += ["--batch-size", "2", "--grad-accum", "1", "--max-steps", str(steps), "--save-every", "1", "--threads", "1"]
    cmd += ["--output-dir", str(out)]
    rng = random.Random(6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reached: list[int] = []
    for attempt in range(3):
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen([*cmd, *resume], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        start = latest(out / "checkpoints")
        while latest(out / "checkpoints") == start:  # wait for this run's first checkpoint, then kill at random
            assert proc.poll() is None, "training exited early"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.kill()
        proc.wait()
        last = latest(out / "checkpoints")
        assert last is not None
        reached.append(int(last.name.removeprefix("step-")))
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m")), str(last))
    assert reached == sorted(reached) and reached[-1] < steps, reached
    done = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == steps and len(report["loss_history"]) == steps
    assert not list((out / "checkpoints").glob(".tmp-*"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m")), str(out))


def test_empty_prompt_is_the_clients_error(client: httpx.Client) -> None:
    """Found by the schemathesis run: "" tokenizes to nothing (SmolLM2 adds no BOS) and was a 500."""
    for body in [{"prompt": ""}, {"prompt": [""], "stream": True}]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and "empty" in r.json()["error"]["message"], r.text
