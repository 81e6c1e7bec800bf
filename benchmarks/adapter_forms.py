"""An adapter merged into its base against applied at run time to the base's weights: speed, batch invariance, memory.

    .venv/bin/python benchmarks/adapter_forms.py --out benchmarks/results/adapter-forms

For each shipped adapter whose base is installed, each form runs on the server's own slots (`KVSlots`, 4 slots,
8-bit K/V cache, 64-token calls): `q4_k_m` (merged and quantized, a second copy of the weights), `lora` (the LoRA
in Q8_0 on the base's weights, what `adaptserve serve` picks when the base is served too) and `lora-f16` (the
packaged f16 LoRA GGUF applied as it is, for comparison). Measured side by side in one run: prompt processing (512
tokens in 64-token calls), decoding one sequence and four together, whether a sequence's logits stay bit for bit
the same with 1 or 3 sequences decoding beside it, and the bytes each form adds to a server that serves the base.
Writes `<out>/adapter_forms.json` and `<out>/adapter_forms.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np

from adaptserve import llama_thread
from adaptserve.bench.run import machine_info, short_commit
from adaptserve.export import served
from adaptserve.models import ModelSpec, default_models, resolve
from adaptserve.serve.kvslots import Feed, KVSlots

log = logging.getLogger("benchmarks.adapter_forms")
TEXT = b"Revenue rose from 5,735 to 5,829 million dollars in 2019; costs fell by 12% and margins widened. " * 40
FORMS = ["q4_k_m", "lora", "lora-f16"]


def runnable(adapter: str, form: str) -> ModelSpec:
    """The adapter in `form`; lora-f16 is the packaged LoRA GGUF on the base, not rewritten."""
    if form != "lora-f16":
        return served(resolve(f"{adapter}@{form}"), form)
    spec = served(resolve(f"{adapter}@lora"), "lora")
    return ModelSpec(spec.name, "gguf", spec.location, lora=resolve(adapter).lora)


def measure(spec: ModelSpec, threads: int, repeats: int) -> dict[str, float | bool]:
    llm = llama_thread.load(spec.path, threads, n_ctx=64)
    lora = llama_thread.load_lora(llm, spec.lora) if spec.lora else None
    slots = KVSlots(llm, 4, n_ctx=1024, max_batch=64, lora=lora)
    prompt = llm.tokenize(TEXT)[:512]
    try:
        runs = [_timed(slots, prompt) for _ in range(repeats)]
        return {
            "pp512_tokens_per_second": round(statistics.median(r[0] for r in runs), 1),
            "tg_1_sequence_tokens_per_second": round(statistics.median(r[1] for r in runs), 1),
            "tg_4_sequences_tokens_per_second": round(statistics.median(r[2] for r in runs), 1),
            "batch_invariant": all(_logits(slots, prompt, 0) == _logits(slots, prompt, n) for n in (1, 3)),
        }
    finally:
        slots.close()
        if lora is not None:
            llama_cpp.llama_adapter_lora_free(lora)
        llm.close()


def _timed(slots: KVSlots, prompt: list[int]) -> tuple[float, float, float]:
    for slot in slots.slots:
        slots.reset(slot)
    first = slots.slots[0]
    start = time.perf_counter()
    for at in range(0, len(prompt), 64):
        slots.decode([Feed(first, prompt[at : at + 64], logits=at + 64 >= len(prompt))])
    pp = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for token in prompt[:64]:
        slots.decode([Feed(first, (token,), logits=True)])
    tg1 = 64 / (time.perf_counter() - start)
    for slot in slots.slots[1:]:
        slots.decode([Feed(slot, prompt[:64], logits=True)])
    start = time.perf_counter()
    for token in prompt[:32]:
        slots.decode([Feed(slot, (token,), logits=True) for slot in slots.slots])
    return pp, tg1, 4 * 32 / (time.perf_counter() - start)


def _logits(slots: KVSlots, prompt: list[int], beside: int) -> list[bytes]:
    """The first sequence's logits over two decode steps with `beside` short sequences decoding in the same calls."""
    for slot in slots.slots:
        slots.reset(slot)
    first, *others = slots.slots[: beside + 1]
    for at in range(0, 128, 64):
        slots.decode([Feed(first, prompt[at : at + 64], logits=False)])
    for slot in others:
        slots.decode([Feed(slot, prompt[: 4 + slot.seq_id], logits=False)])
    rows = []
    for token in (1000, 2000):
        (row, *_) = slots.decode([Feed(s, (token,), logits=True) for s in (first, *others)])
        rows.append(np.array(slots.logits(row)).tobytes())
    return rows


def added_bytes(spec: ModelSpec) -> int:
    """What the form loads beside a served base: a merged GGUF in full, a LoRA GGUF alone."""
    return Path(spec.lora).stat().st_size if spec.lora else spec.path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    adapters = [m for m in default_models() if resolve(m).format == "adapter"]
    parser.add_argument("--adapters", nargs="+", default=adapters)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/adapter-forms")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    for adapter in args.adapters:
        for form in FORMS:
            spec = runnable(adapter, form)
            row = {"adapter": adapter, "form": form, "added_mib": round(added_bytes(spec) / 2**20, 1)}
            rows.append({**row, **measure(spec, args.threads, args.repeats)})
            log.info("%s", rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    results = {"machine": machine, "commit": short_commit(machine), "threads": args.threads, "rows": rows}
    (out / "adapter_forms.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "adapter_forms.md").write_text(report(results), encoding="utf-8")
    log.info("wrote %s", out / "adapter_forms.md")


def report(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"Commit {results['commit']}; {machine['cpu']}, flags {', '.join(machine['cpu_flags'])}; "
        f"{results['threads']} llama.cpp threads; 4 slots, 8-bit K/V cache, 64-token calls. Medians of the repeats.",
        "",
        "| adapter | form | added beside the base | pp512 tokens/s | tg, 1 sequence | tg, 4 sequences | batch-invariant |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['adapter']} | {r['form']} | {r['added_mib']} MiB | {r['pp512_tokens_per_second']} | "
            f"{r['tg_1_sequence_tokens_per_second']} | {r['tg_4_sequences_tokens_per_second']} | "
            f"{'yes' if r['batch_invariant'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
