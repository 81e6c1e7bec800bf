"""Numbers as real financial reports print them, rewritten into the form FinQA's data (and so a FinQA adapter) uses.

FinQA's tables and text never carry thousands separators, write a currency amount as `$ 2480`, a negative table
cell `(3,279)` as `-3279 ( 3279 )`, a percentage as `40.4% ( 40.4 % )`, and an empty cell as `-`. Reports write
`$2,480`, `(3,279)`, a Unicode minus, `—`, `€1,200`. Every rewrite is recorded, so a caller can see what the model
was shown. Text already in FinQA's form comes out unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_MINUS = "\u2212\u2012\u2013\u2014\u2015\ufe63\uff0d"  # unicode minus and dashes used as one
_CURRENCY = r"(?:US\$|\$|€|£|¥)"
_GROUPED = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,]*\d)")  # 1,234,567 but not 1,23 or 12,5
_DASH_BEFORE_DIGIT = re.compile(rf"[{_MINUS}](?=\s?\d)")
_LONE_DASH = re.compile(rf"^\s*[{_MINUS}-]\s*$")
_AMOUNT = re.compile(rf"{_CURRENCY}\s?(?=-?\d)")
_NUMBER = r"\d+(?:\.\d+)?"
# A table cell that is a negative in parentheses, with an optional currency sign inside or out and optional %.
_PAREN_CELL = re.compile(rf"^\s*(\$\s?)?\(\s*(\$\s?)?({_NUMBER})\s*(%?)\s*\)\s*$")
_PERCENT_CELL = re.compile(rf"^\s*(-?{_NUMBER})\s?%\s*$")
_FINQA_CELL = re.compile(r"\(\s.*\s\)\s*$")  # already `-3279 ( 3279 )` or `40.4% ( 40.4 % )`
# 12.5% in text, unless already in FinQA's `12.5% ( 12.5 % )` form (either half of it)
_PERCENT_TEXT = re.compile(rf"(?<![\w.%-])(-?{_NUMBER})\s?%(?!\s*[()])(?![\w-])")


@dataclass(frozen=True)
class Change:
    where: str  # "question", "table[2][1]", "pre_text[0]", "post_text[3]"
    before: str
    after: str


def _common(text: str) -> str:
    """What tables and text share: unicode minus signs, currency signs, thousands separators."""
    text = _DASH_BEFORE_DIGIT.sub("-", text)
    text = _AMOUNT.sub("$ ", text)
    return _GROUPED.sub(lambda m: m.group(1).replace(",", ""), text)


def cell(text: str) -> str:
    """One table cell in FinQA's form."""
    if _LONE_DASH.match(text):
        return "-"
    if _FINQA_CELL.search(text):
        return text
    text = _common(text)
    if paren := _PAREN_CELL.match(text):
        dollar, inner_dollar, number, percent = paren.groups()
        sign = "$ " if dollar or inner_dollar else ""
        return f"{sign}-{number}{percent} ( {number}{' %' if percent else ''} )"
    if percent := _PERCENT_CELL.match(text):
        return f"{percent.group(1)}% ( {percent.group(1)} % )"
    return text


def sentence(text: str) -> str:
    """A sentence of report text (or a question) in FinQA's form."""
    text = _common(text)
    return _PERCENT_TEXT.sub(lambda m: f"{m.group(1)}% ( {m.group(1)} % )", text)


@dataclass(frozen=True)
class Normalized:
    question: str
    table: list[list[str]]
    pre_text: list[str]
    post_text: list[str]
    changes: list[Change]


def normalize(question: str, table: Sequence[Sequence[str]], pre_text: Sequence[str], post_text: Sequence[str]) -> Normalized:
    """Question, table and text in FinQA's form; the header row and row names are kept as they are, except for
    their minus signs and separators."""
    changes: list[Change] = []

    def track(where: str, before: str, after: str) -> str:
        if after != before:
            changes.append(Change(where, before, after))
        return after

    new_table = [
        [track(f"table[{r}][{c}]", text, cell(text) if r > 0 and c > 0 else _common(text)) for c, text in enumerate(row)]
        for r, row in enumerate(table)
    ]
    return Normalized(
        question=track("question", question, sentence(question)),
        table=new_table,
        pre_text=[track(f"pre_text[{i}]", s, sentence(s)) for i, s in enumerate(pre_text)],
        post_text=[track(f"post_text[{i}]", s, sentence(s)) for i, s in enumerate(post_text)],
        changes=changes,
    )
