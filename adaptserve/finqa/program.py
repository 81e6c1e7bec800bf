"""The FinQA program DSL: parse and execute programs such as `subtract(5829, 5735), divide(#0, 5735)`.

Semantics follow the official FinQA evaluate.py (czyssrs/FinQA): every op takes two arguments, `#n` is the
result of step n (0-based), `const_100` is 100 and `const_m1` is -1, `27.9%` reads as 0.279, table cells are
read like its `process_row`, and the final result is rounded to 5 decimals. Where evaluate.py returns "n/a",
this module raises ProgramError saying why, and no input string raises anything else.

Nested calls (FinQA's `program_re` form, `divide(subtract(5829, 5735), 5735)`) are flattened into steps;
`#n` in a program that mixes both forms counts top-level steps, as the writer sees them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_DEPTH = 8  # nested calls; deeper input is certainly not a FinQA program, and recursion must stay bounded

ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.truediv,
    "exp": operator.pow,
}
TABLE_OPS: dict[str, Callable[[list[float]], float]] = {
    "table_max": max,
    "table_min": min,
    "table_sum": sum,
    "table_average": lambda values: sum(values) / len(values),
}
OPS = (*ARITHMETIC, "greater", *TABLE_OPS)


class ProgramError(ValueError):
    """A program that cannot be parsed or executed."""


@dataclass(frozen=True)
class Ref:
    """`#n`: the result of step `index` in the flat step list."""

    index: int


# A number or a step reference for arithmetic ops; a row name and None (`none`) for table ops.
Arg = float | Ref | str | None


@dataclass(frozen=True)
class Step:
    """One operation; parse_program gives two args, execute_program checks hand-built ones."""

    op: str
    args: tuple[Arg, ...]


_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_REF = re.compile(r"#([0-9]{1,6})(?![0-9])")
_CONST = re.compile(r"const_(m?)([0-9]{1,12})(?![A-Za-z0-9_])", re.IGNORECASE)
_NONE = re.compile(r"none(?![A-Za-z0-9_])", re.IGNORECASE)
# `5,829` groups thousands only with exactly three digits after each comma, so `add(5,6)` stays two arguments.
_DIGITS = r"(?:[0-9]{1,3}(?:,[0-9]{3}(?![0-9]))+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+"
# Single optional spaces (`- $ 5 %`): unbounded `\s*` between optional parts backtracks polynomially on long blanks.
_NUMBER = re.compile(rf"([-+]?)\s?\$?\s?([-+]?)\s?({_DIGITS})\s?(%?)")
_CELL = re.compile(r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(%?)")
_OP_START = re.compile(rf"\b(?:{'|'.join(OPS)})\s*\(", re.IGNORECASE)
_EOF_TOKEN = re.compile(r"EOF(?![A-Za-z0-9_])", re.IGNORECASE)
_PAREN = {"(": 1, ")": -1}


def parse_program(text: str) -> list[Step]:
    """Parse DSL text into a flat list of steps; `#n` becomes `Ref` to a flat step index."""
    body = text.strip()
    if body[-3:].upper() == "EOF":  # the official tokenised programs end with an EOF token
        body = body[:-3].rstrip().removesuffix(",").rstrip()
    if not body:
        raise ProgramError("empty program")
    steps: list[Step] = []
    tops: list[int] = []  # flat index of each top-level step, to resolve `#n`
    pos = 0
    while True:
        pos = _parse_call(body, pos, steps, tops, depth=0)
        tops.append(len(steps) - 1)
        pos = _skip_space(body, pos)
        if pos == len(body):
            return steps
        if body[pos] == ",":
            pos += 1
        elif not _CALL.match(body, pos):  # the tokenised form separates steps by spaces only
            raise ProgramError(f"unexpected text after step {len(tops) - 1}: {_snippet(body, pos)}")


def execute_program(program: str | Sequence[Step], table: Sequence[Sequence[str]] | None = None) -> float | str:
    """Run a program; numbers come back rounded to 5 decimals, `greater` gives "yes"/"no"."""
    steps = parse_program(program) if isinstance(program, str) else list(program)
    if not steps:
        raise ProgramError("empty program")
    results: list[float | str] = []
    for index, step in enumerate(steps):
        results.append(_execute_step(index, step, results, table))
    final = results[-1]
    return final if isinstance(final, str) else round(final, 5)


def extract_program(text: str) -> str | None:
    """The first program in free model output (prose, code fences and a trailing period are ignored).

    Candidates start at an op name followed by `(`; the first that parses wins. When none parses, the first
    candidate is returned so that executing it reports what is wrong; None means no candidate at all.
    """
    first: str | None = None
    pos = 0
    while match := _OP_START.search(text, pos):
        pos = _program_end(text, match.start())
        candidate = text[match.start() : pos].strip()
        try:
            parse_program(candidate)
        except ProgramError:
            first = first or candidate
            continue
        return candidate
    return first


# ---- parsing ----


def _parse_call(text: str, pos: int, steps: list[Step], tops: list[int], depth: int) -> int:
    """Parse `op(a, b)` at `pos`, appending its step (after any nested ones); return the position after it."""
    match = _CALL.match(text, pos)
    if not match:
        raise ProgramError(f"expected an operation at position {pos}: {_snippet(text, pos)}")
    op = match.group(1).lower()
    if op not in OPS:
        raise ProgramError(f"unknown operation {match.group(1)!r}; known: {', '.join(OPS)}")
    if op in TABLE_OPS:
        args, pos = _table_args(text, match.end(), op)
    else:
        args, pos = _value_args(text, match.end(), steps, tops, depth)
    if len(args) != 2:
        raise ProgramError(f"{op} takes 2 arguments, got {len(args)}")
    steps.append(Step(op, tuple(args)))
    return pos


def _value_args(text: str, pos: int, steps: list[Step], tops: list[int], depth: int) -> tuple[list[Arg], int]:
    args: list[Arg] = []
    while True:
        arg, pos = _parse_arg(text, pos, steps, tops, depth)
        args.append(arg)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == ")":
            return args, pos + 1
        else:
            raise ProgramError(f"expected ',' or ')' at position {pos}: {_snippet(text, pos)}")


def _parse_arg(text: str, pos: int, steps: list[Step], tops: list[int], depth: int) -> tuple[Arg, int]:
    pos = _skip_space(text, pos)
    if _CALL.match(text, pos):
        if depth >= MAX_DEPTH:
            raise ProgramError(f"calls nested deeper than {MAX_DEPTH}")
        pos = _parse_call(text, pos, steps, tops, depth + 1)
        return Ref(len(steps) - 1), pos
    if match := _REF.match(text, pos):
        n = int(match.group(1))
        if n >= len(tops):
            raise ProgramError(f"#{n} in step {len(tops)} refers to a step not computed yet")
        return Ref(tops[n]), match.end()
    if match := _CONST.match(text, pos):
        value = float(match.group(2))
        return (-value if match.group(1) else value), match.end()
    if match := _NUMBER.match(text, pos):
        return _number(match), match.end()
    if _NONE.match(text, pos):
        raise ProgramError("'none' is only valid as the second argument of a table operation")
    raise ProgramError(f"bad argument at position {pos}: {_snippet(text, pos)}")


def _number(match: re.Match[str]) -> float:
    sign1, sign2, digits, percent = match.groups()
    value = float(digits.replace(",", ""))
    if math.isinf(value):
        raise ProgramError(f"number too large: {digits[:20]}...")
    if (sign1 == "-") != (sign2 == "-"):
        value = -value
    return value / 100 if percent else value


def _table_args(text: str, pos: int, op: str) -> tuple[list[Arg], int]:
    """`(row name, none)`: the row name is raw text and may itself contain commas or parentheses."""
    depth, end = 1, pos
    while end < len(text):
        depth += _PAREN.get(text[end], 0)
        if depth == 0:
            break
        end += 1
    else:
        raise ProgramError(f"unclosed '(' in {op}")
    name, comma, second = text[pos:end].rpartition(",")
    if not comma or second.strip().lower() != "none":
        raise ProgramError(f"{op} takes (row name, none), got ({text[pos:end][:60]})")
    if not name.strip():
        raise ProgramError(f"{op} has an empty row name")
    return [name.strip(), None], end + 1


def _program_end(text: str, pos: int) -> int:
    """End of the run of calls starting at `pos`, found by balancing parentheses; a call stops at a newline."""
    while match := _OP_START.match(text, pos):
        depth, end = 1, match.end()
        while end < len(text) and depth and text[end] != "\n":
            depth += _PAREN.get(text[end], 0)
            end += 1
        pos = end
        if depth:
            return pos
        gap = _skip_space(text, pos)
        if text.startswith(",", gap):
            gap = _skip_space(text, gap + 1)
        if not _OP_START.match(text, gap):
            eof = _EOF_TOKEN.match(text, gap)
            return eof.end() if eof else pos
        pos = gap
    return pos


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _snippet(text: str, pos: int) -> str:
    rest = text[pos:].strip()
    return repr(rest[:30]) if rest else "end of program"


# ---- execution ----


def _execute_step(index: int, step: Step, results: list[float | str], table: Sequence[Sequence[str]] | None) -> float | str:
    if not isinstance(step, Step) or len(step.args) != 2:
        raise ProgramError(f"step {index} is not an operation with two arguments: {step!r}")
    a, b = step.args
    if step.op in TABLE_OPS:
        if not isinstance(a, str) or b is not None:
            raise ProgramError(f"step {index}: {step.op} takes (row name, none)")
        return TABLE_OPS[step.op](_row_values(a, table))
    if step.op != "greater" and step.op not in ARITHMETIC:
        raise ProgramError(f"step {index}: unknown operation {step.op!r}")
    x, y = _operand(a, index, results), _operand(b, index, results)
    if step.op == "greater":
        return "yes" if x > y else "no"
    if step.op == "divide" and y == 0:
        raise ProgramError(f"step {index}: division by zero")
    try:
        value = ARITHMETIC[step.op](x, y)
    except OverflowError:  # float pow raises where multiply quietly gives inf
        raise ProgramError(f"step {index}: {step.op}({x:g}, {y:g}) overflows") from None
    except ZeroDivisionError:  # 0 to a negative power
        raise ProgramError(f"step {index}: {step.op}({x:g}, {y:g}) divides by zero") from None
    # A negative base to a fractional power is complex in Python; inf comes from overflowing multiply/add.
    if isinstance(value, complex) or not math.isfinite(value):
        raise ProgramError(f"step {index}: {step.op}({x:g}, {y:g}) is not a finite real number")
    return value


def _operand(arg: Arg, index: int, results: list[float | str]) -> float:
    if isinstance(arg, Ref):
        if not 0 <= arg.index < index:
            raise ProgramError(f"step {index}: #{arg.index} does not refer to an earlier step")
        arg = results[arg.index]
    if isinstance(arg, str):
        raise ProgramError(f"step {index}: cannot compute with {arg!r}")
    if not isinstance(arg, (int, float)):
        raise ProgramError(f"step {index}: expected a number, got {arg!r}")
    return float(arg)


def _row_values(name: str, table: Sequence[Sequence[str]] | None) -> list[float]:
    row = _find_row(name, [row for row in table or [] if row])
    values = [value for value in map(_cell_value, row[1:]) if value is not None]
    if not values:
        raise ProgramError(f"table row {name!r} has no numeric cells")
    return values


def _find_row(name: str, table: Sequence[Sequence[str]]) -> Sequence[str]:
    """Exact match on the first cell, then a whitespace/case-insensitive one.

    Like evaluate.py's row dict, the last row of a repeated name wins.
    """
    for key in (lambda s: s, lambda s: " ".join(s.split()).lower()):
        found = [row for row in table if key(str(row[0])) == key(name)]
        if found:
            return found[-1]
    if not table:
        raise ProgramError(f"table row {name!r} requested but there is no table")
    raise ProgramError(f"no table row named {name!r}")


def _cell_value(cell: str) -> float | None:
    """evaluate.py's `process_row` for one cell: drop `$`, cut at `(`, drop commas, `x%` is x/100."""
    text = str(cell).replace("$", "").split("(")[0].replace(",", "").strip()
    match = _CELL.fullmatch(text)
    if not match:
        return None
    value = float(match.group(1))
    return value / 100 if match.group(2) else value
