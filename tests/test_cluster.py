"""The server as Ray Serve deployments on a local two-CPU Ray cluster: two replicas at one thread each, driven
through Ray's HTTP proxy with the same clients as the single server; adapter routing and a replica killed under load."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from adaptserve import finqa
from adaptserve.serve.config import ServeConfig
from tests.conftest import REPO, Server, free_port

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'adaptserve[ray]'")
serve = pytest.importorskip("ray.serve")
from adaptserve.serve.ray_app import APP, REPLICA_HEADER, build  # noqa: E402

BASE, ADAPTERS = "smollm2-135m", ["smollm2-135m-finqa", "smollm2-135m-finqa@lora"]
HELLO = [{"role": "user", "content": "Name three colors."}]
REPLICA = REPLICA_HEADER.decode()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # one adapter per replica: two adapters make replicas evict under the mixed load of the fault test
    config = ServeConfig(
        models=[BASE, *ADAPTERS], n_threads=1, replicas=2, max_models_per_replica=1, max_tokens_cap=256, shutdown_timeout=2
    )
    serve.run(build(config), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_openai_client_through_the_proxy(url: str) -> None:
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in oa.models.list()] == [BASE, *ADAPTERS]
    reply = oa.chat.completions.create(model=BASE, messages=HELLO, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    stream = oa.chat.completions.create(model=BASE, messages=HELLO, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=HELLO, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=BASE, messages=HELLO, max_tokens=100_000)
    refused = httpx.post(f"{url}/admin/adapters", json={"name": "x", "path": "x"})  # would load on one replica only
    assert refused.status_code == 400 and "--models" in refused.json()["error"]["message"]


def test_finqa_through_the_proxy(url: str) -> None:
    record = finqa.load_finqa(split="test")[0]
    fields = {f: getattr(record, f) for f in ("question", "pre_text", "table", "post_text")}
    r = httpx.post(f"{url}/v1/finqa", json={**fields, "model": ADAPTERS[0], "max_tokens": 64}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == ADAPTERS[0] and r.headers[REPLICA]


def test_adapters_stick_to_the_replica_that_loaded_them(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for adapter in ADAPTERS:
            req = {"model": adapter, "prompt": "Revenue grew", "max_tokens": 4, "temperature": 0}
            replicas = {client.post("/v1/completions", json=req).headers[REPLICA] for _ in range(6)}
            assert len(replicas) == 1, (adapter, replicas)
            held = f'adaptserve_replica_models{{model="{adapter}",replica="{replicas.pop()}"}} 1.0'
            assert any(held in client.get("/metrics").text for _ in range(10))  # /metrics comes from either replica
        for _ in range(10):  # each replica holds the base and at most one adapter
            r = client.get("/metrics")
            own = f'replica="{r.headers[REPLICA]}"}} 1.0'
            lines = [ln for ln in r.text.splitlines() if ln.startswith("adaptserve_replica_models{") and ln.endswith(own)]
            assert f'model="{BASE}"' in " ".join(lines) and len(lines) <= 2, lines


async def _request(client: httpx.AsyncClient, i: int) -> tuple[int, str, dict]:
    """One of a mixed load: chat or completion, streamed or not, on the base or an adapter."""
    model = [BASE, *ADAPTERS][i % 3]
    stream = i % 2 == 0
    body = {"model": model, "max_tokens": 24, "temperature": 0, "stream": stream}
    route, body = (
        ("/v1/chat/completions", {**body, "messages": HELLO}) if i % 4 < 2 else ("/v1/completions", {**body, "prompt": "One,"})
    )
    r = await client.post(route, json=body)
    return r.status_code, r.text, dict(r.headers)


def _replicas() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#ModelReplica#"
    return {a["name"][len(prefix) :] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def test_ui_is_served_by_the_ingress_and_calls_the_api_through_it(url: str) -> None:
    """Gradio's requests of one session all reach the one ingress replica; the UI's chat and FinQA calls take the API's
    routing to a replica holding the model they name, an adapter loaded there on first use."""
    from gradio_client import Client

    assert httpx.get(url).headers["location"] == "/ui/"
    assert httpx.get(f"{url}/ui/", timeout=120).status_code == 200  # builds the UI (gradio's import takes seconds)
    ui = Client(f"{url}/ui/", verbose=False)
    assert ui.predict("Name three colors.", BASE, 0.0, 16, api_name="/chat")
    table = "| 2015 | 2014\nnet revenue | $ 5829 | $ 5735"
    question = "what is the percentage change in net revenue from 2014 to 2015?"
    program, _, confidence, _ = ui.predict(ADAPTERS[1], question, table, "", 2, api_name="/finqa")
    assert program.startswith("subtract(") and confidence.endswith("programs give this answer)")


def test_replica_killed_under_load_is_replaced_and_no_request_hangs(url: str) -> None:
    before = _replicas()
    assert len(before) == 2

    async def load() -> list[tuple[int, str, dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(90)) as client:
            tasks = [asyncio.create_task(_request(client, i)) for i in range(40)]
            await asyncio.sleep(1.5)
            victim = next(iter(before))
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{victim}", namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks)

    killed = time.monotonic()
    results = asyncio.run(load())
    for status, text, headers in results:
        assert status == 200 or (status == 503 and headers.get("retry-after")), (status, text)
        if status == 200 and headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all(json.loads(e) for e in events[:-1])
    assert sum(status == 200 for status, _, _ in results) >= len(results) // 2
    while time.monotonic() - killed < 30:
        seen = {httpx.get(f"{url}/health", timeout=10).headers[REPLICA] for _ in range(6)}
        if seen - before:
            return
        time.sleep(1)
    pytest.fail("no replacement replica served within 30 s of the kill")


def test_bad_ray_settings_exit_2_before_anything_starts() -> None:
    from adaptserve.cli import main

    assert main(["serve", "--ray", "--replicas", "0", "--min-replicas", "3", "--max-replicas", "2"]) == 2


@pytest.mark.parametrize("path", ["deploy/serve.yaml", "deploy/rayservice.yaml"])
def test_deploy_configs_build(path: str) -> None:
    """The Serve config file and the RayService's copy of it are valid Serve configs whose args build the app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from adaptserve.serve.ray_app import app_builder

    doc = yaml.safe_load((REPO / path).read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc)
    (app,) = config.applications
    assert app.import_path == "adaptserve.serve.ray_app:app_builder"
    assert app_builder(app.args) is not None


def test_sigterm_of_serve_ray_drains_then_exits_zero(tmp_path: Path) -> None:
    """`adaptserve serve --ray` on a cluster of its own: a stream running at SIGTERM ends cleanly (its finish, or an
    error event, then [DONE]) and the command exits 0, as the single server does."""
    deadline = 2.0
    args = ["--ray", "--models", BASE, "--no-ui", "--replicas", "1", "--n-threads", "1", "--shutdown-timeout", str(deadline)]
    srv = Server(args, tmp_path)
    try:
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(6)]
            srv.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            events = [ln.removeprefix("data: ") for ln in [*head, *lines] if ln.startswith("data: ")]
        code = srv.proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        srv.stop()
    assert code == 0 and took < deadline + 45, (code, took)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
