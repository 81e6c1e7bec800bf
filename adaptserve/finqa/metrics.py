"""Scoring FinQA outputs: execution accuracy as the official evaluate.py counts it, and plain-answer fallback.

A model that writes a program is scored on the program's execution (exact, like the paper's "execution
accuracy"). A model that writes only a number is scored more leniently by `plain_answer_matches`, so the two
kinds are reported apart in `Scored.kind`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from adaptserve.finqa.data import FinQARecord
from adaptserve.finqa.program import ProgramError, execute_program, extract_program

DECIMALS = 5  # evaluate.py rounds executed answers to 5 decimals before comparing


@dataclass(frozen=True)
class Scored:
    answer: float | str | None
    program: str | None  # the extracted program, also when it failed to execute
    correct: bool
    kind: Literal["program", "plain", "none"]  # what the answer came from
    error: str | None = None  # why the program failed, or why nothing was found


@dataclass(frozen=True)
class _Written:
    """A number as the model wrote it, before any percent sign is applied."""

    value: float
    decimals: int
    significant: int
    percent: bool


_NUM = r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+"
# Spaces around signs are bounded ({0,3}) so that searching a long run of whitespace stays linear.
_TOKEN = re.compile(
    r"\b(?P<word>yes|no)\b(?=[ \t]{0,3}(?:[.,;:!)\n]|$))"  # an answer word ends a clause: not "no change"
    rf"|\(\s{{0,3}}\$?\s{{0,3}}(?P<paren>{_NUM})\s{{0,3}}(?P<paren_pct>%?)\s{{0,3}}\)"  # accounting style: (1.2) is -1.2
    rf"|(?<![\w.])(?P<sign>-?)\s{{0,3}}\$?\s{{0,3}}(?P<num>{_NUM})(?P<pct>\s{{0,3}}(?:%|percent\b))?",
    re.IGNORECASE,
)
_MARKER = re.compile(r"\banswer\b\s*(?:is\b|:|=)?|=", re.IGNORECASE)


def answers_match(pred: float | str | None, gold: float | str) -> bool:
    """The official rule: numbers equal after rounding to 5 decimals; yes/no equal as strings (any case)."""
    if pred is None:
        return False
    if isinstance(pred, str) or isinstance(gold, str):
        return isinstance(pred, str) and isinstance(gold, str) and pred.strip().lower() == gold.strip().lower()
    if not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    return round(float(pred), DECIMALS) == round(float(gold), DECIMALS)


def parse_numeric_answer(text: str) -> float | str | None:
    """The answer in free text: a float ("%" applied, so `1.6%` is 0.016, like the DSL), "yes"/"no", or None.

    The answer is the first number or yes/no after the last "answer:"/"answer is"/"=" marker, else the last one
    in the text; yes/no count only when punctuation or the end of a line follows them. `$` and thousands commas
    are dropped, `(1.2)` is -1.2, and "million"/"billion" are left out: FinQA answers are in the units of the
    report, so `$5.2 million` is 5.2.
    """
    token = _answer_token(text)
    if not isinstance(token, _Written):
        return token
    return token.value / 100 if token.percent else token.value


def plain_answer_matches(pred_text: str, gold: float | str) -> bool:
    """Whether a plain written answer (found as in `parse_numeric_answer`) agrees with the gold answer.

    The written number v is compared with the gold g and with 100·g, since FinQA golds hold percentages
    both as fractions and as percents; a "%" after v is ignored. It matches when v equals either after
    rounding to 5 decimals, or, when v has at least 2 significant digits, when it is within half a unit of
    its last written digit: `1.6%` and `1.6` both match 0.01639 and 1.639, `94` matches 94.0, but `2`
    does not match 1.639. Yes/no compare as strings.
    """
    token = _answer_token(pred_text)
    if not isinstance(token, _Written):
        return answers_match(token, gold)
    if isinstance(gold, str):
        return False
    for target in (gold, 100 * gold):
        if answers_match(token.value, target):
            return True
        # the factor absorbs float error when v sits exactly half a unit away (1.65 written as 1.6)
        if token.significant >= 2 and abs(token.value - target) <= 0.5 * 10**-token.decimals * (1 + 1e-9):
            return True
    return False


def score(predictions: Sequence[float | str | None], records: Sequence[FinQARecord]) -> dict[str, float | int]:
    """Execution accuracy of answers aligned with records (None counts as wrong)."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    correct = sum(answers_match(pred, record.answer) for pred, record in zip(predictions, records, strict=True))
    accuracy = correct / len(records) if records else 0.0
    return {"execution_accuracy": accuracy, "correct": correct, "count": len(records)}


def score_output(text: str, record: FinQARecord) -> Scored:
    """Score raw model output: its program's execution if one runs, else the plain answer it wrote."""
    program = extract_program(text)
    error = None
    if program is not None:
        try:
            answer = execute_program(program, record.table)
        except ProgramError as err:
            error = f"program did not execute: {err}"
            text = text.replace(program, " ")  # the failed program's own numbers are not an answer
        else:
            return Scored(answer, program, answers_match(answer, record.answer), "program")
    plain = parse_numeric_answer(text)
    if plain is None:
        return Scored(None, program, False, "none", error or "no program or answer found")
    return Scored(plain, program, plain_answer_matches(text, record.answer), "plain", error)


def _answer_token(text: str) -> _Written | str | None:
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _TOKEN.search(text, markers[-1].end())
        if after:
            return _token(after)
    tokens = list(_TOKEN.finditer(text))
    return _token(tokens[-1]) if tokens else None


def _token(match: re.Match[str]) -> _Written | str:
    if match.group("word"):
        return match.group("word").lower()
    digits = (match.group("paren") or match.group("num")).replace(",", "")
    negative = match.group("paren") is not None or match.group("sign") == "-"
    whole, _, fraction = digits.partition(".")
    value = float(digits)
    return _Written(
        value=-value if negative else value,
        decimals=len(fraction),
        significant=len((whole + fraction).lstrip("0")),
        percent=bool(match.group("paren_pct") or match.group("pct")),
    )
