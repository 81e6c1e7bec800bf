"""lm-evaluation-harness hooks for the tasks in this folder: data, prompts and scoring come from adaptserve.

The FinQA tasks read the shipped sample through `adaptserve.finqa.load_finqa` and the multiple-choice task reads
the JSONL beside this file, so no dataset path is resolved against the working directory and nothing comes from
the hub. FinQA records are prompted the way the shipped adapter was trained (zero-shot, its training run's
retrieval depth) and scored by executing the program the model writes (`finqa.score_output`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import datasets

from adaptserve import finqa
from adaptserve.models import resolve

HERE = Path(__file__).resolve().parent
ADAPTER = "smollm2-135m-finqa"  # the prompt style follows this adapter's training run
FINQA_SPLIT = "test"
MC_FILE = HERE / "finance_mc.jsonl"


@functools.lru_cache(maxsize=1)
def _records() -> dict[str, finqa.FinQARecord]:
    return {r.id: r for r in finqa.load_finqa(None, FINQA_SPLIT)}


@functools.lru_cache(maxsize=1)
def _style() -> finqa.PromptStyle:
    return finqa.adapter_style(resolve(ADAPTER).path)


def finqa_dataset(**_: Any) -> datasets.DatasetDict:
    """The shipped sample's test split with its prompts: the system and user turns, and the same as plain text."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([_finqa_doc(r) for r in _records().values()])})


def _finqa_doc(record: finqa.FinQARecord) -> dict[str, str]:
    messages = finqa.record_prompt(record, _style(), chat=True)
    assert isinstance(messages, list)
    system, user = messages  # zero-shot: the instruction, then the record
    return {
        "id": record.id,
        "answer": str(record.answer),
        "system": system["content"],
        "user": user["content"],
        "text": finqa.completion_text(messages),
    }


def finqa_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Execution accuracy (the program run and compared with the gold answer) and whether a program ran at all."""
    scored = finqa.score_output(results[0], _records()[doc["id"]])
    return {
        "exec_acc": float(scored.correct),
        "program_ran": float(scored.kind == "program"),
    }


def mc_dataset(**_: Any) -> datasets.DatasetDict:
    """The multiple-choice items in `finance_mc.jsonl`, one JSON object a line."""
    rows = [json.loads(line) for line in MC_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
