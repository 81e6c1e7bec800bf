"""FinQA data, program DSL, scoring and prompts: fast, no model."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
from pathlib import Path

import pytest

from adaptserve.finqa import (
    FinQADataError,
    FinQARecord,
    ProgramError,
    Ref,
    Step,
    answers_match,
    build_context,
    build_prompt,
    completion_text,
    data_hash,
    execute_program,
    extract_program,
    linearize_table,
    load_finqa,
    parse_numeric_answer,
    parse_program,
    plain_answer_matches,
    score,
    score_output,
)
from adaptserve.finqa.data import SAMPLE_DIR, SAMPLE_SPLITS

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "finqa"

TABLE = [
    ["", "2016", "2015"],
    ["Net  Income", "$ 1,200", "$ 900"],
    ["operating margin", "27.9% ( 27.9 % )", "25%"],
    ["losses", "$ -8683 ( 8683 )", "-5 ( 5 )"],
    ["notes", "n/a", "-"],
]

RECORD = FinQARecord(
    id="ETR/2016/page_23.pdf-2",
    question="what is the net change in net revenue during 2015?",
    pre_text=["entergy corporation net revenue .", ".", ".", "the table compares 2015 to 2014 ."],
    post_text=["net revenue rose on rate actions .", "."],
    table=[["", "amount ( in millions )"], ["2014 net revenue", "$ 5735"], ["2015 net revenue", "$ 5829"]],
    answer=94.0,
    program="subtract(5829, 5735)",
)


def _failures(records: list[FinQARecord]) -> list[str]:
    failures = []
    for r in records:
        try:
            got = execute_program(r.program, r.table)
        except ProgramError as err:
            failures.append(f"{r.id}: {r.program}: {err}")
            continue
        if not answers_match(got, r.answer):
            failures.append(f"{r.id}: {r.program} gave {got!r}, gold {r.answer!r}")
    return failures


# ---- gold programs ----


def test_sample_gold_programs_reproduce_their_answers() -> None:
    records = [r for split in SAMPLE_SPLITS for r in load_finqa(None, split)]
    failures = _failures(records)
    ok = len(records) - len(failures)
    log.info("sample: %d/%d gold programs reproduce", ok, len(records))
    assert ok == len(records) == 54, f"{ok}/{len(records)} sample gold programs reproduce: {failures}"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared FinQA data at {SHARED_DATA}")
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_shared_gold_programs_reproduce_their_answers(split: str) -> None:
    records = load_finqa(SHARED_DATA, split)
    failures = _failures(records)
    ok = len(records) - len(failures)
    log.info("%s: %d/%d gold programs reproduce", split, ok, len(records))
    assert records and ok >= 0.99 * len(records), f"{split}: {ok}/{len(records)} reproduce; first: {failures[:5]}"


def test_sample_covers_every_op_and_fits() -> None:
    programs = " ".join(r.program for split in ("dev", "test") for r in load_finqa(None, split))
    for feature in (
        "add(",
        "subtract(",
        "multiply(",
        "divide(",
        "exp(",
        "greater(",
        "table_max(",
        "table_min(",
        "table_sum(",
        "table_average(",
        "#",
        "const_",
        "%",
    ):
        assert feature in programs
    size = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir())
    assert size < 1_000_000


# ---- loader ----


def test_loads_simplified_and_original_schemas(tmp_path: Path) -> None:
    simple = dataclasses.asdict(RECORD)
    original = {
        "id": RECORD.id,
        "pre_text": RECORD.pre_text,
        "post_text": RECORD.post_text,
        "table": RECORD.table,
        "table_ori": RECORD.table,
        "filename": "ETR/2016/page_23.pdf",
        "qa": {
            "question": RECORD.question,
            "answer": "94",
            "exe_ans": 94.0,
            "program": RECORD.program,
            "program_re": "subtract(5829, 5735)",
            "gold_inds": {"table_1": "2015 net revenue is $ 5829"},
        },
    }
    (tmp_path / "simple.json").write_text(json.dumps([simple]))
    (tmp_path / "original.json").write_text(json.dumps([original]))
    (tmp_path / "lines.jsonl").write_text(json.dumps(original) + "\n\n" + json.dumps(simple) + "\n")
    assert load_finqa(tmp_path / "simple.json") == [RECORD]
    assert load_finqa(str(tmp_path / "original.json")) == [RECORD]
    assert load_finqa(tmp_path / "lines.jsonl") == [RECORD, RECORD]
    (tmp_path / "dev.json").write_text(json.dumps([simple]))
    assert load_finqa(tmp_path, split="dev") == [RECORD]  # a directory reads <dir>/<split>.json


def test_loader_coerces_hub_style_answers(tmp_path: Path) -> None:
    rows = [
        {**dataclasses.asdict(RECORD), "answer": "1.6%", "final_result": "94.0"},
        {**dataclasses.asdict(RECORD), "answer": "Yes"},
    ]
    (tmp_path / "hub.json").write_text(json.dumps(rows))
    assert [r.answer for r in load_finqa(tmp_path / "hub.json")] == [94.0, "yes"]


def _bad_record(**changes: object) -> list[dict]:
    raw = dataclasses.asdict(RECORD)
    raw.update(changes)
    return [{k: v for k, v in raw.items() if v is not ...}]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        ("[{]", "not valid JSON"),
        ('{"data": []}', "expected a JSON list"),
        ("[1]", "expected a JSON object"),
        (_bad_record(question=...), "missing field 'question'"),
        (_bad_record(answer=...), "missing field"),
        (_bad_record(table=[["a", 1]]), "field 'table'"),
        (_bad_record(pre_text="one string"), "field 'pre_text'"),
        (_bad_record(answer="about 94"), "answer must be"),
        (_bad_record(answer=float("nan")), "answer must be"),
        (_bad_record(program=7), "field 'program'"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, content: object, problem: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(FinQADataError, match=problem) as err:
        load_finqa(path)
    assert str(path) in str(err.value)


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dataclasses.asdict(RECORD)) + "\nnot json\n")
    with pytest.raises(FinQADataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_finqa(path)


def test_unknown_sample_split() -> None:
    with pytest.raises(FinQADataError, match="no shipped FinQA sample for split 'train'"):
        load_finqa(None, "train")


def test_hub_errors_are_data_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FinQADataError, match="needs `pip install datasets`"):
        load_finqa("ibm/finqa")

    def load_dataset(name: str, split: str) -> None:
        raise ConnectionError(f"offline: {name} {split}")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(FinQADataError, match=r"could not load 'ibm/finqa' split 'dev'.*offline: ibm/finqa validation"):
        load_finqa("ibm/finqa", "dev")


def test_data_hash_is_canonical() -> None:
    records = load_finqa(None, "dev")
    assert data_hash(records) == data_hash(load_finqa(None, "dev"))
    assert len(data_hash(records)) == 64
    assert data_hash(records) != data_hash(records[1:])
    assert data_hash([RECORD]) != data_hash([dataclasses.replace(RECORD, answer=95.0)])


# ---- programs ----


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("subtract(5829, 5735), divide(#0, 5735)", 0.01639),
        ("subtract(5829, 5735), divide(#0, 5735), EOF", 0.01639),  # official tokenised programs end in EOF
        ("subtract(5829, 5735) divide(#0, 5735) EOF", 0.01639),
        ("divide(subtract(5829, 5735), 5735)", 0.01639),  # FinQA's nested program_re form
        ("divide(subtract(5829, 5735), 5735), multiply(#0, const_100)", 1.63906),
        ("subtract(5,829, 5,735)", 94.0),
        ("add($ 1,000, 27.9%)", 1000.279),
        ("add(-$5, 3)", -2.0),
        ("subtract(.455, .450)", 0.005),
        ("multiply(const_m1, const_1000)", -1000.0),
        ("ADD(CONST_2, 1)", 3.0),
        ("exp(2, 10)", 1024.0),
        ("greater(1, 2)", "no"),
        ("subtract(17.84, 4.11), subtract(60.15, 41.30), greater(#1, #0)", "yes"),
        ("table_sum(Net  Income, none)", 2100.0),
        ("table_average(net income, none)", 1050.0),  # whitespace/case-normalised row match
        ("table_max(operating margin, none)", 0.279),  # "27.9% ( 27.9 % )" reads as 0.279
        ("table_min(losses, none)", -8683.0),
        ("table_average(operating margin, none), table_max(operating margin, none), subtract(#1, #0)", 0.0145),
    ],
)
def test_executes(program: str, expected: float | str) -> None:
    assert execute_program(program, TABLE) == expected


@pytest.mark.parametrize(
    ("program", "problem"),
    [
        ("", "empty program"),
        ("   EOF ", "empty program"),
        ("foo(1, 2)", "unknown operation 'foo'"),
        ("add(1)", "takes 2 arguments, got 1"),
        ("add(1, 2, 3)", "takes 2 arguments, got 3"),
        ("add()", "bad argument"),
        ("add(1,, 2)", "bad argument"),
        ("add(abc, 2)", "bad argument"),
        ("add(nan, 2)", "bad argument"),
        ("add(1e5, 2)", "expected ',' or '\\)'"),
        ("add(" + "9" * 400 + ", 1)", "number too large"),
        ("add(#0, 1)", "#0 in step 0 refers to a step not computed yet"),
        ("add(1, 2), add(#1, 1)", "#1 in step 1"),
        ("add(#99999999999, 1)", "bad argument"),
        ("add(1, 2) junk", "unexpected text after step 0"),
        ("add(1, 2),", "expected an operation"),
        ("add(1, 2", "expected ',' or '\\)'"),
        ("add(1, 2))", "unexpected text"),
        ("divide(1, 0)", "division by zero"),
        ("subtract(1, 1), divide(5, #0)", "division by zero"),
        ("exp(10, 1000)", "overflows"),
        ("exp(0, -1)", "divides by zero"),
        ("exp(-8, 0.5)", "not a finite real number"),
        ("multiply(" + "9" * 300 + ", " + "9" * 300 + ")", "not a finite real number"),
        ("add(1, none)", "'none' is only valid"),
        ("add(1, 2), greater(#0, 1), add(#1, 1)", "cannot compute with 'yes'"),
        ("table_max(nope, none)", "no table row named 'nope'"),
        ("table_max(notes, none)", "no numeric cells"),
        ("table_max(losses, 1)", "takes \\(row name, none\\)"),
        ("table_max(, none)", "empty row name"),
        ("table_max(losses, none", "unclosed"),
        ("add(" * 20 + "1, 2" + ")" * 20, "nested deeper than 8"),
    ],
)
def test_malformed_programs_raise_program_error(program: str, problem: str) -> None:
    with pytest.raises(ProgramError, match=problem):
        execute_program(program, TABLE)


def test_table_ops_need_a_table() -> None:
    with pytest.raises(ProgramError, match="there is no table"):
        execute_program("table_max(losses, none)")


@pytest.mark.parametrize(
    "text",
    [
        "(",
        ")",
        ",",
        "#",
        "%",
        "$",
        "-",
        "add",
        "add(",
        "add(-",
        "add($",
        "add(#",
        "add(1,",
        "table_max(",
        "EOF EOF",
        "add(1, 2)EOF",
        "add(const_, 1)",
        "add(const_m, 1)",
        "add(١٢, 1)",
        "\x00",
        "add(1\n, 2)",
        "((((add(1, 2))))",
        "add(" + " " * 5000 + "x)",
        "subtract(1, 2" + ")" * 50,
    ],
)
def test_odd_strings_give_a_value_or_program_error(text: str) -> None:
    try:
        execute_program(text, TABLE)
    except ProgramError:
        pass


def test_steps_can_be_built_by_hand() -> None:
    steps = [Step("subtract", (5829.0, 5735.0)), Step("divide", (Ref(0), 5735.0))]
    assert parse_program("subtract(5829, 5735), divide(#0, 5735)") == steps
    assert execute_program(steps) == 0.01639
    for bad, problem in [
        ([], "empty program"),
        ([Step("add", (Ref(0), 1.0))], "does not refer to an earlier step"),
        ([Step("add", (1.0,))], "not an operation with two arguments"),
        ([Step("power", (1.0, 2.0))], "unknown operation"),
        ([Step("add", ("row", 2.0))], "cannot compute with 'row'"),
        ([Step("table_sum", (1.0, None))], "takes \\(row name, none\\)"),
    ]:
        with pytest.raises(ProgramError, match=problem):
            execute_program(bad, TABLE)


def test_nested_calls_flatten_and_hash_refs_count_top_level_steps() -> None:
    steps = parse_program("divide(subtract(5829, 5735), 5735), multiply(#0, const_100)")
    assert [s.op for s in steps] == ["subtract", "divide", "multiply"]
    assert steps[2].args == (Ref(1), 100.0)


@pytest.mark.parametrize(
    ("text", "program"),
    [
        ("Program: subtract(5829, 5735), divide(#0, 5735)\nAnswer: 1.6%", "subtract(5829, 5735), divide(#0, 5735)"),
        ("```\nsubtract(5829, 5735), divide(#0, 5735)\n```", "subtract(5829, 5735), divide(#0, 5735)"),
        ("The change is subtract(5829, 5735), divide(#0, 5735).", "subtract(5829, 5735), divide(#0, 5735)"),
        ("subtract(5829, 5735), divide(#0, 5735), EOF and more", "subtract(5829, 5735), divide(#0, 5735), EOF"),
        ("steps:\nsubtract(1, 2)\ndivide(#0, 3)\ndone", "subtract(1, 2)\ndivide(#0, 3)"),
        ("We add(ed) nothing; table_max(net income ( loss ), none).", "table_max(net income ( loss ), none)"),
        ("Use divide(a, b) so: divide(94, 5735)", "divide(94, 5735)"),  # the first candidate that parses
        ("divide(a, b) and nothing else", "divide(a, b)"),  # none parses: the first, so execution says why
        ("subtract(1, 2\nAnswer: 3", "subtract(1, 2"),
        ("the answer is 94", None),
        ("", None),
    ],
)
def test_extract_program(text: str, program: str | None) -> None:
    assert extract_program(text) == program


# ---- metrics ----


def test_answers_match_official_rule() -> None:
    assert answers_match(0.016390000001, 0.01639)
    assert answers_match(94, 94.0)
    assert not answers_match(0.0164, 0.01639)
    assert answers_match("Yes", "yes") and answers_match(" no", "no")
    assert not answers_match("yes", 1.0) and not answers_match(1.0, "yes")
    assert not answers_match(None, 94.0)
    assert not answers_match(float("nan"), 94.0)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The answer is 94.", 94.0),
        ("Answer: $5,829 million", 5829.0),
        ("It fell to (1.2) billion", -1.2),
        ("a decline of -3.5", -3.5),
        ("Answer: 1.6% (5829 vs 5735)", 0.016),
        ("growth of 12 percent", 0.12),
        ("From 2014 to 2015 revenue rose to 5829", 5829.0),
        ("2014-2015 change = 94", 94.0),
        ("Answer: Yes, it did.", "yes"),
        ("no", "no"),
        ("No, it did not grow.", "no"),
        ("there is no change in 2015", 2015.0),
        ("\u22123.5", -3.5),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_parse_numeric_answer(text: str, answer: float | str | None) -> None:
    assert parse_numeric_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "gold", "matches"),
    [
        ("1.6%", 0.01639, True),
        ("1.6", 0.01639, True),
        ("1.6%", 1.639, True),
        ("1.64%", 1.639, True),
        ("0.016", 0.01639, True),
        ("0.0164", 0.01639, True),
        ("1.7%", 0.01639, False),
        ("1.63%", 0.01639, False),  # written to 2 decimals, so it must agree to 2 decimals
        ("2", 1.639, False),  # one significant digit is too coarse to count
        ("Answer: 94", 94.0, True),
        ("The answer is $ 5,829", 5829.0, True),
        ("-42", -42.0, True),
        ("42", -42.0, False),
        ("(42)", -42.0, True),
        ("0", 0.0, True),
        ("0", 0.004, False),
        ("Answer: yes", "yes", True),
        ("Answer: no", "yes", False),
        ("94", "yes", False),
        ("nothing", 94.0, False),
    ],
)
def test_plain_answer_matches(text: str, gold: float | str, matches: bool) -> None:
    assert plain_answer_matches(text, gold) is matches


def test_score() -> None:
    records = [RECORD, dataclasses.replace(RECORD, answer="yes"), dataclasses.replace(RECORD, answer=0.01639)]
    assert score([94.0, "YES", None], records) == {"execution_accuracy": 2 / 3, "correct": 2, "count": 3}
    assert score([], []) == {"execution_accuracy": 0.0, "correct": 0, "count": 0}
    with pytest.raises(ValueError):
        score([94.0], records)


def test_score_output_prefers_the_program() -> None:
    scored = score_output("Program: subtract(5829, 5735)\nAnswer: 93", RECORD)
    assert (scored.kind, scored.answer, scored.correct, scored.error) == ("program", 94.0, True, None)

    failed = score_output("subtract(5829, five)\nAnswer: 94", RECORD)
    assert (failed.kind, failed.answer, failed.correct) == ("plain", 94.0, True)
    assert failed.program == "subtract(5829, five)" and "bad argument" in failed.error

    # the numbers inside a failed program are not taken as the answer
    nothing = score_output("divide(94, 0)", RECORD)
    assert (nothing.kind, nothing.answer, nothing.correct) == ("none", None, False)
    assert "division by zero" in nothing.error

    plain = score_output("The net change is $94 million.", RECORD)
    assert (plain.kind, plain.answer, plain.correct, plain.program) == ("plain", 94.0, True, None)

    empty = score_output("I don't know.", RECORD)
    assert (empty.kind, empty.correct, empty.error) == ("none", False, "no program or answer found")


# ---- prompts ----


def test_linearize_table_and_context() -> None:
    assert linearize_table([["", "2016"], ["net  income", " $ 5 "], ["", ""]]) == "| 2016\nnet income | $ 5"
    context = build_context(RECORD)
    assert context.splitlines() == [
        "entergy corporation net revenue . the table compares 2015 to 2014 .",
        "Table:",
        "| amount ( in millions )",
        "2014 net revenue | $ 5735",
        "2015 net revenue | $ 5829",
        "net revenue rose on rate actions .",
    ]
    short = build_context(RECORD, max_sentences=1)  # the sentences nearest the table
    assert short.startswith("the table compares") and short.endswith("rate actions .")
    assert build_context(RECORD, max_sentences=0).startswith("Table:")


def test_build_prompt_messages() -> None:
    messages = build_prompt(RECORD)
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert roles[1:] == ["user", "assistant"] * ((len(roles) - 2) // 2) + ["user"]
    assert all(set(m) == {"role", "content"} and m["content"] for m in messages)
    fewshot = load_finqa(None, "fewshot")
    assert [m["content"] for m in messages if m["role"] == "assistant"] == [r.program for r in fewshot]
    for r in fewshot:
        execute_program(r.program, r.table)  # exemplars show programs that run
    target = messages[-1]["content"]
    assert RECORD.question in target and "2015 net revenue | $ 5829" in target
    assert sum(len(m["content"]) for m in messages[:-1]) < 4800  # few-shot part stays ~1,200 tokens
    assert (
        build_prompt(question=RECORD.question, pre_text=RECORD.pre_text, table=RECORD.table, post_text=RECORD.post_text)
        == messages
    )
    assert len(build_prompt(RECORD, fewshot=[])) == 2
    with pytest.raises(TypeError):
        build_prompt(RECORD, question="also this?")
    with pytest.raises(TypeError):
        build_prompt()


def test_completion_text() -> None:
    prompt = completion_text(build_prompt(RECORD))
    assert prompt.endswith(f"Question: {RECORD.question}\nProgram:")
    assert "2015 net revenue | $ 5829" in prompt
    for r in load_finqa(None, "fewshot"):
        assert f"Question: {r.question}\nProgram: {r.program}\n\n" in prompt
    bare = completion_text(build_prompt(question="what is 1 + 1?", fewshot=[]))
    assert bare.endswith("\n\nQuestion: what is 1 + 1?\nProgram:")
