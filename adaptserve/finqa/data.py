"""FinQA records: load the shipped sample, a local .json/.jsonl file (either schema), or a hub dataset.

The simplified schema is flat: `{"id", "question", "pre_text", "post_text", "table", "answer", "program"}`.
The original FinQA files nest `question`, `program` and `exe_ans` under `qa`; hub copies (e.g. ibm/finqa)
carry the executed answer as `final_result` and sometimes only the nested `program_re`. All read the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_SPLITS = ("dev", "test", "fewshot")
_HUB_SPLITS = {"dev": "validation"}  # hub copies of FinQA name the dev split "validation"
_NUMERIC = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class FinQADataError(ValueError):
    """A FinQA source that cannot be read: missing, not JSON, or records without the required fields."""


@dataclass(frozen=True)
class FinQARecord:
    id: str
    question: str
    pre_text: list[str]
    post_text: list[str]
    table: list[list[str]]
    answer: float | str  # the gold executed answer: a float, or "yes"/"no"
    program: str


def load_finqa(source: str | Path | None = None, split: str = "test") -> list[FinQARecord]:
    """Records of `split` from the shipped sample (source None), a local file or directory, or a hub dataset id.

    A directory is read as `<dir>/<split>.json`, the layout of the FinQA repository's dataset folder.
    """
    if source is None:
        if split not in SAMPLE_SPLITS:
            raise FinQADataError(f"no shipped FinQA sample for split {split!r}; have {', '.join(SAMPLE_SPLITS)}")
        return _load_file(SAMPLE_DIR / f"{split}.json")
    path = Path(source)
    if path.is_dir():
        return _load_file(path / f"{split}.json")
    if isinstance(source, Path) or path.suffix in (".json", ".jsonl") or path.exists():
        return _load_file(path)
    return _load_hub(str(source), split)


def data_hash(records: Sequence[FinQARecord]) -> str:
    """sha256 over a canonical JSON of the records, to pin the exact data behind a training run."""
    canonical = json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _load_file(path: Path) -> list[FinQARecord]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FinQADataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FinQADataError(f"{path}: cannot read: {err}") from err
    if path.suffix == ".jsonl":
        rows = [_parse_json(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        rows = _parse_json(text, str(path))
        if not isinstance(rows, list):
            raise FinQADataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    records = [_record(row, f"{path} record {i}") for i, row in enumerate(rows)]
    log.info("loaded %d FinQA records from %s", len(records), path)
    return records


def _load_hub(name: str, split: str) -> list[FinQARecord]:
    try:
        import datasets  # type: ignore[import-not-found]  # optional (the "hub" extra); files never need it
    except ImportError as err:
        raise FinQADataError(f"loading {name!r} from the Hugging Face hub needs `pip install datasets`") from err
    try:
        rows = datasets.load_dataset(name, split=_HUB_SPLITS.get(split, split))
    except Exception as err:  # network, auth, missing split, script errors: all mean "this source did not load"
        raise FinQADataError(f"could not load {name!r} split {split!r} from the hub: {err}") from err
    records = [_record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(rows)]
    log.info("loaded %d FinQA records from hub dataset %s[%s]", len(records), name, split)
    return records


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FinQADataError(f"{where}: not valid JSON: {err}") from err


def _record(raw: Any, where: str) -> FinQARecord:
    if not isinstance(raw, dict):
        raise FinQADataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    flat = {**raw, **raw["qa"]} if isinstance(raw.get("qa"), dict) else raw
    if isinstance(flat.get("id"), str):
        where = f"{where} (id {flat['id']!r})"

    def field(*names: str) -> Any:
        for name in names:
            if flat.get(name) is not None:
                return flat[name]
        raise FinQADataError(f"{where}: missing field {' or '.join(map(repr, names))}")

    def strings(name: str) -> list[str]:
        value = field(name)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise FinQADataError(f"{where}: field {name!r} must be a list of strings")
        return value

    record_id, question, program = field("id"), field("question"), field("program", "program_re")
    for name, value in (("id", record_id), ("question", question), ("program", program)):
        if not isinstance(value, str):
            raise FinQADataError(f"{where}: field {name!r} must be a string")
    table = field("table")
    if not isinstance(table, list) or not all(isinstance(row, list) and all(isinstance(c, str) for c in row) for row in table):
        raise FinQADataError(f"{where}: field 'table' must be a list of rows of strings")
    # exe_ans (original) and final_result (hub) are executed answers; a bare `answer` is that only in our schema.
    answer = _answer(field("exe_ans", "final_result", "answer"), where)
    return FinQARecord(record_id, question, strings("pre_text"), strings("post_text"), table, answer, program)


def _answer(value: Any, where: str) -> float | str:
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower()
    if isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise FinQADataError(f"{where}: answer must be a finite number or 'yes'/'no', got {value!r}")
