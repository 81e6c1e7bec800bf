"""`adaptserve bench`: a small real run (2 FinQA questions, 1-2 clients) against a server it starts itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adaptserve.bench import BenchConfig, BenchError, bench
from adaptserve.bench.prompts import load_prompts


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(limit=2, concurrency=[1, 2], requests=2, max_tokens=8, pp=64, tg=16, repeats=2, threads=1, out=str(out))
    return bench(config), out


def test_bench_writes_results_report_plots_and_examples(results: tuple[dict, Path]) -> None:
    data, out = results
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(data))
    for name in ("report.md", "accuracy.png", "latency.png"):
        assert (out / name).stat().st_size > 1000
    models = ["smollm2-135m", "smollm2-135m-finqa"]
    for model in models:
        predictions = [json.loads(line) for line in (out / f"finqa-{model}.jsonl").read_text().splitlines()]
        answers = [json.loads(line) for line in (out / f"prompts-{model}.jsonl").read_text().splitlines()]
        assert len(predictions) == 2 and len(answers) == len(load_prompts("builtin"))
    assert data["machine"]["cores"] and data["machine"]["versions"]["llama-cpp-python"]
    assert "smollm2-135m-finqa" in (out / "report.md").read_text()


def test_bench_numbers_are_consistent(results: tuple[dict, Path]) -> None:
    data, _ = results
    assert [(a["model"], a["count"]) for a in data["accuracy"]] == [("smollm2-135m", 2), ("smollm2-135m-finqa", 2)]
    for a in data["accuracy"]:
        low, high = a["ci95"]
        assert 0 <= low <= a["execution_accuracy"] <= high <= 1
    assert [(row["model"], row["concurrency"]) for row in data["load"]] == [
        (m, c) for m in ("smollm2-135m", "smollm2-135m-finqa") for c in (1, 2)
    ]
    for row in data["load"]:
        assert row["errors"] == 0 and row["requests"] == 2
        assert row["output_tokens"] == row["usage_tokens"] > 0  # tokens streamed = tokens the server counted
        assert row["tokens_per_second"] == pytest.approx(row["output_tokens"] / row["wall_seconds"], rel=0.01)
        assert 0 < row["ttft"]["p50"] <= row["ttft"]["p95"] <= row["e2e"]["p95"]
    assert data["server"]["peak_rss_bytes"] > 50 * 2**20 and data["server"]["cold_start_seconds"] > 0
    assert [(s["model"], s["pp_tokens"], s["tg_tokens"]) for s in data["speed"]] == [
        ("smollm2-135m", 64, 16),
        ("smollm2-135m-finqa", 64, 16),
    ]
    assert all(s["pp_tokens_per_second"] > 0 and s["tg_tokens_per_second"] > 0 for s in data["speed"])
    assert [o["model"] for o in data["overhead"]] == ["smollm2-135m", "smollm2-135m-finqa"]
    assert all(o["ratio"] > 0 for o in data["overhead"])
    assert {(s["model"], s["backend"]) for s in data["skipped"]} == {
        (m, b) for m in ("smollm2-135m", "smollm2-135m-finqa") for b in ("gpu-bnb4", "gpu-16bit")
    }


def test_bad_config_and_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="concurrency levels must be positive"):
        bench(BenchConfig(concurrency=[0], out=str(tmp_path)))
    (tmp_path / "bad.jsonl").write_text('{"text": "no id"}\n')
    with pytest.raises(BenchError, match="expected JSON lines with id and prompt"):
        bench(BenchConfig(prompts=str(tmp_path / "bad.jsonl"), out=str(tmp_path)))
    run = subprocess.run(
        [sys.executable, "-m", "adaptserve", "bench", "--requests", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "requests and max_tokens must be positive" in run.stderr
