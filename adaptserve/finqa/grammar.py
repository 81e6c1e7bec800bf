"""A GBNF grammar of FinQA programs, for decoding that can only write one.

Programs are written as FinQA's data writes them: `op(arg, arg)` steps joined by ", ", at most `MAX_STEPS`; step i
may refer to the results of steps 0..i-1 as `#k`; arguments are numbers (optionally %), `const_*` or references;
table operations take one of the table's row names and `none`. With `numbers`, only those numbers may appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from adaptserve.finqa.program import ARITHMETIC, TABLE_OPS

MAX_STEPS = 6  # FinQA's train and dev programs have at most 5
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.#])-?(?:\d+(?:\.\d+)?|\.\d+)")
_ANY_NUMBER = '"-"? ([0-9]+ ("." [0-9]+)? | "." [0-9]+) "%"?'
_CONST = '"const_" ("m1" | [0-9]+)'


def literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def numbers_in(texts: Iterable[str]) -> list[str]:
    """The numbers written in these texts, in first-seen order (years and counts included)."""
    seen: dict[str, None] = {}
    for text in texts:
        for match in _NUMBER_IN_TEXT.finditer(text):
            seen.setdefault(match.group().lstrip("-"), None)
    return list(seen)


def program_grammar(row_names: Sequence[str], numbers: Sequence[str] | None = None) -> str:
    """The grammar; `row_names` are the first cells of the table's rows (table operations take one), `numbers`
    the only numbers allowed (None: any)."""
    ops = " | ".join(literal(op) for op in (*ARITHMETIC, "greater"))
    rules = [f"binop ::= {ops}", f"const ::= {_CONST}"]
    if numbers:
        rules.append(f'number ::= "-"? ({" | ".join(literal(n) for n in numbers)}) "%"?')
    else:
        rules.append(f"number ::= {_ANY_NUMBER}")
    names = [n for n in dict.fromkeys(" ".join(name.split()) for name in row_names) if n and "\n" not in n]
    table_step = ""
    if names:
        rules.append(f"tableop ::= {' | '.join(literal(op) for op in TABLE_OPS)}")
        rules.append(f"row ::= {' | '.join(literal(n) for n in names)}")
        table_step = ' | tableop "(" row ", none)"'
    for i in range(MAX_STEPS):
        refs = f' | "#" [0-{i - 1}]' if i > 1 else (' | "#0"' if i == 1 else "")
        rules.append(f"arg{i} ::= number | const{refs}")
        rules.append(f'step{i} ::= binop "(" arg{i} ", " arg{i} ")"{table_step}')
    rules.append("root ::= step0 " + "".join(f'(", " step{i} ' for i in range(1, MAX_STEPS)) + ")?" * (MAX_STEPS - 1))
    return "\n".join(rules) + "\n"
