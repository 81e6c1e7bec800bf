"""POST /v1/finqa and the UI's FinQA tab: the model writes a FinQA program, the server executes it."""

from __future__ import annotations

from adaptserve import finqa
from adaptserve.serve.engine import Engine, SamplingParams
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import FinQARequest, FinQAResponse


def as_sentences(text: list[str] | str) -> list[str]:
    return [text] if isinstance(text, str) else text


async def answer_finqa(pool: ModelPool, engine: Engine, req: FinQARequest) -> FinQAResponse:
    """The model writes a FinQA program for the question; the server executes it, so arithmetic is exact."""
    prompt_parts = finqa.task_prompt(
        req.question,
        req.table,
        as_sentences(req.pre_text),
        as_sentences(req.post_text),
        pool.finqa_style(engine.name),
        chat=engine.has_chat_template,
    )
    prompt = engine.chat_prompt(prompt_parts) if isinstance(prompt_parts, list) else engine.tokenize(prompt_parts)
    # Greedy and one line: the program is the whole answer, and sampling only adds wrong digits.
    generation = pool.start(engine, prompt, SamplingParams(max_tokens=req.max_tokens, temperature=0.0, stop=("\n",)))
    raw = (await generation.collect()).text
    program = finqa.extract_program(raw)
    if program is None:
        return FinQAResponse(answer=None, program=None, raw=raw, model=engine.name, error="no program found in the model output")
    try:
        answer = finqa.execute_program(program, req.table)
    except finqa.ProgramError as err:
        return FinQAResponse(answer=None, program=program, raw=raw, model=engine.name, error=f"program did not execute: {err}")
    return FinQAResponse(answer=answer, program=program, raw=raw, model=engine.name)
