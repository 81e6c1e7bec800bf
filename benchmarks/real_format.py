"""A copy of a FinQA file with its numbers printed as financial reports print them, to measure what
`/v1/finqa`'s normalization recovers (adaptserve.finqa.normalize is its inverse).

    .venv/bin/python benchmarks/real_format.py ../shared/data/finqa/test.json runs/test-real-format.json

Table cells and text gain thousands separators (`2480` -> `2,480`), currency signs close up (`$ 2480` -> `$2,480`)
and negative table cells are written in parentheses (`-3279 ( 3279 )` -> `(3,279)`). Years (whole numbers from 1900
to 2099), header rows and row names are left alone; questions, programs and gold answers are not touched. The copy
is data derived from FinQA: write it outside the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from adaptserve.finqa.normalize import normalize

log = logging.getLogger("benchmarks.real_format")

_NUMBER = re.compile(r"(?<![\w.,])(\$ )?(-?)(\d+)(\.\d+)?(?![\w,]|\.\d)")
_FINQA_NEGATIVE = re.compile(r"^\s*(\$ )?-(\d+(?:\.\d+)?)\s*(%?)\s*\(\s*[\d.]+\s*%?\s*\)\s*$")  # -3279 ( 3279 )


def grouped(whole: str) -> str:
    return f"{int(whole):,}"


def _number(match: re.Match[str]) -> str:
    dollar, minus, whole, fraction = match.group(1) or "", match.group(2), match.group(3), match.group(4) or ""
    if not dollar and not fraction and 1900 <= int(whole) <= 2099:
        return match.group(0)  # a year
    return f"{minus}{'$' if dollar else ''}{grouped(whole)}{fraction}"


def text(sentence: str) -> str:
    return _NUMBER.sub(_number, sentence)


def cell(value: str) -> str:
    if negative := _FINQA_NEGATIVE.match(value):
        dollar, number, percent = negative.groups()
        whole, _, fraction = number.partition(".")
        return f"{'$' if dollar else ''}({grouped(whole)}{'.' + fraction if fraction else ''}{percent})"
    return text(value)


def rewrite(record: dict) -> dict:
    table = [row if r == 0 else [row[0], *(cell(c) for c in row[1:])] for r, row in enumerate(record["table"])]
    return {
        **record,
        "table": table,
        "pre_text": [text(s) for s in record["pre_text"]],
        "post_text": [text(s) for s in record["post_text"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a FinQA JSON file (a list of records)")
    parser.add_argument("target", type=Path, help="where the real-format copy goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records = json.loads(args.source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        parser.error(f"cannot read {args.source}: {err}")
    copies = [rewrite(r) for r in records]
    cells = sum(
        a != b
        for r, c in zip(records, copies, strict=True)
        for ra, rb in zip(r["table"], c["table"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    sentences = sum(
        a != b
        for r, c in zip(records, copies, strict=True)
        for k in ("pre_text", "post_text")
        for a, b in zip(r[k], c[k], strict=True)
    )
    restored = sum(_restored(r, c) for r, c in zip(records, copies, strict=True))
    args.target.parent.mkdir(parents=True, exist_ok=True)
    args.target.write_text(json.dumps(copies, indent=1) + "\n", encoding="utf-8")
    log.info(
        "%s: %d records, %d table cells and %d sentences rewritten; normalization restores the table of %d records exactly",
        args.target,
        len(copies),
        cells,
        sentences,
        restored,
    )


def _restored(original: dict, copy: dict) -> bool:
    back = normalize(copy["question"], copy["table"], copy["pre_text"], copy["post_text"])
    return back.table == original["table"]


if __name__ == "__main__":
    main()
