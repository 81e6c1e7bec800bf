"""The train/serve prompt contract: the prompt an adapter is trained on is, token for token, the one it is served."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("transformers")

from transformers import PreTrainedTokenizerBase

from adaptserve import finqa
from adaptserve.models import resolve
from adaptserve.models.prompt import PLAIN_STOPS, render, transcript
from adaptserve.serve.llama_engine import LlamaCppEngine
from adaptserve.train.data import Chat, encode, load_items
from adaptserve.train.model import load_tokenizer

CHAT = Chat(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
)


def served_finqa(engine: LlamaCppEngine, record: finqa.FinQARecord, style: finqa.PromptStyle) -> list[int]:
    """The prompt tokens the server's FinQA endpoint gives `engine` for `record` (as `answer_finqa` builds them)."""
    parts = finqa.task_prompt(record.question, record.table, record.pre_text, record.post_text, style, engine.has_chat_template)
    return engine.chat_prompt(parts) if isinstance(parts, list) else engine.tokenize(parts)


def training_prompt(item: finqa.FinQARecord | Chat, tokenizer: PreTrainedTokenizerBase, retrieval_k: int) -> list[int]:
    """The prompt tokens training builds for `item` (the part before the answer the loss is on)."""
    (example,) = encode([item], tokenizer, retrieval_k, max_seq_len=100_000)
    return example.prompt


@pytest.fixture(scope="module")
def smollm2() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(resolve("smollm2-135m"), n_ctx=256, n_slots=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def gemma() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(resolve("gemma3-270m"), n_ctx=256, n_slots=1)
    yield engine
    engine.close()


def test_transcript_is_the_plain_contract() -> None:
    messages = CHAT.messages[:-1]
    assert render(messages, None) == transcript(messages) == "System: Be brief.\nUser: Say yes.\nAssistant:"
    assert PLAIN_STOPS == ("\nUser:",)


def test_shipped_adapter_is_served_the_finqa_prompt_it_was_trained_on(smollm2: LlamaCppEngine) -> None:
    """SmolLM2 has a chat template: training renders it with transformers, the server with llama.cpp."""
    style = finqa.adapter_style(resolve("smollm2-135m-finqa").path)
    record = load_items(["sample"])[0]
    assert isinstance(record, finqa.FinQARecord) and smollm2.has_chat_template
    tokenizer = load_tokenizer("smollm2-135m")
    assert training_prompt(record, tokenizer, style.sentences) == served_finqa(smollm2, record, style)
    assert training_prompt(CHAT, tokenizer, 0) == smollm2.chat_prompt(CHAT.messages[:-1])


def test_template_less_model_is_served_the_prompt_it_was_trained_on(gemma: LlamaCppEngine) -> None:
    """Gemma 3 270M has no chat template: its shipped adapter is served FinQA's plain completion text as trained, and a
    chat as the plain transcript."""
    style = finqa.adapter_style(resolve("gemma3-270m-finqa").path)
    record = load_items(["sample"])[0]
    assert isinstance(record, finqa.FinQARecord) and not gemma.has_chat_template
    tokenizer = load_tokenizer("gemma3-270m")  # the first run dequantizes the GGUF into the cache (minutes)
    assert training_prompt(record, tokenizer, style.sentences) == served_finqa(gemma, record, style)
    assert training_prompt(CHAT, tokenizer, 0) == gemma.chat_prompt(CHAT.messages[:-1])
