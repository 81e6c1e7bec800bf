"""FinQA execution accuracy of served models (base few-shot vs adapted zero-shot), as the server prompts them.

    .venv/bin/python benchmarks/finqa_accuracy.py --finqa ../shared/data/finqa/test.json --out benchmarks/results/finqa

Writes `<out>/finqa_accuracy.json`, `<out>/finqa_accuracy.md` and one `<out>/predictions-<model>-<split>.jsonl` per
model and FinQA file. Models are loaded exactly as `adaptserve serve` loads them (adapters merged to a cached GGUF).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
from pathlib import Path

from adaptserve import finqa
from adaptserve.bench.accuracy import evaluate_finqa
from adaptserve.models import default_models, resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE
from adaptserve.serve.metrics import Metrics
from adaptserve.serve.pool import ModelPool

log = logging.getLogger("benchmarks.finqa_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finqa", nargs="+", default=["sample@test"], help="FinQA files, or sample@SPLIT for the shipped sample")
    parser.add_argument("--models", nargs="+", default=default_models())
    parser.add_argument("--limit", type=int, default=None, help="first N records of each file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", default=DEFAULT_KV_CACHE, help="serve --kv-cache: how the slots store K/V (f16 or q8_0)")
    parser.add_argument("--out", default="benchmarks/results/finqa")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(models=args.models, n_threads=args.threads, ui=False, kv_cache=args.kv_cache)
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
                style = pool.finqa_style(name)
                report, predictions = evaluate_finqa(pool.engines[name], records, style)
                path = out / f"predictions-{name}-{label}.jsonl"
                path.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in predictions))
                results.append({"data": label, "style": dataclasses.asdict(style), **report.as_dict()})
                log.info("%s on %s: %.1f%% (%d/%d)", name, label, 100 * report.execution_accuracy, report.correct, report.count)
    finally:
        pool.close()
    results = _merge(out / "finqa_accuracy.json", results)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "kv_cache": args.kv_cache}
    summary = {"machine": machine, "results": results}
    (out / "finqa_accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "finqa_accuracy.md").write_text(markdown(results))


def _merge(path: Path, fresh: list[dict]) -> list[dict]:
    """Earlier results for other (data, model) pairs kept, these replaced: re-running one model leaves the rest."""
    earlier = json.loads(path.read_text())["results"] if path.is_file() else []
    keys = {(r["data"], r["model"]) for r in fresh}
    kept = [r for r in earlier if (r["data"], r["model"]) not in keys]
    return sorted(kept + fresh, key=lambda r: (r["data"], r["model"]))


def markdown(results: list[dict]) -> str:
    lines = [
        "| data | model | prompt | execution accuracy | 95% CI | program exact match | executable programs | mean prompt tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        prompt = f"{r['style']['shots']}-shot, {r['style']['sentences']} sentences"
        lines.append(
            f"| {r['data']} ({r['count']}) | {r['model']} | {prompt} | {100 * r['execution_accuracy']:.1f}% "
            f"({r['correct']}/{r['count']}) | {100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}% | "
            f"{100 * r['program_exact_match']:.1f}% | {100 * r['executable_programs']:.1f}% | {r['mean_prompt_tokens']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
