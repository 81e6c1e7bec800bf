"""The 4-bit GPU path, measured where CUDA is: QLoRA vs LoRA training, and the bitsandbytes NF4 export of an adapter.

    python benchmarks/gpu_checks.py --adapter adapters/smollm2-135m-finqa --out benchmarks/results/gpu

1. Training: the same `adaptserve train` batches with method lora (bf16 base) and qlora (NF4 base): tokens/s and
   CUDA peak memory.
2. Export: the adapter merged in float, then quantized to NF4 as `adaptserve export --formats bnb4` does; the NF4
   model is loaded back and compared with the unmerged adapter (bf16) on dev prompts, greedy on the same prompt
   token ids (`export.verify`): same program, same tokens, execution accuracy, weight memory, and single-stream
   decode tokens/s.
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
from finqa_sweep import BASE, SELECT, TRAIN
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from adaptserve import finqa
from adaptserve.export import merge, verify
from adaptserve.export.adapter import read_adapter
from adaptserve.models.prompt import eos_ids
from adaptserve.train import TrainConfig, train

log = logging.getLogger("benchmarks.gpu_checks")


def training(data: list[str], batch_size: int, steps: int, runs: Path) -> dict[str, Any]:
    results = {}
    for method in ("lora", "qlora"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        config = TrainConfig(
            data=data,
            method=method,
            max_steps=steps,
            batch_size=batch_size,
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
def decode_speed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: int) -> float:
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


def first_lines(tokenizer: PreTrainedTokenizerBase, outputs: list[list[int]]) -> list[str]:
    """Each output's first line, where the server's FinQA answer stops."""
    return [tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0] for tokens in outputs]


def bnb4_export(adapter_dir: Path, count: int, device: torch.device, max_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """The unmerged adapter in bf16 (the reference) against its NF4 export reloaded, on the same prompt token ids."""
    path, start, end = SELECT
    records = finqa.load_finqa(path)[start:end][:count]
    adapter = read_adapter(adapter_dir)
    base, location = merge.load_base(BASE)
    tokenizer = merge.load_tokenizer(adapter, location)
    reference = merge.attach(base, adapter).to(device, torch.bfloat16).eval()
    style = finqa.adapter_style(adapter_dir)
    prompts = verify.encode(tokenizer, [finqa.record_prompt(r, style, chat=True) for r in records])
    eos = eos_ids(reference, tokenizer)
    ref_out = verify.greedy_hf(reference, prompts, max_tokens, eos, "bf16")
    speed = decode_speed(reference, tokenizer, decode_tokens)
    result: dict[str, Any] = {"bf16": {"weight_bytes": reference.get_memory_footprint(), "decode_tokens_per_second": speed}}
    del reference
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge.attach(merge.load_base(BASE)[0], adapter).merge_and_unload()  # in float32, never into 4-bit
        merge.save_hf(merged, tokenizer, Path(tmp) / "hf")
        tick = time.perf_counter()
        merge.save_bnb4(Path(tmp) / "hf", tokenizer, Path(tmp) / "bnb4")
        result["export_seconds"] = round(time.perf_counter() - tick, 2)
        nf4 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "bnb4", device_map={"": device})  # the export, reloaded
        nf4_out = verify.greedy_hf(nf4, prompts, max_tokens, eos, "nf4")
        speed = decode_speed(nf4, tokenizer, decode_tokens)
        result["nf4"] = {"weight_bytes": nf4.get_memory_footprint(), "decode_tokens_per_second": speed}
    ref_lines, nf4_lines = first_lines(tokenizer, ref_out), first_lines(tokenizer, nf4_out)
    same = sum(a.replace(" ", "") == b.replace(" ", "") for a, b in zip(ref_lines, nf4_lines, strict=True))
    for name, lines in (("bf16", ref_lines), ("nf4", nf4_lines)):
        result[name]["execution_accuracy"] = (
            sum(finqa.score_output(o, r).correct for o, r in zip(lines, records, strict=True)) / count
        )
    result |= {"prompts": count, "same_program": same / count, "same_tokens": verify.agreement(ref_out, nf4_out).exact}
    log.info("bnb4: %s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=Path("adapters/smollm2-135m-finqa"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=96, help="greedy tokens per prompt (the server's FinQA cap)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode-speed run")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument("--data", nargs="+", default=TRAIN, help="training data sources (TrainConfig.data forms)")
    parser.add_argument("--runs", type=Path, default=Path("runs/gpu-checks"), help="where the training runs go")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (bitsandbytes' slow path): a smoke run, no numbers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.cpu or torch.cuda.is_available()):
        raise SystemExit("gpu_checks: no CUDA device here (--cpu for a smoke run)")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(), "adapter": str(args.adapter)}
    result["export"] = bnb4_export(args.adapter, args.prompts, device, args.max_tokens, args.decode_tokens)
    (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=2))
    result["training"] = training(args.data, args.batch_size, args.steps, args.runs)
    (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
