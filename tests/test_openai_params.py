"""What current OpenAI clients send, through the real `openai` package against the real server: every parameter is
honoured or refused with a 400 that names it (docs/serving.md has the table)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from adaptserve import llama_thread
from adaptserve.models import resolve
from adaptserve.serve.engine import SamplingParams
from adaptserve.serve.hf_engine import sample
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs
from tests.conftest import Server

MODEL = "smollm2-135m"
ECHO_TOLERANCE = 0.02  # nats: the batched context and the Llama differ in batch shape, so in summation order
COUNT = [{"role": "user", "content": "Count from one to fifty, in words, separated by commas."}]


@pytest.fixture(scope="module")
def oa(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    llm = llama_thread.load(resolve(MODEL).path, vocab_only=True)
    yield llm
    llm.close()


def one_token(vocab: Any, text: str) -> int:
    (token,) = vocab.tokenize(text.encode(), add_bos=False)
    return token


def test_max_completion_tokens_is_honoured(oa: openai.OpenAI) -> None:
    reply = oa.chat.completions.create(model=MODEL, messages=COUNT, max_completion_tokens=5, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="differ"):
        oa.chat.completions.create(model=MODEL, messages=COUNT, max_completion_tokens=5, max_tokens=6)


def test_models_retrieve(oa: openai.OpenAI) -> None:
    assert oa.models.retrieve("smollm2-135m-finqa").id == "smollm2-135m-finqa"
    with pytest.raises(openai.NotFoundError) as err:
        oa.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_logit_bias_forces_and_bans_tokens(oa: openai.OpenAI, vocab: Any) -> None:
    banana = one_token(vocab, " banana")
    forced = oa.completions.create(
        model=MODEL, prompt="My favourite fruit:", max_tokens=3, temperature=0, logit_bias={str(banana): 100}
    )
    assert forced.choices[0].text == " banana" * 3
    streamed = oa.completions.create(
        model=MODEL,
        prompt="My favourite fruit:",
        max_tokens=3,
        temperature=0.8,
        seed=1,
        logit_bias={str(banana): 100},
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " banana" * 3
    plain = oa.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=1, temperature=0)
    first = one_token(vocab, plain.choices[0].text)
    banned = oa.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text != plain.choices[0].text


def test_frequency_and_presence_penalties_change_the_output(oa: openai.OpenAI) -> None:
    def text(prompt: str, **penalty: float) -> str:
        reply = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, **penalty)
        return reply.choices[0].text

    ones = "1, 1, 1, 1, 1, 1, 1, 1,"
    assert text(ones).count("1") >= 8  # the model loops without a penalty
    assert text(ones, frequency_penalty=2.0).count("1") < text(ones).count("1")
    yes = "yes yes yes yes yes yes yes yes"  # the plain reply repeats "the answer is yes"
    assert text(yes, presence_penalty=2.0) != text(yes)


def test_transformers_sampling_applies_bias_and_penalties_as_llama_cpp_does() -> None:
    logits = torch.zeros(8)
    logits[2] = 1.0
    params = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5, logit_bias=((7, 0.2),))
    assert sample(logits, params, None, history=[]) == 2
    assert sample(logits, params, None, history=[2]) == 7  # 1.0 - 1.0 - 0.5 < 0.2
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=0.5), None, history=[2]) == 2  # 0.5 > 0
    assert logits[2] == 1.0  # the row itself is left alone


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"not_an_openai_parameter": 1}, "not_an_openai_parameter"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ],
)
def test_what_is_not_honoured_is_refused_by_name(oa: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=2, extra_body=extra)
    assert err.value.param == param


def test_no_op_values_that_sdks_send_are_accepted(server: Server) -> None:
    body = {
        "messages": COUNT,
        "max_tokens": 2,
        "logprobs": False,
        "tool_choice": "none",
        "store": False,
        "service_tier": "auto",
        "user": "user-1234",
        "parallel_tool_calls": None,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_chat_logprobs_come_with_the_tokens_streamed_or_not(oa: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": COUNT,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = oa.chat.completions.create(**kw)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one, with the same log-probability
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
    streamed = [
        t
        for c in oa.chat.completions.create(**kw, stream=True)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_echo_logprobs_match_llama_cpp_in_process(oa: openai.OpenAI) -> None:
    """The prompt's log-probabilities through the server (batched context, no prefix cache) against llama.cpp's own
    Llama evaluating the same tokens with every position's logits, on the same 8-bit K/V cache."""
    text = "The quarterly revenue grew from 5,735 to 5,829 million dollars."
    reply = oa.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = reply.choices[0].logprobs
    assert lp is not None and reply.choices[0].text.startswith(text)
    n = len(lp.tokens) - 1  # the last is the generated token
    assert lp.token_logprobs[0] is None and "".join(lp.tokens[:n]) == text
    llm = llama_thread.load(resolve(MODEL).path, 1, n_ctx=256, logits_all=True, **kv_cache_kwargs(DEFAULT_KV_CACHE))
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert len(tokens) == n
        llm.eval(tokens)
        scores = np.asarray(llm.scores[: n - 1], dtype=np.float64)
    finally:
        llm.close()
    expected = scores[np.arange(n - 1), tokens[1:]] - np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) - scores.max(1)
    got = np.array(lp.token_logprobs[1:n])
    assert np.abs(got - expected).max() < ECHO_TOLERANCE


def test_n_choices_share_the_prompt_and_each_has_its_seed(oa: openai.OpenAI, server: Server) -> None:
    messages = [{"role": "user", "content": "Write a line about the sea."}]
    before = metric_total(server, "adaptserve_engine_prefix_cache_hit_tokens_total")
    reply = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, n=4, seed=7)
    reused = metric_total(server, "adaptserve_engine_prefix_cache_hit_tokens_total") - before
    assert [c.index for c in reply.choices] == [0, 1, 2, 3] and reply.usage is not None
    assert reused >= 3 * (reply.usage.prompt_tokens - 1)  # the prompt was computed once
    for i, choice in enumerate(reply.choices):  # choice i is what a single request with seed 7 + i gives
        alone = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=7 + i)
        assert choice.message.content == alone.choices[0].message.content
    assert len({c.message.content for c in reply.choices}) > 1


def test_completions_take_token_ids_several_prompts_and_best_of(oa: openai.OpenAI, vocab: Any) -> None:
    ids = vocab.tokenize(b"One, two, three,", add_bos=False)
    by_ids = oa.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = oa.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = oa.completions.create(model=MODEL, prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text != several.choices[2].text
    best = oa.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=2, best_of=4, seed=3)
    assert len(best.choices) == 2 and best.usage is not None and best.usage.completion_tokens > 12


def metric_total(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_tokenizer_routes_round_trip(server: Server) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info, which lm_eval's remote tokenizer uses."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
        out = c.post("/tokenize", json={"prompt": "Net income: 5,829", "add_special_tokens": False}).json()
        assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] == 2048
        assert c.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "Net income: 5,829"}
        gemma = c.post("/tokenize", json={"model": "gemma3-270m", "prompt": "Net income: 5,829"}).json()
        assert gemma["tokens"] != out["tokens"]
        bad = c.post("/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


COMPANY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "revenue": {"type": "number"}},
    "required": ["name", "revenue"],
    "additionalProperties": False,
}


def test_structured_output_under_batching(server: Server) -> None:
    """A JSON-schema request, a raw-grammar request, a JSON-object request and an unconstrained one, sent together
    so that they decode in one batch: each constrained output parses as its constraint says."""
    messages = [{"role": "user", "content": "Describe a company as JSON with its name and revenue."}]
    bodies: list[dict[str, Any]] = [
        {
            "response_format": {"type": "json_schema", "json_schema": {"name": "company", "schema": COMPANY}},
            "temperature": 0.7,
            "seed": 1,
        },
        {"grammar": 'root ::= "yes" | "no"', "temperature": 0},
        {"response_format": {"type": "json_object"}, "temperature": 0},
        {"temperature": 0},
    ]

    async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 80, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    async def all_at_once() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(send(client, b) for b in bodies))

    company, yes_no, anything, _ = asyncio.run(all_at_once())
    assert company["finish_reason"] == "stop"
    parsed = json.loads(company["message"]["content"])
    assert set(parsed) == {"name", "revenue"} and isinstance(parsed["name"], str) and isinstance(parsed["revenue"], (int, float))
    assert yes_no["message"]["content"] in ("yes", "no") and yes_no["finish_reason"] == "stop"
    assert anything["finish_reason"] == "stop" and isinstance(json.loads(anything["message"]["content"]), dict)


@pytest.mark.parametrize(
    "body,param,code,reason",
    [
        ({"grammar": 'root ::= "a" undefined-rule'}, "grammar", "invalid_grammar", "undefined-rule"),
        ({"grammar": "root ::= ("}, "grammar", "invalid_grammar", "expecting"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}},
            "response_format",
            "invalid_schema",
            "missing",
        ),
        ({"response_format": {"type": "json_schema"}}, None, "invalid_value", "json_schema"),
        ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, None, "invalid_value", "not both"),
    ],
)
def test_a_bad_grammar_or_schema_is_a_400_with_the_reason(
    server: Server, body: dict[str, Any], param: str | None, code: str, reason: str
) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": COUNT, "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and reason in error["message"]
    if param:
        assert error["param"] == param
