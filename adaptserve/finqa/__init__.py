"""FinQA: numerical questions over financial reports, answered by a program the model writes (Chen et al., 2021)."""

from adaptserve.finqa.data import FinQADataError, FinQARecord, data_hash, load_finqa
from adaptserve.finqa.metrics import Scored, answers_match, parse_numeric_answer, plain_answer_matches, score, score_output
from adaptserve.finqa.program import ProgramError, Ref, Step, execute_program, extract_program, parse_program
from adaptserve.finqa.prompts import (
    BASE_STYLE,
    PromptStyle,
    adapter_style,
    build_context,
    build_prompt,
    completion_text,
    linearize_table,
    record_prompt,
    task_prompt,
)

__all__ = [
    "BASE_STYLE",
    "FinQADataError",
    "FinQARecord",
    "ProgramError",
    "PromptStyle",
    "Ref",
    "Scored",
    "Step",
    "adapter_style",
    "answers_match",
    "build_context",
    "build_prompt",
    "completion_text",
    "data_hash",
    "execute_program",
    "extract_program",
    "linearize_table",
    "load_finqa",
    "parse_numeric_answer",
    "parse_program",
    "plain_answer_matches",
    "record_prompt",
    "score",
    "score_output",
    "task_prompt",
]
