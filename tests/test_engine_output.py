"""The per-request output both engines share (engine.Output): incremental detokenizing with the real tokenizers,
stop strings, limits and the finish event, without a model decoding anything."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from transformers import AutoTokenizer

from adaptserve import llama_thread
from adaptserve.models import resolve
from adaptserve.models.hf import base_dir
from adaptserve.serve.engine import (
    ByteDetokenizer,
    Detokenizer,
    Event,
    Finished,
    Job,
    Output,
    SamplingParams,
    TextDelta,
    WindowDetokenizer,
)

# Multi-byte characters split across tokens, digits, leading spaces, a newline and FinQA's program syntax.
TEXT = "Net income rose 12.5% to €1,234 — naïve café 東京 🙂.\nsubtract(5829, 5735), divide(#0, 5735)"


@pytest.fixture(scope="module")
def hf_tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(base_dir(resolve("smollm2-135m").location))


@pytest.fixture(scope="module")
def llama_vocab():  # type: ignore[no-untyped-def]
    llm = llama_thread.load(resolve("smollm2-135m").path, vocab_only=True)
    yield llm
    llm.close()


def stream(detokenizer: Detokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(t) for t in ids] + [detokenizer.flush()]


def test_window_detokenizer_streams_what_a_whole_decode_gives(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = stream(WindowDetokenizer(lambda i: hf_tokenizer.decode(i, skip_special_tokens=True)), ids)
    assert "".join(pieces) == hf_tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # a split character waits for its last byte


def test_window_detokenizer_decodes_a_bounded_window(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The cost per token stays flat: no decode sees more than the few tokens since the last emitted text."""
    ids = hf_tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"]
    widths: list[int] = []

    def decode(window: list[int]) -> str:
        widths.append(len(window))
        return hf_tokenizer.decode(window, skip_special_tokens=True)

    assert "".join(stream(WindowDetokenizer(decode), ids)) == TEXT * 20
    assert max(widths) <= 6 < len(ids)


def test_byte_detokenizer_streams_what_a_whole_decode_gives(llama_vocab) -> None:  # type: ignore[no-untyped-def]
    ids = llama_vocab.tokenize(TEXT.encode(), add_bos=False)
    pieces = stream(ByteDetokenizer(lambda t: llama_vocab.detokenize([t])), ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def output(
    hf_tokenizer, stop: tuple[str, ...] = (), max_tokens: int = 100
) -> tuple[Output, list[Event], Callable[[str], list[int]]]:  # type: ignore[no-untyped-def]
    events: list[Event] = []
    job = Job([1, 2, 3], SamplingParams(max_tokens=max_tokens, stop=stop), events.append, threading.Event())
    detokenizer = WindowDetokenizer(lambda i: hf_tokenizer.decode(i, skip_special_tokens=True))
    return Output(job, max_tokens, detokenizer, 0.0), events, lambda t: hf_tokenizer(t, add_special_tokens=False)["input_ids"]


def feed(out: Output, ids: list[int]) -> str | None:
    for token in ids:
        reason = out.add(token)
        if reason is not None:
            return reason
    return None


def texts(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_output_cuts_at_a_stop_string_split_across_tokens(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    out, events, encode = output(hf_tokenizer, stop=("divide(",))
    assert feed(out, encode(TEXT)) == "stop"
    out.finish("stop")
    assert texts(events) == TEXT[: TEXT.index("divide(")]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stop" and finished.prompt_tokens == 3


def test_output_ends_at_its_limit_and_releases_held_text(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    out, events, encode = output(hf_tokenizer, stop=("\nUser:",), max_tokens=5)
    ids = encode("a\nb c d e f")
    assert feed(out, ids) == "length"
    out.finish("length")
    assert texts(events) == hf_tokenizer.decode(ids[:5])  # the held "\n" came out: it never became a stop
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.completion_tokens == 5
    assert finished.time_to_first_token is not None
