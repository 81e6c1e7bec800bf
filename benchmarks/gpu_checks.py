"""The 4-bit GPU path, measured where CUDA is: QLoRA vs LoRA training, and the bitsandbytes NF4 export of an adapter.

    python benchmarks/gpu_checks.py --adapter adapters/smollm2-135m-finqa --out benchmarks/results/gpu

1. Training: the same `adaptserve train` batches with method lora (bf16 base) and qlora (NF4 base): tokens/s and
   CUDA peak memory.
2. Export: the adapter merged in float, then quantized to NF4 as `adaptserve export --formats bnb4` does; the NF4
   model is loaded back and compared with the unmerged adapter (bf16) on dev prompts: same program, execution
   accuracy, weight memory, and single-stream decode tokens/s.
Writes `<out>/gpu_checks.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from finqa_sweep import SELECT, TRAIN, greedy_lines, load_for_eval
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adaptserve import finqa
from adaptserve.export import merge
from adaptserve.export.adapter import read_adapter
from adaptserve.train import TrainConfig, train

log = logging.getLogger("benchmarks.gpu_checks")


def training(steps: int, runs: Path) -> dict[str, Any]:
    results = {}
    for method in ("lora", "qlora"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        config = TrainConfig(
            data=TRAIN,
            method=method,
            max_steps=steps,
            batch_size=8,
            grad_accum=1,
            lr=1e-3,
            save_every=0,
            output_dir=str(runs / method),
        )
        report = train(config)
        results[method] = {
            "tokens_per_second": report.tokens_per_second,
            "peak_memory_bytes": report.peak_memory_bytes,
            "final_loss": report.final_loss,
            "steps": report.steps,
        }
        log.info("%s: %s", method, results[method])
    return results


@torch.inference_mode()
def decode_speed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: int = 128) -> float:
    """Single-stream greedy tokens/s after a warm-up, EOS ignored so every run makes `new_tokens`."""
    ids = tokenizer("The quarterly report shows", return_tensors="pt").to(model.device)
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.eos_token_id,
    }
    model.generate(**ids, **kwargs)
    tick = time.perf_counter()
    model.generate(**ids, **kwargs).tolist()  # .tolist() waits for the GPU
    return new_tokens / (time.perf_counter() - tick)


def bnb4_export(adapter_dir: Path, count: int, batch: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: smoke-testing this script only
    path, start, end = SELECT
    records = finqa.load_finqa(path)[start:end][:count]
    reference, tokenizer = load_for_eval(adapter_dir, device)  # unmerged adapter merged on the fly, bf16
    style = finqa.adapter_style(adapter_dir)
    prompts = [
        tokenizer.apply_chat_template(finqa.record_prompt(r, style, chat=True), add_generation_prompt=True, tokenize=False)
        for r in records
    ]
    ref_out = greedy_lines(reference, tokenizer, prompts, batch, 96)
    result: dict[str, Any] = {
        "bf16": {"weight_bytes": reference.get_memory_footprint(), "decode_tokens_per_second": decode_speed(reference, tokenizer)}
    }
    del reference
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = merge.load_base("smollm2-135m")
        merged = merge.attach(base, read_adapter(adapter_dir)).merge_and_unload()  # in float32, never into 4-bit
        merge.save_hf(merged, tokenizer, Path(tmp) / "hf")
        tick = time.perf_counter()
        merge.save_bnb4(Path(tmp) / "hf", AutoTokenizer.from_pretrained(adapter_dir), Path(tmp) / "bnb4")
        result["export_seconds"] = round(time.perf_counter() - tick, 2)
        nf4 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "bnb4", device_map={"": device})  # the export, reloaded
        nf4_out = greedy_lines(nf4, tokenizer, prompts, batch, 96)
        result["nf4"] = {"weight_bytes": nf4.get_memory_footprint(), "decode_tokens_per_second": decode_speed(nf4, tokenizer)}
    same = sum(a.replace(" ", "") == b.replace(" ", "") for a, b in zip(ref_out, nf4_out, strict=True))
    for name, outputs in (("bf16", ref_out), ("nf4", nf4_out)):
        result[name]["execution_accuracy"] = (
            sum(finqa.score_output(o, r).correct for o, r in zip(outputs, records, strict=True)) / count
        )
    result |= {"prompts": count, "same_program": same / count}
    log.info("bnb4: %s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=Path("adapters/smollm2-135m-finqa"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks: no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "adapter": str(args.adapter)}
    result["export"] = bnb4_export(args.adapter, args.prompts, batch=50)
    (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=2))
    result["training"] = training(args.steps, Path("runs/gpu-checks"))
    (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
