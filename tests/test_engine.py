"""The llama.cpp engine directly: stop strings, context budget, queue limits, close."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from adaptserve.models import resolve
from adaptserve.serve.engine import EngineBusy, LlamaCppEngine, PromptTooLong, SamplingParams, StopMatcher


@pytest.mark.parametrize(
    "pieces,stops,expected,cut",
    [
        (["Hello", " wor", "ld"], ["\n"], "Hello world", False),
        (["Hel", "lo\nUs", "er: hi"], ["\nUser:"], "Hello", True),
        (["a\n", "b"], ["\nUser:"], "a\nb", False),  # a held-back prefix that never completes comes out
        (["xSTO", "P"], ["STOP", "TOP"], "x", True),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], expected: str, cut: bool) -> None:
    matcher, out, hit = StopMatcher(stops), "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (expected, cut)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(resolve("smollm2-135m"), n_ctx=256, n_threads=2, queue_size=2)
    yield eng
    eng.close()


def test_budget_follows_the_context(engine: LlamaCppEngine) -> None:
    prompt = engine.tokenize("hello " * 100)
    assert engine.budget(prompt, None) == 256 - len(prompt)
    with pytest.raises(PromptTooLong):
        engine.budget(prompt, 256)
    with pytest.raises(PromptTooLong):
        engine.budget(engine.tokenize("hello " * 300), None)


def test_full_queue_is_refused_not_dropped(engine: LlamaCppEngine) -> None:
    async def run() -> list[str]:
        params = SamplingParams(max_tokens=8, temperature=0)
        prompt = engine.chat_prompt([{"role": "user", "content": "Hi"}])
        accepted = [engine.submit(prompt, params) for _ in range(2)]
        # the worker may already have taken one job off the queue; fill what is left, then one more is refused
        with pytest.raises(EngineBusy):
            for _ in range(3):
                accepted.append(engine.submit(prompt, params))
        return [(await gen.collect()).text for gen in accepted]

    texts = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0]


def test_chat_template_comes_from_the_gguf(engine: LlamaCppEngine) -> None:
    prompt = engine.llm.detokenize(engine.chat_prompt([{"role": "user", "content": "Hi"}]), special=True).decode()
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
