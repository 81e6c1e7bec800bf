"""Smoke runs of every script in benchmarks/: each at its smallest size (a record, a step, a request), as a
subprocess on this checkout's package, must exit 0 and write its results. The numbers mean nothing here.
benchmarks/load_test.py is run by tests/test_reliability.py (test_small_load_test_holds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adaptserve.finqa.data import SAMPLE_DIR
from tests.conftest import REPO, SHARED

ADAPTER = REPO / "adapters" / "smollm2-135m-finqa"  # the checkout's copy: the package ships its LoRA GGUF only
SAMPLE_TEST = SAMPLE_DIR / "test.json"
# These select on FinQA dev.json[:300], which only the shared data beside a checkout holds (never shipped).
needs_shared_finqa = pytest.mark.skipif(
    not (SHARED / "data" / "finqa" / "dev.json").is_file(), reason=f"no FinQA data at {SHARED / 'data' / 'finqa'}"
)
# Training steps are slow on 2 cores other work shares, hence the wide limit; on an idle machine every test ends
# within 600 s.
pytestmark = pytest.mark.timeout(1500)


def run(script: str, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 1200) -> None:
    """Run benchmarks/<script> on this checkout's package (not an installed copy); fail with its output's tail."""
    cmd = [sys.executable, f"benchmarks/{script}"] if script.endswith(".py") else ["bash", f"benchmarks/{script}"]
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"} | (env or {})
    # A session of its own: on a timeout the whole group goes, workers and servers the script started included.
    proc = subprocess.Popen([*cmd, *map(str, args)], cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]


def results(path: Path) -> Any:
    assert path.is_file(), f"{path} not written"
    return json.loads(path.read_text())


def test_batching(tmp_path: Path) -> None:
    run("batching.py", "--slots", "2", "--clients", "1", "2", "--requests", "1", "--rounds", "1", "--max-tokens", "4",
        "--threads", "1", "--out", tmp_path)  # fmt: skip
    summary = results(tmp_path / "results.json")
    assert [(lv["slots"], lv["clients"]) for lv in summary["levels"]] == [(2, 1), (2, 2)]
    assert set(summary["decode_ceiling_tokens_per_second"]) == {"1", "2"}
    assert "| 2 | 2 |" in (tmp_path / "results.md").read_text()


def test_hf_batching(tmp_path: Path) -> None:
    run("hf_batching.py", "--slots", "2", "--clients", "2", "--requests", "1", "--rounds", "1", "--max-tokens", "4",
        "--adapter", "smollm2-135m-finqa", "--out", tmp_path)  # fmt: skip
    summary = results(tmp_path / "results.json")
    assert summary["adapter"] == "smollm2-135m-finqa" and summary["levels"][0]["output_tokens"] > 0
    assert (tmp_path / "results.md").is_file()


def test_hf_steps(tmp_path: Path) -> None:
    run("hf_steps.py", "--batch", "2", "--steps", "1", "--out", tmp_path)
    rows = results(tmp_path / "results.json")["batch"]["2"]
    assert {"bare base", "adapter set", "mixed rows, HFBase masks", "HFEngine through the adapter"} <= set(rows)


def test_kv_cache(tmp_path: Path) -> None:
    run("kv_cache.py", "--models", "smollm2-135m", "--slots", "2", "--n-ctx", "128", "--prompt-tokens", "32",
        "--steps", "2", "--rounds", "1", "--threads", "1", "--out", tmp_path)  # fmt: skip
    rows = results(tmp_path / "results.json")["rows"]
    assert [r["kv_cache"] for r in rows] == ["f16", "q8_0"] and all(r["decode_2x_long"] > 0 for r in rows)
    assert (tmp_path / "results.md").is_file()


def test_finqa_accuracy(tmp_path: Path) -> None:
    """The real-format copy of the shipped sample, answered greedily and by a vote, with and without normalization."""
    copy = tmp_path / "test-real-format.json"
    run("real_format.py", SAMPLE_TEST, copy)
    assert "," in json.dumps([r["table"] for r in json.loads(copy.read_text())])  # thousands separators were written
    run("finqa_accuracy.py", "--finqa", copy, "--models", "smollm2-135m-finqa", "--modes", "greedy", "vote-2",
        "--normalize", "on", "off", "--limit", "1", "--threads", "1", "--out", tmp_path)  # fmt: skip
    rows = results(tmp_path / "finqa_accuracy.json")["results"]
    assert [(r["mode"], r["normalize"], r["count"]) for r in rows] == [
        ("greedy", True, 1), ("vote-2", True, 1), ("greedy", False, 1), ("vote-2", False, 1)
    ]  # fmt: skip
    for suffix in ("", "-raw"):
        assert (tmp_path / f"predictions-smollm2-135m-finqa-test-real-format{suffix}.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "finqa_accuracy.md").is_file() and (tmp_path / "finqa_confidence.png").is_file()


def test_footprint(tmp_path: Path) -> None:
    run("footprint.py", "--models", "smollm2-135m", "--limit", "1", "--threads", "1", "--out", tmp_path)
    (row,) = results(tmp_path / "footprint.json")["rows"]
    assert row["peak_rss_mib"] > 0
    assert (tmp_path / "footprint.md").is_file()


def test_peer(tmp_path: Path) -> None:
    run("peer.py", "--concurrency", "1", "--requests", "1", "--max-tokens", "4", "--repeats", "2", "--pp", "16", "--tg", "4",
        "--threads", "1", "--out", tmp_path)  # fmt: skip
    ours, peer = results(tmp_path / "peer.json")
    assert ours["load"][0]["errors"] == 0 and "failed" not in peer, peer
    assert (tmp_path / "peer.md").is_file()


def test_export_fidelity(tmp_path: Path) -> None:
    run("export_fidelity.py", "--adapter", ADAPTER, "--finqa", SAMPLE_TEST, "--limit", "1", "--quants", "q4_k_m",
        "--no-bf16", "--out", tmp_path)  # fmt: skip
    rows = results(tmp_path / "export_fidelity.json")["rows"]
    assert [r["export"] for r in rows][:2] == ["transformers + PEFT (reference)", "merged GGUF q4_k_m"] and len(rows) == 3
    assert (tmp_path / "export_fidelity.md").is_file()


@needs_shared_finqa
def test_finqa_sweep(tmp_path: Path) -> None:
    run("finqa_sweep.py", "--only", "r16-lr1e-3-ep3", "--limit", "1", "--max-steps", "1", "--batch-size", "1",
        "--train", "sample@dev", "--runs", tmp_path / "runs", "--out", tmp_path)  # fmt: skip
    sweep = results(tmp_path / "sweep.json")
    assert sweep["base"]["count"] == 1 and sweep["best"] == "r16-lr1e-3-ep3"
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file() and (tmp_path / "sweep.md").is_file()


@needs_shared_finqa
def test_training(tmp_path: Path) -> None:
    """One method, the bare loop and one memory run: every part of the report."""
    run("training.py", "--steps", "1", "--memory-steps", "1", "--batch-size", "1", "--dev-limit", "1", "--data", "sample@dev",
        "--dev", "sample@test", "--only", "lora-r16", "bare", "lora-r16-512", "--out", tmp_path)  # fmt: skip
    saved = results(tmp_path / "results.json")
    assert [r["name"] for r in saved["methods"]] == ["lora-r16"] and saved["methods"][0]["dev_examples"] == 1
    assert saved["throughput"]["bare"]["steps"] == 1 and [r["name"] for r in saved["memory"]] == ["lora-r16-512"]
    assert (tmp_path / "training.md").is_file() and (tmp_path / "memory.png").is_file()


@needs_shared_finqa
def test_gpu_checks_cpu_path(tmp_path: Path) -> None:
    """The NF4 export check and the LoRA/QLoRA training runs on bitsandbytes' CPU path."""
    run("gpu_checks.py", "--cpu", "--adapter", ADAPTER, "--prompts", "1", "--max-tokens", "8", "--decode-tokens", "2",
        "--steps", "1", "--batch-size", "1", "--data", "sample@dev", "--runs", tmp_path / "runs", "--out", tmp_path)  # fmt: skip
    checks = results(tmp_path / "gpu_checks.json")
    assert checks["export"]["prompts"] == 1 and set(checks["training"]) == {"lora", "qlora"}


def test_bench_cpu(tmp_path: Path) -> None:
    """The three `adaptserve bench` runs of the committed CPU benchmark, on one record, one prompt and short texts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "count", "prompt": "Write the numbers from 1 to 20, separated by commas."}) + "\n")
    env = {"PYTHON": sys.executable, "FINQA": str(SAMPLE_TEST), "OUT": str(tmp_path / "bench")}
    # List flags add to the script's own (--concurrency 1 2 4 8): 8 requests are the fewest its widest level takes.
    run("bench_cpu.sh", "--limit", "1", "--prompts", prompts, "--ppl-ctx", "64", "--ppl-chunks", "2", "--requests", "8",
        "--max-tokens", "8", "--pp", "16", "--tg", "4", "--repeats", "2", "--threads", "1", env=env)  # fmt: skip
    for run_dir in ("", "two-families", "q8_0"):
        assert (tmp_path / "bench" / run_dir / "results.json").is_file(), run_dir


def test_portable_build(tmp_path: Path) -> None:
    """Both builds given as this venv's interpreter: the script's alternating rounds, its child processes and its
    report run; which CPU backend the build loaded is reported (this venv's own build may load none by name)."""
    run("portable_build.py", "--native", sys.executable, "--portable", sys.executable, "--rounds", "1", "--repeats", "1",
        "--pp", "16", "--tg", "4", "--threads", "1", "--out", tmp_path)  # fmt: skip
    summary = results(tmp_path / "results.json")
    assert set(summary["builds"]) == {"native", "portable"}
    assert all(b["pp_median"] > 0 and b["tg_median"] > 0 for b in summary["builds"].values())
    assert "portable / native" in (tmp_path / "results.md").read_text()
