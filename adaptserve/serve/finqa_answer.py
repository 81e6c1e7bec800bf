"""FinQA answering, shared by POST /v1/finqa, the UI's FinQA tab and `adaptserve bench`: the input is normalized into
FinQA's number format, the model writes one program (greedy) or several (greedy plus samples), decoding held to
FinQA's program grammar, and the server executes them; with several, the majority executed answer wins and its vote
share is the confidence."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adaptserve import finqa
from adaptserve.finqa.grammar import numbers_in, program_grammar
from adaptserve.finqa.metrics import DECIMALS
from adaptserve.finqa.normalize import Change, normalize
from adaptserve.serve.engine import Completion, Engine, Generation, SamplingParams
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import FinQACandidate, FinQARequest, FinQAResponse, NormalizationChange

Submit = Callable[[Engine, list[int], SamplingParams], Generation]


@dataclass(frozen=True)
class FinQAOptions:
    normalize: bool = True  # rewrite report-style numbers (1,234 / (5) / $1,234 / a Unicode minus) into FinQA's form first
    grammar: bool | None = None  # decode within FinQA's program grammar; None: wherever the engine can enforce it
    numbers_from_input: bool = False  # with the grammar: only numbers that occur in the question, table or text
    samples: int = 1  # programs drawn: the greedy one, then samples - 1 at `temperature`
    temperature: float = 0.7
    seed: int | None = None  # sample i is seeded seed + i
    max_tokens: int = 96


@dataclass(frozen=True)
class Candidate:
    program: str | None
    answer: float | str | None
    raw: str
    error: str | None
    completion_tokens: int


@dataclass
class Solution:
    answer: float | str | None
    program: str | None
    raw: str
    error: str | None
    confidence: float | None  # the winning answer's vote share; None for a single program
    candidates: list[Candidate]
    changes: list[Change] = field(default_factory=list)
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.candidates)


def as_sentences(text: list[str] | str) -> list[str]:
    return [text] if isinstance(text, str) else text


def execute(raw: str, table: Sequence[Sequence[str]], tokens: int) -> Candidate:
    program = finqa.extract_program(raw)
    if program is None:
        return Candidate(None, None, raw, "no program found in the model output", tokens)
    try:
        return Candidate(program, finqa.execute_program(program, table), raw, None, tokens)
    except finqa.ProgramError as err:
        return Candidate(program, None, raw, f"program did not execute: {err}", tokens)


def vote(candidates: Sequence[Candidate]) -> tuple[Candidate, float]:
    """The candidate whose executed answer most candidates share (no answer counts as one answer too), the greedy
    one first on a tie, and that answer's share of the votes."""
    keys = [round(c.answer, DECIMALS) if isinstance(c.answer, float) else c.answer for c in candidates]
    counts = Counter(keys)
    best = max(range(len(candidates)), key=lambda i: (counts[keys[i]], -i))
    return candidates[best], counts[keys[best]] / len(candidates)


async def solve(
    engine: Engine,
    submit: Submit,
    question: str,
    table: Sequence[Sequence[str]],
    pre_text: Sequence[str],
    post_text: Sequence[str],
    style: finqa.PromptStyle,
    options: FinQAOptions,
) -> Solution:
    """The model writes FinQA programs for the question; the server executes them, so arithmetic is exact."""
    changes: list[Change] = []
    if options.normalize:
        normal = normalize(question, table, pre_text, post_text)
        question, table, pre_text, post_text, changes = (
            normal.question,
            normal.table,
            normal.pre_text,
            normal.post_text,
            normal.changes,
        )
    parts = finqa.task_prompt(question, table, pre_text, post_text, style, chat=engine.has_chat_template)
    prompt = engine.chat_prompt(parts) if isinstance(parts, list) else engine.tokenize(parts)
    grammar = _grammar(engine, options, question, table, pre_text, post_text)
    greedy = SamplingParams(max_tokens=options.max_tokens, temperature=0.0, stop=("\n",), grammar=grammar)
    params = [greedy] + [
        SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            stop=("\n",),
            seed=None if options.seed is None else options.seed + i,
            grammar=grammar,
        )
        for i in range(1, options.samples)
    ]
    generations = [submit(engine, prompt, p) for p in params]
    try:
        done: list[Completion] = list(await asyncio.gather(*(g.collect() for g in generations)))
    finally:
        for generation in generations:
            generation.cancel()
    candidates = [execute(c.text, table, c.finish.completion_tokens) for c in done]
    chosen, share = vote(candidates)
    confidence = share if len(candidates) > 1 else None
    return Solution(chosen.answer, chosen.program, chosen.raw, chosen.error, confidence, candidates, changes, len(prompt))


def _grammar(
    engine: Engine,
    options: FinQAOptions,
    question: str,
    table: Sequence[Sequence[str]],
    pre_text: Sequence[str],
    post_text: Sequence[str],
) -> str | None:
    if options.grammar is False:
        return None
    numbers = numbers_in([question, *pre_text, *post_text, *(c for row in table for c in row[1:])])
    grammar = program_grammar([row[0] for row in table[1:] if row], numbers if options.numbers_from_input else None)
    if options.grammar is None and engine.grammar_error(grammar) is not None:
        return None  # the engine cannot enforce one: decode freely, as before
    return grammar


async def answer_finqa(pool: ModelPool, engine: Engine, req: FinQARequest) -> FinQAResponse:
    """POST /v1/finqa: `solve` on the served model, with the server's error mapping, and `min_confidence`."""
    options = FinQAOptions(
        req.normalize, req.grammar, req.numbers_from_input, req.samples, req.temperature, req.seed, req.max_tokens
    )
    style = pool.finqa_style(engine.name)
    pre, post = as_sentences(req.pre_text), as_sentences(req.post_text)
    solution = await solve(engine, pool.start, req.question, req.table, pre, post, style, options)
    answer, error = solution.answer, solution.error
    if solution.confidence is not None and solution.confidence < req.min_confidence:
        answer, error = None, f"confidence {solution.confidence:.2f} is below min_confidence {req.min_confidence:g}"
    return FinQAResponse(
        answer=answer,
        program=solution.program,
        raw=solution.raw,
        model=engine.name,
        error=error,
        confidence=solution.confidence,
        candidates=[FinQACandidate(program=c.program, answer=c.answer, raw=c.raw, error=c.error) for c in solution.candidates],
        normalized=[NormalizationChange(where=c.where, before=c.before, after=c.after) for c in solution.changes],
    )
