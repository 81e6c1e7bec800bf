"""Prompts that ask a model for one FinQA program line, as chat messages or as plain completion text.

The model only writes the program; `execute_program` does the arithmetic, which small models get wrong.
Few-shot exemplars come from the shipped `sample/fewshot.json` (FinQA train records with short contexts).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adaptserve.finqa.data import FinQARecord, load_finqa
from adaptserve.finqa.retrieve import reduce_record, retrieve_sentences

SYSTEM = (
    "Answer the question about a financial report by writing a program. "
    "Operations: add, subtract, multiply, divide, exp (power) and greater (gives yes/no) each take two arguments; "
    "table_max, table_min, table_sum and table_average take a table row name and none. "
    "An argument is a number from the report (27.9% is allowed), a constant such as const_100 or const_m1 (-1), "
    "or #n, the result of step n counting from 0. "
    "Reply with the program only, on one line, steps separated by ', '."
)


def linearize_table(table: Sequence[Sequence[str]]) -> str:
    """One row a line, cells joined by ` | `, runs of whitespace collapsed."""
    lines = (" | ".join(" ".join(cell.split()) for cell in row).strip() for row in table)
    return "\n".join(line for line in lines if line.strip("| "))


def build_context(record: FinQARecord, max_sentences: int | None = None) -> str:
    """Text before the table, the table, text after it; `max_sentences` keeps that many on each side of the table."""
    return _context(record.pre_text, record.table, record.post_text, max_sentences)


def build_prompt(
    record: FinQARecord | None = None,
    *,
    question: str | None = None,
    pre_text: Sequence[str] = (),
    table: Sequence[Sequence[str]] = (),
    post_text: Sequence[str] = (),
    fewshot: Sequence[FinQARecord] | None = None,
    max_sentences: int | None = None,
) -> list[dict[str, str]]:
    """Chat messages: the DSL instruction, one user/assistant pair per exemplar, then the target question.

    Pass a record, or the question and its context by keyword. `fewshot` defaults to the shipped exemplars;
    pass [] for zero-shot.
    """
    messages = [{"role": "system", "content": SYSTEM}]
    for shot in _fewshot(fewshot):
        messages.append({"role": "user", "content": _question_turn(shot.question, build_context(shot, max_sentences))})
        messages.append({"role": "assistant", "content": shot.program})
    target = _target(record, question, pre_text, table, post_text, max_sentences)
    messages.append({"role": "user", "content": _question_turn(*target)})
    return messages


def completion_text(messages: Sequence[dict[str, str]]) -> str:
    """`build_prompt`'s messages as plain text ending in "Program:", for models without a chat template."""
    system, *turns, target = messages
    shots = [f"{user['content']}\nProgram: {answer['content']}" for user, answer in zip(turns[::2], turns[1::2], strict=True)]
    return "\n\n".join([system["content"], *shots, f"{target['content']}\nProgram:"])


@functools.lru_cache(maxsize=1)
def _default_fewshot() -> tuple[FinQARecord, ...]:
    return tuple(load_finqa(None, "fewshot"))


def _fewshot(fewshot: Sequence[FinQARecord] | None) -> Sequence[FinQARecord]:
    return _default_fewshot() if fewshot is None else fewshot


def _target(
    record: FinQARecord | None,
    question: str | None,
    pre_text: Sequence[str],
    table: Sequence[Sequence[str]],
    post_text: Sequence[str],
    max_sentences: int | None,
) -> tuple[str, str]:
    """(question, context) from either a record or the keyword parts, never a mix of both."""
    if record is not None:
        if question is not None or pre_text or table or post_text:
            raise TypeError("pass a record or question/pre_text/table/post_text, not both")
        return record.question, build_context(record, max_sentences)
    if question is None:
        raise TypeError("pass a record or a question")
    return question, _context(pre_text, table, post_text, max_sentences)


def _question_turn(question: str, context: str) -> str:
    return f"{context}\nQuestion: {question}" if context else f"Question: {question}"


def _context(pre_text: Sequence[str], table: Sequence[Sequence[str]], post_text: Sequence[str], max_sentences: int | None) -> str:
    # FinQA's text keeps one "." per table line it extracted from the PDF; those carry nothing.
    pre = [s.strip() for s in pre_text if any(c.isalnum() for c in s)]
    post = [s.strip() for s in post_text if any(c.isalnum() for c in s)]
    if max_sentences is not None:  # keep the sentences nearest the table, where the relevant ones usually are
        pre, post = pre[max(0, len(pre) - max_sentences) :], post[:max_sentences]
    rows = linearize_table(table)
    parts = [" ".join(pre), f"Table:\n{rows}" if rows else "", " ".join(post)]
    return "\n".join(part for part in parts if part)


@dataclass(frozen=True)
class PromptStyle:
    """How a model is asked: a base model needs exemplars, an adapter trained on the zero-shot form does not.

    `sentences` report sentences (BM25 against the question) go in beside the whole table, which keeps prompts
    near 400 tokens instead of FinQA's ~1000-token median: a CPU prefills them quickly and a small model reads them.
    """

    shots: int = 2
    sentences: int = 3


BASE_STYLE = PromptStyle(shots=2, sentences=3)


def adapter_style(adapter_dir: Path) -> PromptStyle:
    """An adapter answers FinQA the way it was trained: zero-shot, with the retrieval depth of its training run, as
    a finished run's train_report.json or a checkpoint's train_config.json records it."""
    report, config = adapter_dir / "train_report.json", adapter_dir / "train_config.json"
    if report.is_file():
        k = json.loads(report.read_text())["config"]["retrieval_k"]
    else:
        k = json.loads(config.read_text())["retrieval_k"] if config.is_file() else BASE_STYLE.sentences
    return PromptStyle(shots=0, sentences=k)


@functools.lru_cache(maxsize=8)
def shortest_fewshot(n: int) -> tuple[FinQARecord, ...]:
    """The `n` shortest shipped exemplars, each cut to its best-matching sentence."""
    shots = [reduce_record(shot, 1) for shot in _default_fewshot()]
    return tuple(sorted(shots, key=lambda shot: len(build_context(shot)))[:n])


def task_prompt(
    question: str,
    table: Sequence[Sequence[str]],
    pre_text: Sequence[str],
    post_text: Sequence[str],
    style: PromptStyle,
    chat: bool,
) -> list[dict[str, str]] | str:
    """The prompt a model of this style gets: chat messages, or plain text for a model without a chat template."""
    pre, post = retrieve_sentences(question, pre_text, post_text, style.sentences)
    messages = build_prompt(question=question, table=table, pre_text=pre, post_text=post, fewshot=shortest_fewshot(style.shots))
    return messages if chat else completion_text(messages)


def record_prompt(record: FinQARecord, style: PromptStyle, chat: bool) -> list[dict[str, str]] | str:
    return task_prompt(record.question, record.table, record.pre_text, record.post_text, style, chat)
