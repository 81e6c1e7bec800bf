"""Where a transformers decode step's time goes, one layer of the stack at a time: the bare base, the base with a
LoRA adapter set or with its adapter layers off, a batch of rows half on the adapter and half on the base (routed
by peft's `adapter_names`, and by HFBase's row masks), and `HFEngine` end to end through the adapter (scheduler,
sampling, detokenizing, streaming).

    PYTHONPATH=. .venv/bin/python benchmarks/hf_steps.py --out benchmarks/results/hf-steps/cpu

Milliseconds per decode step for `--batch` rows, median of `--steps` steps after a warm-up, on CPU or CUDA as
`HFBase` picks (CUDA where there is one), base held at `--precision`. Writes `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from adaptserve.bench.run import machine_info
from adaptserve.models import resolve
from adaptserve.serve.engine import SamplingParams
from adaptserve.serve.hf_engine import PRECISIONS, HFBase, HFEngine

log = logging.getLogger("benchmarks.hf_steps")
PROMPT = "The quarterly report shows that revenue"
ADAPTER = "smollm2-135m-finqa"


@torch.inference_mode()
def step_ms(base: HFBase, batch: int, steps: int, **route: Any) -> float:
    """Median wall time of one greedy decode step of `batch` identical rows, the model called as the engine calls it."""
    out = base.model(
        input_ids=torch.tensor([base.tokenize(PROMPT)] * batch, device=base.device), use_cache=True, logits_to_keep=1, **route
    )
    times = []
    for _ in range(steps + 1):  # the first step warms up
        tick = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = base.model(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1, **route)
        out.logits.sum().item()  # waits for the device
        times.append(time.perf_counter() - tick)
    return round(statistics.median(times[1:]) * 1000, 2)


def engine_ms(base: HFBase, batch: int, steps: int) -> float:
    """Per decode step of `batch` identical requests submitted together through the adapter, first token excluded."""
    engine = HFEngine(base, resolve(ADAPTER), ADAPTER)
    params = SamplingParams(max_tokens=steps, temperature=0)

    async def run() -> float:
        tick = time.perf_counter()
        done = [await g.collect() for g in [engine.submit(engine.tokenize(PROMPT), params) for _ in range(batch)]]
        finish = done[0].finish  # identical rows: every row ends at the same step
        return (time.perf_counter() - tick - (finish.time_to_first_token or 0.0)) / max(finish.completion_tokens - 1, 1)

    asyncio.run(run())  # warm-up
    return round(asyncio.run(run()) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see hf_batching.py)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf-steps"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    base = HFBase(resolve("smollm2-135m"), n_ctx=512, n_slots=max(args.batch), n_threads=args.threads, precision=args.precision)
    rows: dict[int, dict[str, float]] = {b: {"bare base": step_ms(base, b, args.steps)} for b in args.batch}
    base.load_adapter(ADAPTER, resolve(ADAPTER).path)
    # The LoRA layers are set up by HFBase's own routing (what HFEngine does for such a batch), never behind its back.
    for b in args.batch:
        base.route([ADAPTER] * b)
        rows[b]["adapter set"] = step_ms(base, b, args.steps)
        if b > 1:  # half the rows on the adapter, half on the base: peft's per-row routing, then the engine's masks
            half = [ADAPTER, None] * (b // 2) + [ADAPTER] * (b % 2)
            names = [a or "__base__" for a in half]  # peft's name for the base in adapter_names
            rows[b]["mixed rows, peft's adapter_names"] = step_ms(base, b, args.steps, adapter_names=names)
            base.route(half)
            rows[b]["mixed rows, HFBase masks"] = step_ms(base, b, args.steps)
        base.route([None] * b)
        rows[b]["adapter layers off"] = step_ms(base, b, args.steps)
        rows[b]["HFEngine through the adapter"] = engine_ms(base, b, args.steps)
        log.info("batch %d: %s", b, rows[b])
    result = {
        "device": str(base.device),
        "precision": args.precision,
        "threads": args.threads,
        "unit": "ms per decode step (median)",
        "batch": {str(b): r for b, r in rows.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "machine": machine_info(),
    }
    base.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
