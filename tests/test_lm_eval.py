"""lm-evaluation-harness (`lm_eval`) as an outside client of the real server: the local tasks in benchmarks/lm_eval
through `local-completions` and `local-chat-completions`, a few docs each, with no hub access; the loglikelihoods
lm_eval received are scored again by llama.cpp in process (benchmarks/lm_eval_run.py runs the whole tasks)."""

from __future__ import annotations

import json

import pytest

from benchmarks.lm_eval_run import MC_TASK, REPO, RUNS, TASKS_DIR, Run, check_loglikelihoods, evaluate, markdown
from tests.conftest import Server

pytestmark = pytest.mark.timeout(900)
BASE, ADAPTER = "smollm2-135m", "smollm2-135m-finqa"
MC_DOCS = 2
FINQA_DOCS = 1  # a FinQA prompt runs to hundreds of tokens: one doc a client keeps the file short


@pytest.fixture
def url(monkeypatch: pytest.MonkeyPatch, server: Server) -> str:
    """The server's URL, with no hub for lm_eval and the server's own cache, so that llama.cpp in process opens the
    very adapter export the server runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("ADAPTSERVE_CACHE", str(server.log.parent / "cache"))
    return server.url


def mc_choices(docs: int) -> int:
    lines = (TASKS_DIR / "finance_mc.jsonl").read_text().splitlines()[:docs]
    return sum(len(json.loads(line)["choices"]) for line in lines)


def test_multiple_choice_loglikelihoods_agree_with_llama_cpp(url: str) -> None:
    outcome = evaluate(Run(MC_TASK, "local-completions"), url, BASE, limit=MC_DOCS)
    assert outcome.refused == []
    assert outcome.samples == MC_DOCS and {"acc", "acc_norm"} <= outcome.metrics.keys()
    assert len(outcome.pairs) == mc_choices(MC_DOCS)
    check = check_loglikelihoods(BASE, outcome.pairs)
    assert check["within_tolerance"], check


@pytest.mark.parametrize("run", [r for r in RUNS if r.task != MC_TASK], ids=lambda r: r.client)
def test_finqa_program_generation_through_each_client(url: str, run: Run) -> None:
    outcome = evaluate(run, url, ADAPTER, limit=FINQA_DOCS)
    assert outcome.refused == []
    assert outcome.samples == FINQA_DOCS and {"exec_acc", "program_ran"} <= outcome.metrics.keys()
    assert outcome.metrics["program_ran"] > 0  # the adapter writes a program the scorer could execute


def test_adapter_loglikelihoods_agree_with_llama_cpp(url: str) -> None:
    outcome = evaluate(Run(MC_TASK, "local-completions"), url, ADAPTER, limit=1)
    assert outcome.refused == []
    assert check_loglikelihoods(ADAPTER, outcome.pairs)["within_tolerance"]


def test_committed_results_are_what_the_runner_writes() -> None:
    results = REPO / "benchmarks" / "results" / "lm-eval"
    report = json.loads((results / "results.json").read_text())
    assert markdown(report) == (results / "results.md").read_text()
    assert {(r["task"], r["client"], r["model"]) for r in report["runs"]} == {
        (r.task, r.client, m) for r in RUNS for m in (BASE, ADAPTER)
    }
    assert report["limit"] is None and all(r["refused"] == [] for r in report["runs"])
