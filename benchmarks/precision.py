"""bf16 against fp32 on this host's CPU, side by side in one run: what `--precision auto` should pick.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/precision.py

For each precision it measures
- training: tokens/s of a few LoRA steps of SmolLM2-135M on the shipped FinQA sample (`adaptserve.train.train`, the
  tiny run of tests/test_train.py: table only, batch 1, rank 4);
- the transformers engine: decode tokens/s of each request alone, output tokens/s of all of them in one mixed batch
  (base and the shipped FinQA adapter), and the share of requests whose greedy text is the same alone as in that
  batch (the promise of docs/serving.md); also how many bf16 texts equal the fp32 ones;
- data parallelism: the same LoRA run in one process and in two (`accelerate launch`, gloo, as
  tests/test_train.py's data-parallel test does), the largest relative difference of a step's loss and of the
  adapter weights.

CPU only (a CUDA machine: run it with CUDA_VISIBLE_DEVICES=). On a CPU without native bf16 (AVX2) torch emulates
bf16: the same numerics question, many times slower (run times in benchmarks/precision.md). Writes
`<out>/<cpu-kind>/results.json` and `results.md`, cpu-kind from /proc/cpuinfo (amx, avx512-bf16, avx512, avx2).
benchmarks/precision.md reads the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from adaptserve import finqa
from adaptserve.models import ADAPTERS_DIR, resolve
from adaptserve.serve.engine import Completion, SamplingParams
from adaptserve.serve.hf_engine import HFBase, HFEngine
from adaptserve.train import TrainConfig, train

log = logging.getLogger("benchmarks.precision")
REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
BASE = "smollm2-135m"
ADAPTER = "smollm2-135m-finqa"
# tests/test_train.py's TINY run: the shortest shipped FinQA examples, table only
TRAIN = dict(data=["sample"], retrieval_k=0, max_seq_len=360, rank=4, alpha=8.0, batch_size=1, grad_accum=1, lr=1e-3)
# tests/test_train.py's data-parallel test: short instruction examples, 4 a step, 2 to each process
DDP = dict(rank=4, alpha=8.0, batch_size=4, grad_accum=1, save_every=0)
CHATS = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(2, 3), (10, 7), (41, 1)]] + [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe")
]
# (through the adapter?, prompt): after the FinQA questions, which go through both
PLAIN = [
    (False, "The capital of France is"),
    (True, "Name three colors."),
    (False, "Once upon a time"),
    (True, "What is 12 plus 30?"),
]


@dataclass
class Request:
    label: str
    engine: HFEngine
    prompt: list[int]


# ---- the host ----


def cpu_flags() -> list[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return [f for f in FLAGS if f in flags]


def cpu_kind(flags: list[str]) -> str:
    for flag, kind in (("amx_bf16", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return platform.machine()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def host(threads: int) -> dict[str, Any]:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
    flags = cpu_flags()
    return {
        "cpu": names[0] if names else platform.machine(),
        "cores": os.cpu_count(),
        "flags": flags,
        "kind": cpu_kind(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__,
        "threads": threads,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%d"),
    }


# ---- training speed ----


def train_speed(precision: str, steps: int, threads: int, tmp: Path) -> dict[str, Any]:
    config = TrainConfig(**TRAIN, precision=precision, max_steps=steps, threads=threads, save_every=0)  # type: ignore[arg-type]
    config.output_dir = str(tmp / f"speed-{precision}")
    report = train(config)
    log.info("train %s: %.1f tokens/s over %d steps", precision, report.tokens_per_second, report.steps)
    return {
        "steps": report.steps,
        "tokens": report.train_tokens,
        "seconds": report.train_seconds,
        "tokens_per_second": report.tokens_per_second,
        "loss_history": report.loss_history,
    }


# ---- the transformers engine ----


def make_requests(base: HFBase, finqa_records: int) -> list[Request]:
    plain = HFEngine(base, resolve(BASE), None)
    adapted = HFEngine(base, resolve(str(ADAPTERS_DIR / ADAPTER)), ADAPTER)
    style = finqa.adapter_style(ADAPTERS_DIR / ADAPTER)
    requests = []
    for i, record in enumerate(finqa.load_finqa(split="test")[:finqa_records]):
        messages = finqa.task_prompt(record.question, record.table, record.pre_text, record.post_text, style, chat=True)
        assert isinstance(messages, list)
        requests += [Request(f"finqa[{i}] adapter", adapted, adapted.chat_prompt(messages))]
        requests += [Request(f"finqa[{i}] base", plain, plain.chat_prompt(messages))]
    for through_adapter, text in PLAIN:
        engine = adapted if through_adapter else plain
        prompt = engine.chat_prompt([{"role": "user", "content": text}]) if through_adapter else engine.tokenize(text)
        requests.append(Request(f"{text!r} {'adapter' if through_adapter else 'base'}", engine, prompt))
    return requests


def run_alone(requests: list[Request], params: SamplingParams) -> tuple[list[Completion], list[float]]:
    async def run() -> tuple[list[Completion], list[float]]:
        done, seconds = [], []
        for r in requests:
            tick = time.perf_counter()
            done.append(await r.engine.complete(r.prompt, params))
            seconds.append(time.perf_counter() - tick)
        return done, seconds

    return asyncio.run(run())


def run_batched(requests: list[Request], params: SamplingParams) -> tuple[list[Completion], float]:
    async def run() -> list[Completion]:
        generations = [r.engine.submit(r.prompt, params) for r in requests]  # queued in one go: one batch
        return [await g.collect() for g in generations]

    tick = time.perf_counter()
    done = asyncio.run(run())
    return done, time.perf_counter() - tick


def decode_rate(done: list[Completion], seconds: list[float]) -> float:
    """Tokens after the first per second after the first, over requests run one at a time."""
    tokens = sum(max(c.finish.completion_tokens - 1, 0) for c in done)
    spent = sum(s - (c.finish.time_to_first_token or 0.0) for c, s in zip(done, seconds, strict=True))
    return round(tokens / spent, 2)


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def engine_run(precision: str, finqa_records: int, max_tokens: int, threads: int) -> dict[str, Any]:
    """Each request alone, then all of them in one batch, greedy, on a base held at `precision`."""
    n = 2 * finqa_records + len(PLAIN)
    base = HFBase(resolve(BASE), n_ctx=2048, n_slots=n, n_threads=threads, device=torch.device("cpu"), precision=precision)
    try:
        base.load_adapter(ADAPTER, ADAPTERS_DIR / ADAPTER)
        requests = make_requests(base, finqa_records)
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        run_alone(requests[-1:], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        alone, seconds = run_alone(requests, params)
        batched, batch_seconds = run_batched(requests, params)
        dtype = str(base.model.dtype)
    finally:
        base.close()
    same = [a.text == b.text for a, b in zip(alone, batched, strict=True)]
    result = {
        "dtype": dtype,
        "labels": [r.label for r in requests],
        "alone": [c.text for c in alone],
        "batched": [c.text for c in batched],
        "same": same,
        "same_share": sum(same) / len(same),
        "common_prefix_chars": [common_prefix(a.text, b.text) for a, b in zip(alone, batched, strict=True)],
        "decode_tokens_per_second": decode_rate(alone, seconds),
        "batch_tokens_per_second": round(sum(c.finish.completion_tokens for c in batched) / batch_seconds, 2),
    }
    log.info(
        "engine %s: same alone/batched %d of %d, decode %.1f tokens/s",
        precision,
        sum(same),
        n,
        result["decode_tokens_per_second"],
    )
    return result


# ---- data parallelism ----


def launch_two(flags: list[str], out: Path) -> dict[str, Any]:
    port = 29500 + os.getpid() % 1000
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "adaptserve"]
    done = subprocess.run([*launch, "train", *flags, "--output-dir", str(out)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"2-process run failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "train_report.json").read_text())


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def ddp_pair(precision: str, steps: int, threads: int, tmp: Path) -> dict[str, Any]:
    """The same LoRA run in one process and in two: how far apart the losses and the adapters end up."""
    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    config = TrainConfig(data=[str(data)], **DDP, max_steps=steps, threads=threads, precision=precision)  # type: ignore[arg-type]
    config.output_dir = str(tmp / f"one-{precision}")
    one = train(config)
    flags = ["--data", str(data), "--rank", "4", "--alpha", "8", "--batch-size", "4", "--grad-accum", "1"]
    flags += ["--max-steps", str(steps), "--save-every", "0", "--threads", str(threads), "--precision", precision]
    two = launch_two(flags, tmp / f"two-{precision}")
    a, b = (load_file(Path(d) / "adapter_model.safetensors") for d in (config.output_dir, tmp / f"two-{precision}"))
    flat_a, flat_b = (torch.cat([t[k].flatten().float() for k in sorted(a)]) for t in (a, b))
    losses = [relative(x, y) for x, y in zip(one.loss_history, two["loss_history"], strict=True)]
    log.info("data parallel %s: loss relative difference %s", precision, [f"{d:.2e}" for d in losses])
    return {
        "steps": steps,
        "world_size": two["world_size"],
        "loss_one": one.loss_history,
        "loss_two": two["loss_history"],
        "loss_relative_difference": losses,
        "max_loss_relative_difference": max(losses),
        # ||one - two|| / ||one|| over all adapter weights, and the elementwise check of the data-parallel test
        "adapter_relative_difference": float((flat_a - flat_b).norm() / flat_a.norm()),
        "adapter_max_abs_difference": float((flat_a - flat_b).abs().max()),
        "adapter_allclose": bool(torch.allclose(flat_a, flat_b, atol=1e-6, rtol=1e-4)),
    }


# ---- report ----


def markdown(results: dict[str, Any]) -> str:
    h, s = results["host"], results["settings"]
    lines = [
        f"# Precision on {h['cpu']} ({h['kind']})",
        "",
        f"`{results['command']}` at {h['git_commit'][:10]}{' (uncommitted changes)' if h['git_dirty'] else ''}, "
        f"{h['date']}; torch {h['torch']} (CPU capability {h['torch_cpu_capability']}, native bf16: "
        f"{'yes' if h['native_bf16'] else 'no, emulated'}), {h['threads']} thread(s), flags: {' '.join(h['flags'])}.",
        *(["", f"Note: {h['note']}."] if h.get("note") else []),
        "",
        "| | fp32 | bf16 |",
        "|---|---|---|",
    ]
    t, e, d = results["train"], results["engine"], results["ddp"]
    rows = [
        (f"training tokens/s (LoRA, {s['train_steps']} steps)", lambda p: f"{t[p]['tokens_per_second']:.1f}"),
        ("engine decode tokens/s, one request alone", lambda p: f"{e[p]['decode_tokens_per_second']:.1f}"),
        (
            f"engine output tokens/s, {len(e['fp32']['same'])} requests in one batch",
            lambda p: f"{e[p]['batch_tokens_per_second']:.1f}",
        ),
        ("greedy text same alone and in the mixed batch", lambda p: f"{sum(e[p]['same'])} of {len(e[p]['same'])}"),
        (
            f"1 vs 2 processes, largest relative loss difference ({s['ddp_steps']} steps)",
            lambda p: f"{d[p]['max_loss_relative_difference']:.1e}",
        ),
        ("1 vs 2 processes, adapter difference (relative L2 norm)", lambda p: f"{d[p]['adapter_relative_difference']:.1e}"),
        ("1 vs 2 processes, adapters equal within the test's atol 1e-6, rtol 1e-4", lambda p: f"{d[p]['adapter_allclose']}"),
    ]
    lines += [f"| {name} | {cell('fp32')} | {cell('bf16')} |" for name, cell in rows]
    lines += ["", f"bf16 greedy texts equal to fp32's (alone): {results['bf16_equals_fp32']} of {len(e['fp32']['same'])}.", ""]
    lines += ["| request | precision | same | alone | in the batch |", "|---|---|---|---|---|"]
    for p in PRECISIONS:
        for label, same, a, b in zip(e[p]["labels"], e[p]["same"], e[p]["alone"], e[p]["batched"], strict=True):
            lines.append(f"| {label} | {p} | {'yes' if same else '**no**'} | {json.dumps(a)} | {json.dumps(b)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=2, help="LoRA steps timed in each precision")
    parser.add_argument("--ddp-steps", type=int, default=2, help="steps of the 1- and 2-process runs")
    parser.add_argument("--finqa", type=int, default=1, help="FinQA test questions, each through the adapter and the base")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a busy 2-core machine)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch.cuda.is_available():
        parser.error("this measures CPUs: run it with CUDA_VISIBLE_DEVICES=")

    results: dict[str, Any] = {"command": " ".join(["benchmarks/precision.py", *sys.argv[1:]]), "host": host(args.threads)}
    results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        results["train"] = {p: train_speed(p, args.train_steps, args.threads, tmp) for p in PRECISIONS}
        results["engine"] = {p: engine_run(p, args.finqa, args.max_tokens, args.threads) for p in PRECISIONS}
        results["ddp"] = {p: ddp_pair(p, args.ddp_steps, args.threads, tmp) for p in PRECISIONS}
    fp32, bf16 = results["engine"]["fp32"]["alone"], results["engine"]["bf16"]["alone"]
    results["bf16_equals_fp32"] = sum(a == b for a, b in zip(fp32, bf16, strict=True))

    out = args.out / results["host"]["kind"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
