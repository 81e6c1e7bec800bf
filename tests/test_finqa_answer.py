"""FinQA answering without a server: report-style numbers into FinQA's form, the program grammar, and the vote."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from adaptserve import finqa, llama_thread
from adaptserve.finqa.grammar import numbers_in, program_grammar
from adaptserve.finqa.normalize import cell, normalize, sentence
from adaptserve.models import resolve
from adaptserve.serve.finqa_answer import Candidate, vote
from adaptserve.serve.llama_sampling import grammar_sampler


@pytest.mark.parametrize(
    "report,finqa_form",
    [
        ("$ 2,480", "$ 2480"),
        ("$2,210", "$ 2210"),
        ("€1,200", "$ 1200"),
        ("1,234,567.8", "1234567.8"),
        ("(3,279)", "-3279 ( 3279 )"),
        ("$(5,312)", "$ -5312 ( 5312 )"),
        ("($5,312)", "$ -5312 ( 5312 )"),
        ("40.4%", "40.4% ( 40.4 % )"),
        ("(12.5%)", "-12.5% ( 12.5 % )"),
        ("\u22125", "-5"),
        ("\u2014", "-"),
        ("2019", "2019"),
        ("n/a", "n/a"),
        ("-3279 ( 3279 )", "-3279 ( 3279 )"),  # FinQA's own forms stay
        ("40.4% ( 40.4 % )", "40.4% ( 40.4 % )"),
    ],
)
def test_cells_take_finqa_form(report: str, finqa_form: str) -> None:
    assert cell(report) == finqa_form
    assert cell(finqa_form) == finqa_form


def test_sentences_take_finqa_form() -> None:
    assert sentence("revenue rose 12.5% to $2,480 in 2019, from $ 2,210") == (
        "revenue rose 12.5% ( 12.5 % ) to $ 2480 in 2019, from $ 2210"
    )
    assert sentence("in 2018, 2019 and 2020; 3.25% ( 3.25 % ) notes; a 50%-owned venture") == (
        "in 2018, 2019 and 2020; 3.25% ( 3.25 % ) notes; a 50%-owned venture"
    )


def test_finqa_records_pass_through_unchanged() -> None:
    for record in finqa.load_finqa(split="test") + finqa.load_finqa(split="dev"):
        assert normalize(record.question, record.table, record.pre_text, record.post_text).changes == []


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    llm = llama_thread.load(resolve("smollm2-135m").path, vocab_only=True)
    yield llm
    llm.close()


def admits(llm: Any, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets `text` through token by token, and then the end of generation."""
    sampler = grammar_sampler(llm._model.vocab, grammar)
    try:
        for token in [*llm.tokenize(text.encode(), add_bos=False), llm.token_eos()]:
            one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
            array = llama_cpp.llama_token_data_array(one, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            if one[0].logit == float("-inf"):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_the_grammar_admits_every_gold_program_and_little_else(vocab: Any) -> None:
    for record in finqa.load_finqa(split="test") + finqa.load_finqa(split="dev"):
        rows = [row[0] for row in record.table[1:]]
        assert admits(vocab, program_grammar(rows), record.program), record.program
        texts = [record.question, *record.pre_text, *record.post_text, *(c for row in record.table for c in row[1:])]
        numbers = numbers_in(texts)
        if all(n in numbers for n in re.findall(r"(?<![#_\w.])(?:\d+(?:\.\d+)?|\.\d+)", record.program)):
            assert admits(vocab, program_grammar(rows, numbers), record.program), record.program
    grammar = program_grammar(["net sales"], ["5829", "5735"])
    assert admits(vocab, grammar, "subtract(5829, 5735), divide(#0, 5735)")
    assert admits(vocab, grammar, "table_sum(net sales, none)")
    assert not admits(vocab, grammar, "subtract(5829, 1234)")  # a number the input does not hold
    assert not admits(vocab, grammar, "divide(#0, 5735)")  # no step before it to refer to
    assert not admits(vocab, grammar, "The answer is 94")
    assert not admits(vocab, grammar, "table_sum(gross sales, none)")  # not a row of the table


def test_the_vote_takes_the_majority_answer_and_breaks_ties_for_greedy() -> None:
    def c(answer: float | str | None) -> Candidate:
        return Candidate(None if answer is None else f"p{answer}", answer, "", None, 1)

    chosen, share = vote([c(1.0), c(2.0), c(2.000001), c(None)])  # equal after FinQA's rounding to 5 decimals
    assert chosen.answer == 2.0 and share == 0.5
    chosen, share = vote([c(3.0), c(4.0), c(4.0), c(3.0)])
    assert chosen.answer == 3.0 and share == 0.5  # tie: the greedy candidate's answer
    chosen, share = vote([c(None), c(None), c(5.0)])
    assert chosen.answer is None and share == pytest.approx(2 / 3)
