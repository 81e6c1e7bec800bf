"""Static batching in the transformers engine: aggregate output tokens/s with 1 and 4 concurrent clients, batched
(4 slots) against one request at a time (1 slot).

    PYTHONPATH=. .venv/bin/python benchmarks/hf_batching.py --out benchmarks/results/hf-batching

The base is loaded twice, into an `HFBase` with `--slots` each (default 1 and 4), on the CPU unless CUDA is there.
Clients, prompts, rounds and the CPU-contention measure are `batching.py`'s, so the two engines' numbers compare.
Writes `<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from batching import DISTURBED_CORES, _ratio, run_rounds

from adaptserve.bench.run import machine_info
from adaptserve.models import resolve
from adaptserve.serve.hf_engine import HFBase, HFEngine

log = logging.getLogger("benchmarks.hf_batching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2, help="each level is measured this often; the fastest counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    # 1 by default: on a CPU other processes use too, torch's 2 threads on 2 cores ran 30x slower (see hf_engine.py)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/hf-batching")
    parser.add_argument("--note", default="", help="what else was going on, for the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spec = resolve(args.model)
    bases = [HFBase(spec, n_ctx=512, n_slots=slots, n_threads=args.threads) for slots in args.slots]
    rounds = run_rounds([HFEngine(b, spec, None) for b in bases], args.clients, args.rounds, args.requests, args.max_tokens)
    device, dtype = str(bases[0].device), str(bases[0].model.dtype)
    for base in bases:
        base.close()
    levels = [max(rounds[key], key=lambda lv: lv.tokens_per_second) for key in sorted(rounds)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": spec.name,
        "engine": "HFEngine (transformers)",
        "device": device,
        "dtype": dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "machine": machine_info(),
        "rounds": args.rounds,
        "note": args.note,
        "levels": [asdict(level) for level in levels],
        "all_rounds_tokens_per_second": {
            f"{s} slots, {c} clients": [lv.tokens_per_second for lv in lvs] for (s, c), lvs in sorted(rounds.items())
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    log.info("wrote %s", out)


def markdown(summary: dict[str, Any]) -> str:
    unbatched = {lv["clients"]: lv["tokens_per_second"] for lv in summary["levels"] if lv["slots"] == 1}
    lines = [
        f"`{summary['model']}` through `HFEngine` on {summary['device']} ({summary['dtype']}), {summary['threads']} torch "
        f"thread(s), greedy, {summary['max_tokens']} output tokens per request, on {summary['machine']['cpu']} "
        f"({summary['machine']['cores']} cores); fastest of {summary['rounds']} interleaved rounds. 1 slot runs one "
        "request at a time; 4 slots batch up to 4 (static batching, left-padded prefill, finished rows leave the batch). "
        "Reproduce: `PYTHONPATH=. .venv/bin/python benchmarks/hf_batching.py`.",
        "",
        *([summary["note"], ""] if summary.get("note") else []),
        "| slots | clients | aggregate tok/s | vs 1 slot | per-request tok/s | mean TTFT (s) | other CPU (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in summary["levels"]:
        lines.append(
            f"| {lv['slots']} | {lv['clients']} | {lv['tokens_per_second']} | "
            f"{_ratio(lv['tokens_per_second'], unbatched.get(lv['clients']))} | {lv['per_request_tokens_per_second']} | "
            f"{lv['mean_ttft']} | {lv['other_cores']} |"
        )
    busiest = max((lv["other_cores"] or 0.0) for lv in summary["levels"])
    if busiest > DISTURBED_CORES:
        lines += [
            "",
            f"Other processes kept up to {busiest:.2f} cores busy during a level, so these timings are disturbed. "
            "Re-run on an idle machine for numbers to quote.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
