"""The general evaluation prompt set: each variant's greedy answer, side by side, whether it holds what it should,
and, where a prompt has a reference answer, how much it overlaps that reference (ROUGE-L, BLEU)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from adaptserve.bench import overlap
from adaptserve.bench.config import BenchError

BUILTIN = "builtin"


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    expect_any: tuple[str, ...] = ()  # the answer should contain one of these (case-insensitive)
    reference: str | None = None  # a reference answer to score the generation against


@dataclass(frozen=True)
class Answer:
    id: str
    model: str
    text: str
    completion_tokens: int
    expected: bool | None  # None: the prompt expects nothing in particular
    reference: str | None
    rouge_l: float | None  # F1 against the reference; None without one
    bleu: float | None  # sentence BLEU (0-100) against the reference; None without one


def load_prompts(source: str) -> list[EvalPrompt]:
    path = resources.files("adaptserve.bench") / "eval_prompts.jsonl" if source == BUILTIN else Path(source)
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [_prompt(r) for r in rows]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BenchError(f"prompts {source}: expected JSON lines with id and prompt: {err}") from err
    if not prompts:
        raise BenchError(f"prompts {source}: no prompts")
    return prompts


def _prompt(row: dict[str, Any]) -> EvalPrompt:
    prompt = EvalPrompt(str(row["id"]), str(row["prompt"]), tuple(row.get("expect_any", ())), row.get("reference"))
    if not isinstance(prompt.reference, str | None):
        raise TypeError(f"{prompt.id}: reference must be a string, got {prompt.reference!r}")
    return prompt


def answer_all(url: str, model: str, prompts: list[EvalPrompt], max_tokens: int) -> list[Answer]:
    answers = []
    with httpx.Client(timeout=600.0) as client:
        for p in tqdm(prompts, desc=f"prompts {model}", unit="prompt"):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": p.prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            response = client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            data = response.json()
            text = data["choices"][0]["message"]["content"]
            expected = any(e.lower() in text.lower() for e in p.expect_any) if p.expect_any else None
            scores = overlap.scores(text, p.reference)
            answers.append(Answer(p.id, model, text, data["usage"]["completion_tokens"], expected, p.reference, *scores))
    return answers


def summarize(model: str, answers: list[Answer]) -> dict[str, Any]:
    """Per variant; the reference scores are over the prompts that have a reference, None where none has."""
    checked = [a for a in answers if a.expected is not None]
    pairs = [(a.text, a.reference) for a in answers if a.reference is not None]
    rouge = [a.rouge_l for a in answers if a.rouge_l is not None]
    return {
        "model": model,
        "prompts": len(answers),
        "expected_checked": len(checked),
        "expected_found": sum(a.expected for a in checked),
        "mean_completion_tokens": sum(a.completion_tokens for a in answers) / len(answers),
        "referenced": len(pairs),
        "rouge_l": round(statistics.fmean(rouge), 4) if rouge else None,  # mean of the per-answer F1
        "bleu": round(overlap.corpus_bleu(pairs), 2) if pairs else None,
    }
