"""Rebuild the shipped sample from the recovered FinQA splits: `python -m adaptserve.finqa.make_sample DATA_DIR`.

The selection is deterministic. Records are ranked by context length (then id), so demos and tests stay fast.
First, for each program feature in FEATURES, the shortest record that has it is taken (when the split has one);
the rest is filled with the shortest records left. dev is drawn from dev.json[:300] only, the slice the
project's README reserves for selection, so nothing shipped overlaps the training data (train + dev[300:]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from adaptserve.finqa.data import SAMPLE_DIR, FinQARecord, load_finqa
from adaptserve.finqa.metrics import answers_match
from adaptserve.finqa.program import OPS, ProgramError, execute_program
from adaptserve.finqa.prompts import build_context

log = logging.getLogger(__name__)

SAMPLE_SIZE = 25
FEWSHOT_SIZE = 4
DEV_SELECTION_SLICE = 300


def _uses(op: str) -> Callable[[FinQARecord], bool]:
    return lambda r: f"{op}(" in r.program


FEATURES: dict[str, Callable[[FinQARecord], bool]] = {
    **{op: _uses(op) for op in OPS},
    "step reference": lambda r: "#" in r.program,
    "constant": lambda r: "const_" in r.program,
    "percent argument": lambda r: "%" in r.program,
    "three or more steps": lambda r: r.program.count("),") >= 2,
}
# Exemplars show the common shapes (chained steps with #n and constants, multiply, add). greater and table_*
# are left to the system prompt: they are ~2% of FinQA and their shortest train records would push the
# few-shot part past its budget (~4,800 characters, ~1,200 tokens).
FEWSHOT_FEATURES = ("step reference", "multiply", "add")


def select(records: Sequence[FinQARecord], size: int, features: Sequence[str]) -> list[FinQARecord]:
    ranked = sorted(records, key=lambda r: (len(build_context(r)), r.id))
    chosen: list[FinQARecord] = []
    for name in features:
        hit = next((r for r in ranked if FEATURES[name](r) and r not in chosen), None)
        if hit is not None:
            chosen.append(hit)
    chosen += [r for r in ranked if r not in chosen][: size - len(chosen)]
    return chosen


def _reproduces(record: FinQARecord) -> bool:
    try:
        return answers_match(execute_program(record.program, record.table), record.answer)
    except ProgramError:
        return False


def write(records: Sequence[FinQARecord], path: Path) -> None:
    path.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1) + "\n", encoding="utf-8")
    log.info("wrote %d records (%d bytes) to %s", len(records), path.stat().st_size, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with FinQA train.json, dev.json and test.json")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pools = {
        "dev": load_finqa(args.data_dir, "dev")[:DEV_SELECTION_SLICE],
        "test": load_finqa(args.data_dir, "test"),
        "fewshot": load_finqa(args.data_dir, "train"),
    }
    for split, pool in pools.items():
        pool = [r for r in pool if _reproduces(r)]  # a sample whose gold does not execute would test nothing
        if split == "fewshot":
            chosen = select(pool, FEWSHOT_SIZE, FEWSHOT_FEATURES)
        else:
            chosen = select(pool, SAMPLE_SIZE, list(FEATURES))
        write(chosen, args.out / f"{split}.json")
        covered = [name for name, has in FEATURES.items() if any(has(r) for r in chosen)]
        log.info("%s covers: %s", split, ", ".join(covered))


if __name__ == "__main__":
    main()
