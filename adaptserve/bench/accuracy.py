"""FinQA accuracy of one served model, answered as POST /v1/finqa answers (`serve.finqa_answer.solve`): the model
writes programs, the programs are executed, and the executed answer is scored against the gold one.

A mode is how the question is answered: `greedy` (free decoding, one program), `grammar` (one program held to
FinQA's program grammar) or `vote-K` (K programs, the greedy one and K - 1 samples, under the grammar where the
engine can enforce it; the majority answer wins and its vote share is the confidence). Modes run side by side,
question by question, so their costs are measured under the same load. Each question's prompt is first decoded once
for one token (timed: its prefill), so every mode then finds it in the prefix cache: a mode's latency is that
prefill plus its own decoding.

Scoring follows the official evaluate.py (execute, round to 5 decimals, compare with the gold `exe_ans`); an output
without a program that runs is still scored on the plain number it wrote, leniently, and counted apart (`kind`).
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from tqdm import tqdm

from adaptserve import finqa
from adaptserve.finqa.grammar import program_grammar
from adaptserve.serve.engine import Engine, Generation, SamplingParams
from adaptserve.serve.finqa_answer import FinQAOptions, Solution, solve

Z95 = 1.959964  # two-sided 95% normal quantile
MAX_VOTES = 16  # as many programs as /v1/finqa's `samples` allows
BUCKETS = ((0.0, 0.5), (0.5, 0.8), (0.8, 1.0))  # vote-share buckets of the confidence report; the last one is closed


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


def mode_options(mode: str, normalize: bool = True) -> FinQAOptions:
    """The /v1/finqa options a mode name stands for; ValueError names the modes there are."""
    if mode == "greedy":
        return FinQAOptions(normalize=normalize, grammar=False)
    if mode == "grammar":
        return FinQAOptions(normalize=normalize, grammar=True)
    votes = mode.removeprefix("vote-")
    if mode.startswith("vote-") and votes.isdigit() and 2 <= int(votes) <= MAX_VOTES:
        return FinQAOptions(normalize=normalize, samples=int(votes), seed=0)
    raise ValueError(f"unknown FinQA mode {mode!r}: choose greedy, grammar or vote-K with K from 2 to {MAX_VOTES}")


@dataclass(frozen=True)
class Prediction:
    id: str
    mode: str
    question: str
    gold_program: str
    gold_answer: float | str
    output: str
    program: str | None
    answer: float | str | None
    kind: str  # "program" (an executed program), "plain" (a number written instead) or "none"
    correct: bool
    program_exact: bool
    confidence: float | None  # the winning answer's vote share (vote modes)
    candidates: list[float | str | None]  # every program's executed answer (vote modes)
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # wall time of the answer with the prompt already cached, every program included
    prefill_seconds: float  # the prompt's prefill and first token, timed once per question


@dataclass(frozen=True)
class AccuracyReport:
    model: str
    mode: str
    normalize: bool
    count: int
    correct: int
    execution_accuracy: float
    ci95: tuple[float, float]
    program_exact_match: float
    executable_programs: float  # share of answers that came from a program that ran, right or wrong
    mean_prompt_tokens: float
    mean_completion_tokens: float  # per question, every program's tokens together
    latency_p50: float  # seconds per question: its prefill plus this mode's decoding
    latency_mean: float
    decode_p50: float  # seconds per question with the prompt cached
    output_tokens_per_second: float  # completion tokens over decoding time, all questions
    buckets: list[dict]  # vote modes: accuracy within each confidence bucket
    coverage: list[dict]  # vote modes: accuracy when answering only at confidence >= threshold, for each threshold

    def as_dict(self) -> dict:
        return asdict(self)


def score(solution: Solution, record: finqa.FinQARecord) -> tuple[bool, str]:
    """Right or wrong, and what the answer came from."""
    if solution.program is not None and solution.answer is not None:
        return finqa.answers_match(solution.answer, record.answer), "program"
    scored = finqa.score_output(solution.raw, record)  # no program ran: the number it wrote, if any
    return scored.correct and scored.kind == "plain", "plain" if scored.kind == "plain" else "none"


async def timed_solve(
    engine: Engine, record: finqa.FinQARecord, style: finqa.PromptStyle, options: FinQAOptions
) -> tuple[Solution, float]:
    start = time.perf_counter()
    solution = await solve(engine, _submit, record.question, record.table, record.pre_text, record.post_text, style, options)
    return solution, time.perf_counter() - start


async def predict(
    engine: Engine, record: finqa.FinQARecord, style: finqa.PromptStyle, mode: str, options: FinQAOptions, prefill: float
) -> Prediction:
    solution, seconds = await timed_solve(engine, record, style, options)
    correct, kind = score(solution, record)
    votes = len(solution.candidates) > 1
    return Prediction(
        id=record.id,
        mode=mode,
        question=record.question,
        gold_program=record.program,
        gold_answer=record.answer,
        output=solution.raw,
        program=solution.program,
        answer=solution.answer,
        kind=kind,
        correct=correct,
        program_exact=normalize_program(solution.program) == normalize_program(record.program),
        confidence=solution.confidence,
        candidates=[c.answer for c in solution.candidates] if votes else [],
        prompt_tokens=solution.prompt_tokens,
        completion_tokens=solution.completion_tokens,
        seconds=round(seconds, 4),
        prefill_seconds=round(prefill, 4),
    )


def _submit(engine: Engine, prompt: list[int], params: SamplingParams) -> Generation:
    return engine.submit(prompt, params)


def runnable_modes(engine: Engine, modes: Sequence[str]) -> list[str]:
    """The modes this engine can run: `grammar` needs an engine that enforces grammars (vote-K decodes freely
    where the engine cannot, as /v1/finqa does)."""
    if "grammar" in modes and engine.grammar_error(program_grammar(["revenue"], None)) is not None:
        return [m for m in modes if m != "grammar"]
    return list(modes)


def evaluate_finqa(
    engine: Engine,
    records: Sequence[finqa.FinQARecord],
    style: finqa.PromptStyle,
    modes: Sequence[str] = ("greedy",),
    normalize: bool = True,
    max_tokens: int = 96,
    earlier: Sequence[Prediction] = (),
    on_question: Callable[[list[Prediction]], None] | None = None,
    time_prefill: bool = True,
) -> tuple[list[AccuracyReport], list[Prediction]]:
    """Every record answered in every mode, one question at a time (a vote's programs decode together). Questions
    `earlier` holds in every mode are not asked again (a long run resumes); `on_question` gets each new question's
    predictions as they come. Without `time_prefill` (accuracy only) the prompt is not decoded ahead of the modes."""
    options = {m: replace(mode_options(m, normalize), max_tokens=max_tokens) for m in modes}
    first_token = FinQAOptions(normalize=normalize, grammar=False, max_tokens=1)
    kept = {(p.id, p.mode): p for p in earlier if p.mode in options}
    todo = [r for r in records if any((r.id, m) not in kept for m in modes)]

    async def run() -> None:
        for record in tqdm(todo, desc=f"finqa {engine.name} {'/'.join(modes)}", unit="q"):
            prefill = (await timed_solve(engine, record, style, first_token))[1] if time_prefill else 0.0
            answers = [await predict(engine, record, style, mode, options[mode], prefill) for mode in modes]
            kept.update(((p.id, p.mode), p) for p in answers)
            if on_question is not None:
                on_question(answers)

    asyncio.run(run())
    predictions = [kept[r.id, m] for r in records for m in modes]
    reports = [summarize(engine.name, m, normalize, [p for p in predictions if p.mode == m]) for m in modes]
    return reports, predictions


def summarize(model: str, mode: str, normalize: bool, predictions: Sequence[Prediction]) -> AccuracyReport:
    count = len(predictions)
    correct = sum(p.correct for p in predictions)
    seconds = [p.seconds for p in predictions]
    latency = [p.prefill_seconds + p.seconds for p in predictions]
    tokens = sum(p.completion_tokens for p in predictions)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / count if count else 0.0

    return AccuracyReport(
        model=model,
        mode=mode,
        normalize=normalize,
        count=count,
        correct=correct,
        execution_accuracy=correct / count if count else 0.0,
        ci95=wilson_interval(correct, count),
        program_exact_match=mean([p.program_exact for p in predictions]),
        executable_programs=mean([p.kind == "program" for p in predictions]),
        mean_prompt_tokens=mean([p.prompt_tokens for p in predictions]),
        mean_completion_tokens=tokens / count if count else 0.0,
        latency_p50=statistics.median(latency) if latency else 0.0,
        latency_mean=mean(latency),
        decode_p50=statistics.median(seconds) if seconds else 0.0,
        output_tokens_per_second=tokens / sum(seconds) if sum(seconds) else 0.0,
        buckets=confidence_buckets(predictions),
        coverage=coverage_curve(predictions),
    )


def confidence_buckets(predictions: Sequence[Prediction]) -> list[dict]:
    """Accuracy within each vote-share bucket: is the vote share a usable confidence?"""
    voted = [p for p in predictions if p.confidence is not None]
    if not voted:
        return []
    rows = []
    for low, high in BUCKETS:
        inside = [p for p in voted if low <= p.confidence < high or (high == 1.0 and p.confidence == 1.0)]
        right = sum(p.correct for p in inside)
        rows.append(
            {
                "low": low,
                "high": high,
                "count": len(inside),
                "correct": right,
                "accuracy": right / len(inside) if inside else None,
            }
        )
    return rows


def coverage_curve(predictions: Sequence[Prediction]) -> list[dict]:
    """For each vote share t that occurs: the share of questions answered at confidence >= t, and their accuracy."""
    voted = [p for p in predictions if p.confidence is not None]
    rows = []
    for threshold in sorted({p.confidence for p in voted}, reverse=True):
        answered = [p for p in voted if p.confidence >= threshold]
        right = sum(p.correct for p in answered)
        rows.append(
            {
                "threshold": threshold,
                "coverage": len(answered) / len(voted),
                "answered": len(answered),
                "accuracy": right / len(answered),
            }
        )
    return rows
