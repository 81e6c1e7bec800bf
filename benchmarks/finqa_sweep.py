"""Pick the shipped FinQA adapter: train candidate configs with `adaptserve train`, score each on dev[:300], keep the best.

    python benchmarks/finqa_sweep.py --out benchmarks/results/finqa-sweep            # a GPU: minutes; 2 CPU cores: a day

Training data is train + dev[300:], selection is on dev[:300] (execution accuracy, then program exact match), and the
test split is never read here: the chosen adapter is scored on test afterwards, once (`adaptserve bench`). Scoring
is `adaptserve bench`'s FinQA evaluation (`bench.accuracy.evaluate_finqa`, one record at a time) through the
transformers engine: greedy, with the very prompt and stop rule of the server (`finqa.adapter_style`, one line);
numbers can differ slightly from the served GGUF (quantization, see benchmarks/results/export). Runs in priority
order within `--budget` seconds and rewrites `<out>/sweep.json` after every run, so a run cut short still reports
what it finished; the best adapter is copied to `<out>/best/`.

`--only` also takes the METHODS runs: the shipped recipe with another rank, with QLoRA, or as full fine-tuning, on
the same data, seed and epochs, for the methods table of benchmarks/training.md; they are scored like the
candidates but never chosen for shipping (a rank-64 adapter is 40 MB, a full fine-tune a whole model):

    python benchmarks/finqa_sweep.py --only lora-r4 lora-r64 qlora-r16 full --out benchmarks/results/finqa-methods
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adaptserve import finqa
from adaptserve.bench.accuracy import evaluate_finqa
from adaptserve.models import resolve
from adaptserve.serve.hf_engine import HFBase, HFEngine
from adaptserve.train import TrainConfig, train

log = logging.getLogger("benchmarks.finqa_sweep")

FINQA = "../shared/data/finqa"
TRAIN = [f"{FINQA}/train.json", f"{FINQA}/dev.json:300:"]
SELECT = (f"{FINQA}/dev.json", 0, 300)
RUNS = Path("runs/finqa-sweep")  # the candidates' output dirs (ignored by git)
BASE = "smollm2-135m"
COMMON = {"batch_size": 8, "grad_accum": 1, "save_every": 0, "seed": 0, "rank": 16, "alpha": 32.0}
# name -> TrainConfig fields, most promising first (a cut-short run keeps the head of the list). Rank stays 16 so
# the shipped adapter stays small (~10 MB); "full" is the reference the adapters are judged against.
CANDIDATES: dict[str, dict[str, Any]] = {
    "r16-lr1e-3-ep3": {"lr": 1e-3, "epochs": 3},
    "r16-lr5e-4-ep3": {"lr": 5e-4, "epochs": 3},
    "r16-lr1e-3-ep6": {"lr": 1e-3, "epochs": 6},
    "r16-lr2e-3-ep3": {"lr": 2e-3, "epochs": 3},
    "r16-lr1e-3-ep6-k3": {"lr": 1e-3, "epochs": 6, "retrieval_k": 3, "max_seq_len": 1024},
    "r16-lr1e-3-ep10": {"lr": 1e-3, "epochs": 10},
    "r16-lr1e-3-ep6-k1": {"lr": 1e-3, "epochs": 6, "retrieval_k": 1},
    "r16-lr1e-3-ep6-drop": {"lr": 1e-3, "epochs": 6, "dropout": 0.1},
}
# name -> TrainConfig fields: the shipped recipe (r16-lr1e-3-ep3, LoRA at alpha = 2 x rank) changed in one respect;
# full fine-tuning takes a 20x smaller learning rate, as usual.
SHIPPED = CANDIDATES["r16-lr1e-3-ep3"]
METHODS: dict[str, dict[str, Any]] = {
    "lora-r4": SHIPPED | {"rank": 4, "alpha": 8.0},
    "lora-r64": SHIPPED | {"rank": 64, "alpha": 128.0},
    "qlora-r16": SHIPPED | {"method": "qlora"},
    "full": SHIPPED | {"method": "full", "lr": 5e-5},
}


def dev_accuracy(adapter: Path | None, records: Sequence[finqa.FinQARecord], threads: int) -> dict[str, Any]:
    """Execution accuracy and program exact match of `adapter` (None: the base, few-shot prompted) on `records`,
    scored by `adaptserve bench`'s FinQA evaluation through the transformers engine (bf16 on CUDA, else fp32)."""
    tick = time.perf_counter()
    full = adapter is not None and (adapter / "model.safetensors").is_file()  # full fine-tuning saved a whole model
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    base = HFBase(resolve(str(adapter) if full else BASE), n_ctx=4096, n_slots=1, n_threads=threads, precision=precision)
    served, name = base.spec, None
    if adapter is not None and not full:
        served, name = resolve(str(adapter)), "candidate"
        base.load_adapter(name, adapter)
    style = finqa.adapter_style(adapter) if adapter is not None else finqa.BASE_STYLE
    try:
        (report,), predictions = evaluate_finqa(HFEngine(base, served, name), records, style, time_prefill=False)
    finally:
        base.close()
    return {
        "count": report.count,
        "correct": report.correct,
        "execution_accuracy": report.execution_accuracy,
        "program_exact_match": report.program_exact_match,
        "eval_seconds": round(time.perf_counter() - tick, 1),
        "examples": [{"id": p.id, "output": p.output, "correct": p.correct} for p in predictions[:5]],
    }


def run_candidate(
    name: str, fields: dict[str, Any], runs: Path, records: Sequence[finqa.FinQARecord], args: argparse.Namespace
) -> dict[str, Any]:
    config = TrainConfig(data=args.train, output_dir=str(runs / name), **(COMMON | fields))
    if args.max_steps:
        config.max_steps = args.max_steps
    if args.batch_size:
        config.batch_size = args.batch_size
    shutil.rmtree(config.output_dir, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = train(config)
    score = dev_accuracy(Path(config.output_dir), records, args.threads)
    log.info("%s: dev accuracy %.1f%% (%d/%d)", name, 100 * score["execution_accuracy"], score["correct"], score["count"])
    return {
        "name": name,
        "fields": fields,
        "config": dataclasses.asdict(config),
        "train": {
            k: getattr(report, k)
            for k in ("steps", "train_tokens", "tokens_per_second", "train_seconds", "peak_memory_bytes", "final_loss")
        },
        "dev": score,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finqa-sweep"))
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; no new run starts after this")
    parser.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all, in order)")
    parser.add_argument("--limit", type=int, default=None, help="score on the first N selection records (smoke runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run's steps (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step, every run (smoke runs)")
    parser.add_argument("--train", nargs="+", default=TRAIN, help="training data sources (TrainConfig.data forms)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the candidates are trained")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (see benchmarks/hf_batching.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    path, start, end = SELECT
    records = finqa.load_finqa(path)[start:end][: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "train_data": args.train,
        "selection": f"{path}[{start}:{end}]" + (f"[:{args.limit}]" if args.limit else ""),
        "base": dev_accuracy(None, records, args.threads),
        "runs": [],
    }
    log.info("base (2-shot): dev accuracy %.1f%%", 100 * result["base"]["execution_accuracy"])
    names = args.only if args.only is not None else list(CANDIDATES)
    for name in names:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget:
            log.warning("budget spent after %.0f s: %s not run", elapsed, name)
            result.setdefault("not_run", []).append(name)
            continue
        result["runs"].append(run_candidate(name, (CANDIDATES | METHODS)[name], args.runs, records, args))
        _publish(result, args.out)
    _publish(result, args.out)
    log.info("done in %.0f s", time.perf_counter() - started)


def _publish(result: dict[str, Any], out: Path) -> None:
    """Write sweep.json and copy the best candidate so far (METHODS runs are not shipped) to out/best."""
    adapters = [r for r in result["runs"] if r["name"] in CANDIDATES]
    best = max(adapters, key=lambda r: (r["dev"]["execution_accuracy"], r["dev"]["program_exact_match"]), default=None)
    result["best"] = best["name"] if best else None
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sweep.md").write_text(markdown(result))
    if best is not None:
        src, dst = Path(best["config"]["output_dir"]), out / "best"
        dst.mkdir(exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "train_report.json"):
            shutil.copy(src / name, dst / name)


def markdown(result: dict[str, Any]) -> str:
    base = result["base"]
    lines = [
        f"Selection on {result['selection']}, {result['device']}; training data {', '.join(result['train_data'])}.",
        "",
        "| run | steps | final loss | train tokens/s | train time | peak memory | dev execution accuracy | program exact match |",
        "|---|---|---|---|---|---|---|---|",
        f"| base, 2-shot | - | - | - | - | - | {100 * base['execution_accuracy']:.1f}% ({base['correct']}/{base['count']}) "
        f"| {100 * base['program_exact_match']:.1f}% |",
    ]
    for run in result["runs"]:
        train, dev = run["train"], run["dev"]
        mark = " (chosen)" if run["name"] == result["best"] else ""
        lines.append(
            f"| {run['name']}{mark} | {train['steps']} | {train['final_loss']:.3f} | {train['tokens_per_second']:.0f} "
            f"| {train['train_seconds']:.0f} s | {train['peak_memory_bytes'] / 2**30:.2f} GiB | {100 * dev['execution_accuracy']:.1f}% "
            f"({dev['correct']}/{dev['count']}) | {100 * dev['program_exact_match']:.1f}% |"
        )
    if result.get("not_run"):
        lines += ["", f"Not run (time budget): {', '.join(result['not_run'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
