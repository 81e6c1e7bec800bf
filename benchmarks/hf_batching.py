"""Static batching in the transformers engine: aggregate output tokens/s with 1 and 4 concurrent clients, batched
(4 slots) against one request at a time (1 slot).

    PYTHONPATH=. .venv/bin/python benchmarks/hf_batching.py --out benchmarks/results/hf-batching

The base is loaded twice, into an `HFBase` with `--slots` each (default 1 and 4), on the CPU unless CUDA is there,
held as `--precision` says (auto: NF4 on CUDA, bf16 or fp32 on CPU); with `--adapter` every request goes through
that LoRA adapter, attached unmerged. The weights' memory (parameters and buffers, NF4 packed as stored) and, on CUDA,
the peak allocated memory are recorded, so runs at nf4 and bf16 compare memory as well as speed.
Clients, prompts, rounds and the CPU-contention measure are `batching.py`'s, so the two engines' numbers compare.
Writes `<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from batching import disturbance, ratio, run_rounds, summarize_rounds

from adaptserve.bench.run import machine_info
from adaptserve.models import resolve
from adaptserve.serve.hf_engine import PRECISIONS, HFBase, HFEngine

log = logging.getLogger("benchmarks.hf_batching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter directory every request goes through")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2, help="each level is measured this often; the fastest counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    # 1 by default: on a CPU other processes use too, torch's threads stall each other (benchmarks/serving.md)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/hf-batching")
    parser.add_argument("--note", default="", help="what else was going on, for the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spec = resolve(args.model)
    bases = [HFBase(spec, n_ctx=512, n_slots=slots, n_threads=args.threads, precision=args.precision) for slots in args.slots]
    weights = bases[0].model.get_memory_footprint()
    log.info("%s weights: %.0f MiB (%s)", spec.name, weights / 2**20, describe_weights(bases[0]))  # kept if cut short
    served, adapter = spec, None
    if args.adapter:
        served, adapter = resolve(args.adapter), "adapter"
        for base in bases:
            base.load_adapter(adapter, served.path)
    engines = [HFEngine(b, served, adapter) for b in bases]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rounds = run_rounds(engines, args.clients, args.rounds, args.requests, args.max_tokens)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    device, dtype = str(bases[0].device), describe_weights(bases[0])
    for base in bases:
        base.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": spec.name,
        "adapter": args.adapter,
        "precision": args.precision,
        "weights_bytes": weights,  # one base, before adapters
        "cuda_peak_allocated_bytes": peak,  # every base loaded here (one per slot count) and the runs
        "engine": "HFEngine (transformers)",
        "device": device,
        "dtype": dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "machine": machine_info(),
        "rounds": args.rounds,
        "note": args.note,
        **summarize_rounds(rounds),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    log.info("wrote %s", out)


def describe_weights(base: HFBase) -> str:
    """The dtype, or that the linear layers are 4-bit (their params are packed bytes then)."""
    quant = getattr(base.model.config, "quantization_config", None)
    return f"NF4 4-bit, {base.model.dtype} compute" if quant is not None else str(base.model.dtype)


def markdown(summary: dict[str, Any]) -> str:
    unbatched = {lv["clients"]: lv["tokens_per_second"] for lv in summary["levels"] if lv["slots"] == 1}
    lines = [
        f"`{summary['model']}`{' + ' + summary['adapter'] if summary.get('adapter') else ''} through `HFEngine` on "
        f"{summary['device']} ({summary['dtype']}, weights {summary['weights_bytes'] / 2**20:.0f} MiB), {summary['threads']} torch "
        f"thread(s), greedy, {summary['max_tokens']} output tokens per request, on {summary['machine']['cpu']} "
        f"({summary['machine']['cores']} cores); fastest of {summary['rounds']} interleaved rounds. 1 slot runs one "
        "request at a time; N slots batch up to N (static batching, left-padded prefill, finished rows leave the batch). "
        "Reproduce: `PYTHONPATH=. .venv/bin/python benchmarks/hf_batching.py`.",
        "",
        *([summary["note"], ""] if summary.get("note") else []),
        "| slots | clients | aggregate tok/s | vs 1 slot | per-request tok/s | mean TTFT (s) | other CPU (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in summary["levels"]:
        lines.append(
            f"| {lv['slots']} | {lv['clients']} | {lv['tokens_per_second']} | "
            f"{ratio(lv['tokens_per_second'], unbatched.get(lv['clients']))} | {lv['per_request_tokens_per_second']} | "
            f"{lv['mean_ttft']} | {lv['other_cores']} |"
        )
    if summary.get("cuda_peak_allocated_bytes"):
        lines += [
            "",
            f"CUDA peak allocated: {summary['cuda_peak_allocated_bytes'] / 2**20:.0f} MiB (all bases loaded here, and the runs).",
        ]
    return "\n".join(lines + disturbance(summary["levels"])) + "\n"


if __name__ == "__main__":
    main()
