"""The real server over real HTTP: OpenAI compatibility, streaming, FinQA, metrics, and bad input."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from adaptserve import finqa
from tests.conftest import Server

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Name three colors."}]
SERVED = ["smollm2-135m", "smollm2-135m-finqa", "gemma3-270m", "gemma3-270m-finqa"]


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_health_and_models(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == SERVED == list(health["engines"])
    assert all(e["backend"] == "llama.cpp" and e["n_ctx"] == 2048 for e in health["engines"].values())
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == SERVED


def test_completion_usage_and_length(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion" and body["model"] == "smollm2-135m"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_chat_stream_is_openai_sse(client: httpx.Client) -> None:
    r = client.post(
        CHAT,
        json={"messages": HELLO, "stream": True, "max_tokens": 24, "temperature": 0, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1]["usage"]
    # The same request without streaming yields the same text and token count (greedy).
    plain = client.post(CHAT, json={"messages": HELLO, "max_tokens": 24, "temperature": 0}).json()
    assert plain["choices"][0]["message"]["content"] == streamed
    assert plain["usage"] == usage


def test_openai_client_unchanged(server: Server) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in oa.models.list()] == SERVED
    reply = oa.chat.completions.create(model="smollm2-135m", messages=HELLO, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in oa.chat.completions.create(model="smollm2-135m", messages=HELLO, max_tokens=16, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == reply.choices[0].message.content
    text = oa.completions.create(model="gemma3-270m", prompt="One, two, three,", max_tokens=8, temperature=0)
    assert text.choices[0].text and text.model == "gemma3-270m"
    base_chat = oa.chat.completions.create(model="gemma3-270m", messages=HELLO, max_tokens=8, temperature=0)
    assert base_chat.choices[0].finish_reason in ("stop", "length")


def test_seed_and_stop(client: httpx.Client) -> None:
    req = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "seed": 1234}
    first, second = (client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2))
    assert first == second
    greedy = client.post("/v1/completions", json={**req, "temperature": 0}).json()["choices"][0]["text"]
    word = greedy.split()[2]
    cut = client.post("/v1/completions", json={**req, "temperature": 0, "stop": [word]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and word not in cut["text"] and greedy.startswith(cut["text"])


def test_concurrent_requests_do_not_interleave(server: Server) -> None:
    prompts = [f"Count from {i} to {i + 5}:" for i in range(6)]

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:

            async def one(p: str) -> str:
                r = await ac.post("/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
                return r.json()["choices"][0]["text"]

            together = await asyncio.gather(*(one(p) for p in prompts))
            alone = [await one(p) for p in prompts]
            return together, alone

    together, alone = asyncio.run(run())
    assert together == alone


def test_finqa_endpoint_executes_the_program(client: httpx.Client) -> None:
    record = finqa.load_finqa(split="test")[0]
    r = client.post(
        "/v1/finqa",
        json={
            "question": record.question,
            "pre_text": record.pre_text,
            "table": record.table,
            "post_text": record.post_text,
            "max_tokens": 64,
        },
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["model"] == "smollm2-135m" and isinstance(body["raw"], str)
    if body["program"] is not None and body["error"] is None:
        assert body["answer"] == finqa.execute_program(body["program"], record.table)
    else:
        assert body["answer"] is None and body["error"]


@pytest.mark.parametrize("base", ["smollm2-135m", "gemma3-270m"])
def test_adapter_writes_programs_the_base_does_not(client: httpx.Client, base: str) -> None:
    """A shipped adapter, applied to its served base's weights, answers in the FinQA DSL; its untuned base rarely
    does. The UI offers every served model."""
    records = finqa.load_finqa(split="test")[:6]

    def executed(model: str) -> int:
        fields = ("question", "pre_text", "table", "post_text")
        unconstrained = {"model": model, "grammar": False}  # what each model writes by itself
        bodies = [client.post("/v1/finqa", json={**unconstrained, **{f: getattr(r, f) for f in fields}}).json() for r in records]
        assert all(b["model"] == model for b in bodies)
        return sum(b["answer"] is not None for b in bodies)

    adapted, untuned = executed(f"{base}-finqa"), executed(base)
    assert adapted >= 5 and adapted > untuned, (adapted, untuned)
    assert f'"{base}-finqa"' in client.get("/ui/config").text


def test_metrics_count_requests_and_tokens(client: httpx.Client) -> None:
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    assert 'adaptserve_requests_total{route="/v1/completions",status="200"}' in text
    assert 'adaptserve_tokens_total{kind="completion",model="smollm2-135m"}' in text
    assert "adaptserve_time_to_first_token_seconds_bucket" in text
    assert 'adaptserve_queue_depth{model="gemma3-270m"}' in text


BAD_REQUESTS = [
    ("malformed json", CHAT, b'{"messages": [', 400, "invalid_json"),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("wrong type", CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, None),
    ("wrong message type", CHAT, {"messages": "hello"}, 400, None),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("empty messages", CHAT, {"messages": []}, 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400, None),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": HELLO}, 404, "model_not_found"),
    ("path as model", CHAT, {"model": "/etc/passwd", "messages": HELLO}, 404, "model_not_found"),
    ("max_tokens zero", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, None),
    ("max_tokens negative", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, None),
    ("max_tokens over cap", CHAT, {"messages": HELLO, "max_tokens": 100_000}, 400, None),
    ("temperature out of range", CHAT, {"messages": HELLO, "temperature": 7}, 400, None),
    ("too many choices", CHAT, {"messages": HELLO, "n": 17}, 400, None),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [3006920, 137]}, 400, None),
    ("best_of below n", "/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, None),
    ("top_logprobs without logprobs", CHAT, {"messages": HELLO, "top_logprobs": 2}, 400, None),
    ("too many stops", CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("prompt over context", "/v1/completions", {"prompt": "word " * 5000, "max_tokens": 4}, 400, "context_length_exceeded"),
    (
        "prompt + max_tokens over context",
        "/v1/completions",
        {"prompt": "word " * 1900, "max_tokens": 500},
        400,
        "context_length_exceeded",
    ),
    ("finqa without question", "/v1/finqa", {"table": [["a", "1"]]}, 400, None),
    ("finqa table of numbers", "/v1/finqa", {"question": "q", "table": [[1, 2]]}, 400, None),
]


@pytest.mark.parametrize("name,path,body,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error_and_server_keeps_serving(
    client: httpx.Client, server: Server, name: str, path: str, body: object, status: int, code: str | None
) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    ok = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and server.alive()


def test_unknown_route_is_json_404(client: httpx.Client) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def metric(client: httpx.Client, name: str) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_client_disconnect_mid_stream_stops_generation(server: Server, client: httpx.Client) -> None:
    cancelled = metric(client, "adaptserve_engine_cancelled_requests_total")
    generated = metric(client, "adaptserve_engine_generated_tokens_total")
    # Greedy: sampled, the first token is EOS for about 1 seed in 4, and then there is nothing left to cancel.
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream(
            "POST", "/v1/completions", json={"prompt": "Write a long story.", "max_tokens": 500, "stream": True, "temperature": 0}
        ) as r,
    ):
        for _ in zip(range(4), r.iter_lines(), strict=False):
            pass  # read a little, then hang up
    for _ in range(100):
        if metric(client, "adaptserve_engine_cancelled_requests_total") > cancelled:
            break
        time.sleep(0.1)
    assert metric(client, "adaptserve_engine_cancelled_requests_total") == cancelled + 1
    assert metric(client, "adaptserve_engine_generated_tokens_total") - generated < 100  # far short of 500
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


def test_the_ui_is_built_at_its_first_visit(tmp_path: Path) -> None:
    """gradio (seconds to import, and memory; benchmarks/serving.md) is loaded when /ui is first asked for, not at
    start-up."""
    srv = Server(["--models", "smollm2-135m"], tmp_path)
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert "starting the UI" not in srv.log.read_text()
        first = httpx.get(f"{srv.url}/ui/", timeout=120)
        assert first.status_code == 200 and "<html" in first.text.lower()
        assert srv.log.read_text().count("starting the UI") == 1
        assert httpx.get(f"{srv.url}/ui/config").json()["components"]  # the same app from now on
        assert srv.log.read_text().count("starting the UI") == 1
    finally:
        srv.stop()
    assert srv.proc.returncode == 0 and "Traceback" not in srv.log.read_text()


REPORT_TABLE = [["", "2019", "2018"], ["operating income", "$ 2,480", "$ 2,210"]]
REPORT_QUESTION = "what was the percentage change in operating income from 2018 to 2019?"


def test_finqa_reads_report_style_numbers(client: httpx.Client) -> None:
    """Thousands separators are rewritten into FinQA's form before the adapter sees them, and the rewrite is
    reported; without it the adapter reads "2,480" as the numbers 2 and 480."""
    body = {"model": "smollm2-135m-finqa", "question": REPORT_QUESTION, "table": REPORT_TABLE}
    r = client.post("/v1/finqa", json=body).json()
    assert {c["where"]: c["after"] for c in r["normalized"]} == {"table[1][1]": "$ 2480", "table[1][2]": "$ 2210"}
    assert r["program"] and "2480" in r["program"] and "2210" in r["program"], r
    raw = client.post("/v1/finqa", json={**body, "normalize": False, "grammar": False}).json()
    assert raw["normalized"] == [] and "2480" not in (raw["program"] or "")


def test_finqa_votes_over_samples_and_can_decline(client: httpx.Client) -> None:
    body = {"model": "smollm2-135m-finqa", "question": REPORT_QUESTION, "table": REPORT_TABLE, "samples": 6, "seed": 3}
    r = client.post("/v1/finqa", json=body).json()
    assert len(r["candidates"]) == 6 and 0 < r["confidence"] <= 1
    agreeing = [c for c in r["candidates"] if c["answer"] == r["answer"]]
    assert len(agreeing) == round(r["confidence"] * 6) and r["program"] in {c["program"] for c in agreeing}
    greedy = client.post("/v1/finqa", json={**body, "samples": 1}).json()
    assert greedy["confidence"] is None and r["candidates"][0]["program"] == greedy["program"]  # candidate 0 is greedy
    declined = client.post("/v1/finqa", json={**body, "min_confidence": 1.0}).json()
    if r["confidence"] < 1.0:
        assert declined["answer"] is None and "min_confidence" in declined["error"]


def test_finqa_grammar_keeps_the_base_to_programs_of_input_numbers(client: httpx.Client) -> None:
    """The untuned base, held to FinQA's grammar and the numbers of its input, writes a program that parses."""
    body = {"model": "smollm2-135m", "question": REPORT_QUESTION, "table": REPORT_TABLE, "numbers_from_input": True}
    r = client.post("/v1/finqa", json=body).json()
    assert r["program"] is not None and finqa.parse_program(r["program"])
    numbers = {n for n in re.findall(r"(?<![#_\w])\d+(?:\.\d+)?", r["program"])}
    assert numbers <= {"2019", "2018", "2480", "2210"}, r["program"]
