"""FinQA accuracy of one served model: the model writes a program per question, the program is executed and scored.

Scoring follows the official evaluate.py (execute, round to 5 decimals, compare with the gold `exe_ans`); a model
that writes a plain number instead is still scored, leniently, and counted apart (`kind`).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm import tqdm

from adaptserve import finqa
from adaptserve.serve.engine import Engine, SamplingParams

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(correct: int, count: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval: unlike the normal approximation it stays inside [0, 1] at 0% or 100%."""
    if count == 0:
        return 0.0, 0.0
    p = correct / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def normalize_program(program: str | None) -> str:
    return re.sub(r"\s+", "", program or "").lower()


@dataclass(frozen=True)
class Prediction:
    id: str
    question: str
    gold_program: str
    gold_answer: float | str
    output: str
    program: str | None
    answer: float | str | None
    kind: str
    correct: bool
    program_exact: bool
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class AccuracyReport:
    model: str
    count: int
    correct: int
    execution_accuracy: float
    ci95: tuple[float, float]
    program_exact_match: float
    executable_programs: float  # share of outputs whose program ran, right or wrong
    mean_prompt_tokens: float

    def as_dict(self) -> dict:
        return asdict(self)


async def predict(engine: Engine, record: finqa.FinQARecord, style: finqa.PromptStyle, max_tokens: int) -> Prediction:
    parts = finqa.record_prompt(record, style, chat=engine.has_chat_template)
    prompt = engine.chat_prompt(parts) if isinstance(parts, list) else engine.tokenize(parts)
    done = await engine.complete(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",)))
    scored = finqa.score_output(done.text, record)
    return Prediction(
        id=record.id,
        question=record.question,
        gold_program=record.program,
        gold_answer=record.answer,
        output=done.text,
        program=scored.program,
        answer=scored.answer,
        kind=scored.kind,
        correct=scored.correct,
        program_exact=normalize_program(scored.program) == normalize_program(record.program),
        prompt_tokens=done.finish.prompt_tokens,
        completion_tokens=done.finish.completion_tokens,
    )


def evaluate_finqa(
    engine: Engine, records: Sequence[finqa.FinQARecord], style: finqa.PromptStyle, max_tokens: int = 96
) -> tuple[AccuracyReport, list[Prediction]]:
    """Greedy predictions for every record, one after another (accuracy, not throughput, is measured here)."""

    async def run() -> list[Prediction]:
        return [await predict(engine, r, style, max_tokens) for r in tqdm(records, desc=f"finqa {engine.name}", unit="q")]

    predictions = asyncio.run(run())
    count = len(predictions)
    correct = sum(p.correct for p in predictions)
    report = AccuracyReport(
        model=engine.name,
        count=count,
        correct=correct,
        execution_accuracy=correct / count if count else 0.0,
        ci95=wilson_interval(correct, count),
        program_exact_match=sum(p.program_exact for p in predictions) / count if count else 0.0,
        executable_programs=sum(p.kind == "program" and p.answer is not None for p in predictions) / count if count else 0.0,
        mean_prompt_tokens=sum(p.prompt_tokens for p in predictions) / count if count else 0.0,
    )
    return report, predictions
