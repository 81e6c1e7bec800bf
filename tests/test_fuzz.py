"""Fuzzing: the real server from its own OpenAPI spec (schemathesis), and the FinQA program DSL (hypothesis).

Bounded so the file runs in about a minute: 40 examples per operation, a server capped at 8 completion tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from adaptserve.finqa import ProgramError, execute_program, extract_program, parse_program
from adaptserve.finqa.program import OPS
from tests.conftest import Server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

log = logging.getLogger(__name__)
KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--models", "smollm2-135m", "--no-ui", "--n-threads", "1", "--max-tokens-cap", "8", "--n-ctx", "2048"]
    srv = Server([*args, "--api-key", KEY], tmp_path_factory.mktemp("fuzzed"))
    yield srv
    srv.stop()


def test_openapi_operations_never_give_a_5xx(fuzzed: Server) -> None:
    """Every operation in /openapi.json, with generated valid and invalid bodies: no 5xx (a 503 from a full queue
    would be allowed, and never comes at one client), every response as the spec declares it, the server still up."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/finqa"}
    tried: dict[str, set[int]] = {}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzzed.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            tried.setdefault(case.operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        check()
    log.info("status codes per operation: %s", {op: sorted(codes) for op, codes in tried.items()})
    assert fuzzed.alive()
    assert all(codes for codes in tried.values()) and any(400 in codes for codes in tried.values()), tried


# ---- the FinQA program DSL: any string gives a value or a ProgramError ----

TABLE = [["", "2019", "2018"], ["net income", "1,200", "900"], ["margin", "27.9%", "-3"]]
number = st.one_of(
    st.integers(-(10**15), 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["$ 1,000", "27.9%", "-$5", ".5", "1e308", "const_100", "const_m1", "#0", "#1", "#7", "none"]),
)
token = st.one_of(
    number,
    st.sampled_from([*OPS, "(", ")", ",", " ", "\n", "EOF", "net income", "margin", "#", "$", "%", "-", "const_"]),
    st.text(max_size=4),
)
program_like = st.lists(token, max_size=40).map("".join)
tables = st.one_of(st.none(), st.just(TABLE), st.lists(st.lists(st.text(max_size=8), max_size=4), max_size=4))
FAST = settings(max_examples=400, deadline=None, database=None)


def check_outcome(text: str, table: list[list[str]] | None) -> None:
    try:
        value = execute_program(text, table)
    except ProgramError as err:
        assert str(err)  # a clear message, never an empty one
        return
    assert value in ("yes", "no") or (isinstance(value, float) and math.isfinite(value))


@FAST
@given(st.text(), tables)
def test_any_string_gives_a_value_or_a_program_error(text: str, table: list[list[str]] | None) -> None:
    check_outcome(text, table)


@FAST
@given(program_like, tables)
def test_program_shaped_strings_give_a_value_or_a_program_error(text: str, table: list[list[str]] | None) -> None:
    check_outcome(text, table)


@FAST
@given(st.one_of(st.text(), program_like))
def test_extracted_programs_parse_or_fail_cleanly(text: str) -> None:
    program = extract_program(text)
    assert program is None or isinstance(program, str)
    if program is not None:
        try:
            assert parse_program(program)
        except ProgramError:
            pass


@FAST
@given(st.recursive(number, lambda inner: st.tuples(st.sampled_from(OPS), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})")))
def test_nested_calls_of_any_depth_stay_bounded(text: str) -> None:
    check_outcome(text, TABLE)
