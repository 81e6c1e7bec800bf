"""The general evaluation prompt set: each variant's greedy answer, side by side, and whether it holds what it should."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx
from tqdm import tqdm

from adaptserve.bench.config import BenchError

BUILTIN = "builtin"


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    expect_any: tuple[str, ...] = ()  # the answer should contain one of these (case-insensitive)


@dataclass(frozen=True)
class Answer:
    id: str
    model: str
    text: str
    completion_tokens: int
    expected: bool | None  # None: the prompt expects nothing in particular


def load_prompts(source: str) -> list[EvalPrompt]:
    path = resources.files("adaptserve.bench") / "eval_prompts.jsonl" if source == BUILTIN else Path(source)
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [EvalPrompt(str(r["id"]), str(r["prompt"]), tuple(r.get("expect_any", ()))) for r in rows]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BenchError(f"prompts {source}: expected JSON lines with id and prompt: {err}") from err
    if not prompts:
        raise BenchError(f"prompts {source}: no prompts")
    return prompts


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
            answers.append(Answer(p.id, model, text, data["usage"]["completion_tokens"], expected))
    return answers
