"""lm-evaluation-harness (PyPI `lm_eval`) as an outside client of the server's OpenAI surface, on local tasks only.

    .venv/bin/python benchmarks/lm_eval_run.py                          # starts a server itself
    .venv/bin/python benchmarks/lm_eval_run.py --url http://127.0.0.1:8000 --limit 3

Runs the tasks in benchmarks/lm_eval for each model: the finance multiple-choice task (loglikelihoods, so only
`local-completions`) and the shipped FinQA sample (generate_until) through `local-completions` (plain-text prompt)
and `local-chat-completions` (the adapter's chat prompt). Then it scores the loglikelihoods lm_eval received again
with llama.cpp in process, on the GGUF the server runs, and writes `<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "benchmarks" / "lm_eval"
MODELS = ("smollm2-135m", "smollm2-135m-finqa")
MC_TASK = "finance_mc"
TOLERANCE = 0.02  # nats per continuation token: the server's own echo-logprob test (tests/test_openai_params.py)

log = logging.getLogger("benchmarks.lm_eval_run")


@dataclass(frozen=True)
class Run:
    """One task through one lm_eval client; `chat` renders the task's messages (the chat client sends them)."""

    task: str
    client: str
    chat: bool = False

    def url(self, server: str) -> str:
        return f"{server}/v1/chat/completions" if self.client == "local-chat-completions" else f"{server}/v1/completions"


RUNS = (
    Run(MC_TASK, "local-completions"),
    Run("finqa_sample_text", "local-completions"),
    Run("finqa_sample", "local-chat-completions", chat=True),
)


@dataclass
class Outcome:
    task: str
    client: str
    model: str
    metrics: dict[str, float]
    samples: int
    wall_s: float
    refused: list[str] = field(default_factory=list)  # lm_eval's warnings of requests the server answered with an error
    pairs: list[tuple[str, str, float]] = field(default_factory=list, repr=False)  # (context, continuation, loglik)


class _Refusals(logging.Handler):
    """Collects lm_eval's "API request failed" warnings: each is a request the server did not answer with 200."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "API request failed" in record.getMessage():
            self.messages.append(record.getMessage())


@contextmanager
def refusals() -> Iterator[list[str]]:
    handler = _Refusals()
    logger = logging.getLogger("lm_eval.models.api_models")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def model_args(run: Run, server: str, model: str, batch_size: int) -> dict[str, Any]:
    args: dict[str, Any] = {"base_url": run.url(server), "model": model, "max_retries": 1}
    if run.client == "local-completions":  # the chat client has no tokenizer and sends one request at a time
        args |= {"tokenizer_backend": "remote", "batch_size": batch_size}
    return args


def evaluate(run: Run, server: str, model: str, limit: int | None, batch_size: int = 8) -> Outcome:
    """`run` for `model` through lm_eval's Python API; the samples it logs give the loglikelihood pairs."""
    import lm_eval

    start = time.perf_counter()
    with refusals() as refused:
        result = lm_eval.simple_evaluate(
            model=run.client,
            model_args=model_args(run, server, model, batch_size),
            tasks=[run.task],
            task_manager=task_manager(),
            limit=limit,
            apply_chat_template=run.chat,
            log_samples=True,
        )
    wall = time.perf_counter() - start
    assert result is not None
    metrics = {k.split(",")[0]: v for k, v in result["results"][run.task].items() if k.endswith(",none")}
    samples = result["samples"][run.task]
    outcome = Outcome(run.task, run.client, model, metrics, len(samples), round(wall, 1), list(refused))
    if run.task == MC_TASK:
        outcome.pairs = [(*s["arguments"][i], s["resps"][i][0][0]) for s in samples for i in range(len(s["arguments"]))]
    log.info("%s %s %s: %s over %d docs in %.0f s", model, run.client, run.task, metrics, len(samples), wall)
    return outcome


# ---- loglikelihoods against llama.cpp in process ----


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the continuation, as lm_eval encodes a pair."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def llama_loglikelihood(llm: Any, context: str, continuation: str) -> tuple[float, int]:
    """log P(continuation | context) and the continuation's token count, from every position's logits."""
    context, continuation = split_pair(context, continuation)
    whole = llm.tokenize((context + continuation).encode(), add_bos=False, special=True)
    start = len(llm.tokenize(context.encode(), add_bos=False, special=True))
    llm.reset()
    llm.eval(whole)
    scores = np.asarray(llm.scores[: len(whole) - 1], dtype=np.float64)
    top = scores.max(1, keepdims=True)
    logprobs = scores - top - np.log(np.exp(scores - top).sum(1, keepdims=True))
    positions = np.arange(start, len(whole))
    return float(logprobs[positions - 1, np.asarray(whole)[positions]].sum()), len(positions)


def check_loglikelihoods(model: str, pairs: Sequence[tuple[str, str, float]], beside: Sequence[str] = MODELS) -> dict[str, Any]:
    """Each pair's loglikelihood as lm_eval got it from a server of `beside` against llama.cpp's, on the same weights
    (and LoRA) and K/V cache type."""
    from adaptserve import llama_thread
    from adaptserve.bench.speed import served_model
    from adaptserve.serve.config import ServeConfig
    from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs

    spec = served_model(model, ServeConfig.adapter_quant, None, beside)
    llm = llama_thread.open_model(spec, 1, n_ctx=512, logits_all=True, **kv_cache_kwargs(DEFAULT_KV_CACHE))
    diffs, tokens = [], []
    try:
        for context, continuation, got in pairs:
            local, n = llama_loglikelihood(llm, context, continuation)
            diffs.append(abs(got - local))
            tokens.append(n)
    finally:
        llm.close()
    per_token = [d / n for d, n in zip(diffs, tokens, strict=True)]
    return {
        "model": model,
        "pairs": len(diffs),
        "max_abs_diff_nats": max(diffs),
        "max_diff_per_token_nats": max(per_token),
        "tolerance_per_token_nats": TOLERANCE,
        "pairs_over_tolerance": sum(d > TOLERANCE for d in per_token),
        "within_tolerance": max(per_token) <= TOLERANCE,
    }


# ---- the report ----


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def host(threads: int | None) -> dict[str, Any]:
    from adaptserve.bench.run import machine_info

    return machine_info() | {
        "server_threads": threads,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(report: dict[str, Any]) -> str:
    from adaptserve.bench.run import short_commit

    h = report["host"]
    lines = [
        f"lm_eval {report['lm_eval']} against `adaptserve serve` ({h['server_threads']} threads), commit "
        f"{short_commit(h)}{' (dirty)' if h['git_dirty'] else ''}, CPU flags {', '.join(h['cpu_flags']) or 'none'}, "
        f"{h['cores']} cores; {report['wall_s']:.0f} s in all.",
        "",
        "| task | client | model | docs | metrics | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if not k.endswith("_stderr"))
        lines.append(f"| {r['task']} | {r['client']} | {r['model']} | {r['samples']} | {metrics} | {r['wall_s']:.0f} |")
    lines += ["", "Loglikelihoods lm_eval received against llama.cpp in process (same GGUF and K/V cache type):", ""]
    lines += [
        "| model | pairs | max abs diff (nats) | max diff per token (nats) | tolerance per token | pairs over it |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["loglikelihood_check"]:
        lines.append(
            f"| {c['model']} | {c['pairs']} | {c['max_abs_diff_nats']:.2e} | {c['max_diff_per_token_nats']:.2e} | "
            f"{c['tolerance_per_token_nats']} | {c['pairs_over_tolerance']} |"
        )
    return "\n".join(lines) + "\n"


def run_all(server: str, models: Sequence[str], limit: int | None, threads: int | None) -> dict[str, Any]:
    import lm_eval

    machine = host(threads)  # the checkout as the run starts
    outcomes = [evaluate(run, server, model, limit) for model in models for run in RUNS]
    checks = [check_loglikelihoods(o.model, o.pairs, models) for o in outcomes if o.pairs]
    return {
        "lm_eval": lm_eval.__version__,
        "host": machine,
        "limit": limit,
        "runs": [{k: v for k, v in asdict(o).items() if k != "pairs"} for o in outcomes],
        "loglikelihood_check": checks,
    }


def main() -> None:
    from adaptserve.bench.load import start_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (its root, e.g. http://127.0.0.1:8000); default: start one")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="first N docs of each task")
    parser.add_argument("--threads", type=int, default=2, help="threads of the server this script starts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lm-eval")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else start_server(args.models, args.threads, Path(tmp) / "server.log")
        try:
            report = run_all(args.url or server.url, args.models, args.limit, None if args.url else args.threads)
        finally:
            if server is not None:
                server.stop()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    log.info("wrote %s", args.out / "results.md")


if __name__ == "__main__":
    main()
