"""FinQA execution accuracy of served models, answered as POST /v1/finqa answers, in one or more modes side by side.

    .venv/bin/python benchmarks/finqa_accuracy.py --finqa ../shared/data/finqa/test.json \
        --models smollm2-135m-finqa --modes greedy grammar vote-5 vote-8 --out benchmarks/results/finqa-modes

Modes: greedy (free decoding), grammar (FinQA's program grammar), vote-K (K programs, majority answer, vote share as
confidence); see `adaptserve.bench.accuracy`. `--normalize on off` answers each file with and without rewriting
report-style numbers first (see benchmarks/real_format.py for a copy of test.json written as reports print numbers).
Writes `<out>/finqa_accuracy.json`, `.md`, `finqa_confidence.png` and one `<out>/predictions-<model>-<data>.jsonl` per
model, file and normalization, a question at a time (`--resume` carries on from them). Models are loaded exactly as `adaptserve serve` loads them (adapters merged to a
cached GGUF).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from adaptserve import finqa
from adaptserve.bench.accuracy import Prediction, evaluate_finqa, mode_options
from adaptserve.bench.report import accuracy_lines, confidence_plot
from adaptserve.bench.run import machine_info, short_commit
from adaptserve.models import default_models, resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE
from adaptserve.serve.metrics import Metrics
from adaptserve.serve.pool import ModelPool

log = logging.getLogger("benchmarks.finqa_accuracy")
CTX = 4096  # wide enough for every FinQA prompt, the base model's 2-shot ones included


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finqa", nargs="+", default=["sample@test"], help="FinQA files, or sample@SPLIT for the shipped sample")
    parser.add_argument("--models", nargs="+", default=default_models())
    parser.add_argument("--modes", nargs="+", default=["greedy"], help="greedy, grammar, vote-K")
    parser.add_argument(
        "--normalize", nargs="+", choices=["on", "off"], default=["on"], help="rewrite report-style numbers first"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N records of each file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", default=DEFAULT_KV_CACHE, help="serve --kv-cache: how the slots store K/V (f16 or q8_0)")
    parser.add_argument("--out", default="benchmarks/results/finqa")
    parser.add_argument("--resume", action="store_true", help="keep the predictions files' answers; ask only the rest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        slots = max(mode_options(m).samples for m in args.modes)
    except ValueError as err:
        parser.error(str(err))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(models=args.models, n_threads=args.threads, ui=False, kv_cache=args.kv_cache, n_slots=slots, n_ctx=CTX)
    config.validate()
    pool = ModelPool([resolve(m) for m in args.models], config, Metrics())
    pool.load()
    results = []
    try:
        for source in args.finqa:
            split = source.split("@", 1)[1] if source.startswith("sample@") else Path(source).stem
            records = finqa.load_finqa(None if source.startswith("sample@") else source, split)[: args.limit]
            label = f"sample-{split}" if source.startswith("sample@") else split
            for name in pool.names:
                for normalize in args.normalize:
                    suffix = "" if normalize == "on" else "-raw"
                    path = out / f"predictions-{name}-{label}{suffix}.jsonl"
                    earlier = _read(path) if args.resume else []
                    with path.open("a" if args.resume else "w", encoding="utf-8") as sink:
                        style, engine = pool.finqa_style(name), pool.engines[name]
                        reports, _ = evaluate_finqa(
                            engine, records, style, args.modes, normalize == "on", 96, earlier, _writer(sink)
                        )
                    for report in reports:
                        results.append({"data": label, **report.as_dict()})
                        log.info("%s %s on %s: %.1f%%", name, report.mode, label + suffix, 100 * report.execution_accuracy)
    finally:
        pool.close()
    results = _merge(out / "finqa_accuracy.json", results)
    host = machine_info()
    commit, cpu_flags = short_commit(host), host["cpu_flags"]
    machine = {"cpu": host["cpu"], "flags": cpu_flags, "threads": args.threads, "kv_cache": args.kv_cache}
    summary = {"machine": machine, "commit": commit, "results": results}
    (out / "finqa_accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = (
        f"Commit {commit}; CPU flags {', '.join(cpu_flags)}; {args.threads} llama.cpp threads; K/V cache {args.kv_cache}.\n\n"
    )
    (out / "finqa_accuracy.md").write_text(header + "\n".join(accuracy_lines(results)) + "\n")
    confidence_plot(results, out / "finqa_confidence.png")


def _writer(sink: TextIO) -> Callable[[list[Prediction]], None]:
    """Each question's predictions appended to the file as they come, so a stopped run can `--resume`."""

    def write(answers: list[Prediction]) -> None:
        sink.writelines(json.dumps(dataclasses.asdict(p)) + "\n" for p in answers)
        sink.flush()

    return write


def _read(path: Path) -> list[Prediction]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [Prediction(**json.loads(line)) for line in lines]


def _merge(path: Path, fresh: list[dict]) -> list[dict]:
    """Earlier results for other (data, model, mode, normalization) kept, these replaced."""
    earlier = json.loads(path.read_text())["results"] if path.is_file() else []
    keys = {_key(r) for r in fresh}
    kept = [r for r in earlier if "mode" in r and _key(r) not in keys]  # rows from before modes existed are dropped
    return sorted(kept + fresh, key=lambda r: (r["data"], r["model"], not r["normalize"], r["mode"]))


def _key(row: dict) -> tuple:
    return row["data"], row["model"], row["mode"], row["normalize"]


if __name__ == "__main__":
    main()
