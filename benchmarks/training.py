"""Training on a low-resource CPU: LoRA ranks vs QLoRA vs full fine-tuning, memory, and `adaptserve train` against a
bare PEFT loop on the same batches.

    .venv/bin/python benchmarks/training.py --out benchmarks/results/training      # ~1 h on 2 cores
    .venv/bin/python benchmarks/training.py --steps 64 --threads 2 --dev-limit 100 --out benchmarks/results/training/steps-64 \
        --only lora-r4 lora-r16 lora-r64 qlora-r16 full                                # the methods alone, longer

Every run is its own process (so peak RSS is that run's), one torch thread unless --threads, same data, seed and
steps. Writes `<out>/results.json`, `<out>/training.md` and `<out>/memory.png` (where memory runs were made);
`benchmarks/training.md` quotes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adaptserve.bench.run import machine_info
from adaptserve.models.prompt import eos_ids

log = logging.getLogger("benchmarks.training")

DATA = "../shared/data/finqa/train.json"
DEV = "../shared/data/finqa/dev.json:0:300"
GIB = 2**30
COMMON = ["--grad-accum", "1", "--save-every", "0", "--seed", "0"]
# name -> extra flags; adapters take a 10x larger learning rate than full fine-tuning, as usual.
VARIANTS: dict[str, list[str]] = {
    "lora-r4": ["--method", "lora", "--rank", "4", "--alpha", "8", "--lr", "5e-4"],
    "lora-r16": ["--method", "lora", "--rank", "16", "--alpha", "32", "--lr", "5e-4"],
    "lora-r64": ["--method", "lora", "--rank", "64", "--alpha", "128", "--lr", "5e-4"],
    "qlora-r16": ["--method", "qlora", "--rank", "16", "--alpha", "32", "--lr", "5e-4"],
    "full": ["--method", "full", "--lr", "5e-5"],
}
# The memory target: batch 4 x 512 tokens (5 retrieved sentences fill most examples to the 512 limit).
MEMORY: dict[str, list[str]] = {
    "lora-r16-512": ["--rank", "16", "--lr", "5e-4", "--max-seq-len", "512", "--retrieval-k", "5"],
    "lora-r16-512-low-memory": ["--rank", "16", "--lr", "5e-4", "--max-seq-len", "512", "--retrieval-k", "5", "--low-memory"],
}


def run_train(name: str, flags: list[str], args: argparse.Namespace, steps: int, out: Path) -> dict[str, Any]:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "adaptserve", "train", "--data", args.data, "--batch-size", str(args.batch_size), *COMMON]
    cmd += [*flags, "--threads", str(args.threads), "--max-steps", str(steps)]
    cmd += ["--output-dir", str(run_dir)]
    log.info("%s: %s", name, " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    report = json.loads((run_dir / "train_report.json").read_text())
    return {
        "name": name,
        "method": report["method"],
        "rank": report["config"]["rank"] if report["method"] != "full" else None,
        "low_memory": report["config"].get("low_memory", False),
        "steps": report["steps"],
        "train_tokens": report["train_tokens"],
        "tokens_per_second": report["tokens_per_second"],
        "train_seconds": report["train_seconds"],
        "wall_seconds": report["wall_seconds"],
        "peak_rss_bytes": report["peak_memory_bytes"],
        "memory_history": report["memory_history"],
        "final_loss": report["final_loss"],
        "adapter_bytes": sum(f.stat().st_size for f in run_dir.glob("*.safetensors")),
        "dir": str(run_dir),
    }


def bare_loop(data: str, batch_size: int, steps: int, rank: int, threads: int) -> dict[str, Any]:
    """The textbook PEFT loop: full-vocabulary logits at every position, HF's own loss with -100 labels; fed the
    very batches `adaptserve train` plans for the same data and seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adaptserve.models.hf import base_dir
    from adaptserve.train.data import collate, encode, load_items, plan_batches
    from adaptserve.train.model import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    examples = encode(load_items([data]), tokenizer, retrieval_k=2, max_seq_len=768)
    plan = plan_batches([len(e) for e in examples], batch_size, 0, steps)
    model = AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m"), dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    tokens, seconds = 0, 0.0
    for indices in plan:
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        labels = torch.full_like(batch.input_ids, -100)
        labels[:, 1:][batch.predict[:, :-1]] = batch.targets  # HF shifts labels: position t+1 holds t's target
        tick = time.perf_counter()
        model(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.input_ids), labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - tick
        tokens += batch.tokens
    return {
        "name": f"bare-peft-r{rank}",
        "steps": steps,
        "train_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "train_seconds": round(seconds, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def dev_metrics(run_dir: str, method: str, dev: str, limit: int, threads: int) -> dict[str, Any]:
    """Answer-token loss and greedy FinQA execution accuracy (`export.verify`'s greedy decoding) on dev[:limit], with
    the trained weights on the fp32 base (a QLoRA adapter too: that is how `adaptserve export` merges it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptserve import finqa
    from adaptserve.export import verify
    from adaptserve.models.hf import base_dir
    from adaptserve.train.data import collate, encode, load_items
    from adaptserve.train.loop import answer_loss
    from adaptserve.train.model import load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer("smollm2-135m")
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run_dir)
    model.eval()
    records = [r for r in load_items([dev])[:limit] if isinstance(r, finqa.FinQARecord)]
    examples = encode(records, tokenizer, retrieval_k=2, max_seq_len=4096)
    with torch.inference_mode():
        loss = sum(answer_loss(model, collate([e], tokenizer.pad_token_id)).item() for e in examples)
    answer_tokens = sum(len(e.answer) for e in examples)
    prompts = [verify.Prompt(tokenizer.decode(e.prompt), list(e.prompt), add_bos=False) for e in examples]  # training's ids
    outputs = verify.greedy_hf(model, prompts, 48, eos_ids(model, tokenizer))
    programs = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
    correct = sum(finqa.score_output(p, r).correct for p, r in zip(programs, records, strict=True))
    return {"dev_examples": len(records), "dev_loss": round(loss / answer_tokens, 4), "dev_accuracy": correct / len(records)}


def plot_memory(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for run in runs:
        ax.plot(range(1, run["steps"] + 1), [m / 2**30 for m in run["memory_history"]], marker=".", label=run["name"])
    ax.axhline(2, color="gray", linestyle="--", linewidth=1, label="target 2 GiB")
    ax.set(xlabel="step", ylabel="RSS after step (GiB)", title="CPU LoRA, batch 4 x 512 tokens, 1 thread", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results.get('threads', 1)} torch thread(s) per run, fp32.",
        "",
        f"### Methods: same data (FinQA train), seed and {results['steps']} steps of {results.get('batch_size', 4)} examples",
        "",
        "| run | trainable | peak RSS | tokens/s | wall | final train loss | dev loss | dev exec. accuracy | weights saved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["methods"]:
        trainable = r["method"] if r["rank"] is None else f"{r['method']} r{r['rank']}"
        lines.append(
            f"| {r['name']} | {trainable} "
            f"| {r['peak_rss_bytes'] / GIB:.2f} GiB | {r['tokens_per_second']:.0f} | {r['wall_seconds'] / 60:.1f} min "
            f"| {r['final_loss']:.3f} | {r['dev_loss']:.3f} | {100 * r['dev_accuracy']:.1f}% of {r['dev_examples']} "
            f"| {r['adapter_bytes'] / 1e6:.1f} MB |"
        )
    if "throughput" in results:
        lines += _throughput_lines(results["throughput"]["ours"], results["throughput"]["bare"])
    if results["memory"]:
        lines += _memory_lines(results["memory"])
    return "\n".join(lines) + "\n"


def _throughput_lines(ours: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    return [
        "",
        "### Throughput: `adaptserve train` vs a bare PEFT loop on the same batches (LoRA r16)",
        "",
        "| loop | tokens/s | peak RSS |",
        "|---|---|---|",
        f"| adaptserve train | {ours['tokens_per_second']:.0f} | {ours['peak_rss_bytes'] / GIB:.2f} GiB |",
        f"| bare PEFT loop (full logits, HF loss) | {bare['tokens_per_second']:.0f} | {bare['peak_rss_bytes'] / GIB:.2f} GiB |",
        f"| ratio | {ours['tokens_per_second'] / bare['tokens_per_second']:.2f}x | |",
    ]


def _memory_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "### Memory: batch 4 x 512 tokens",
        "",
        "| run | peak RSS | RSS first step -> last step | tokens/s |",
        "|---|---|---|---|",
    ]
    for r in runs:
        history = r["memory_history"]
        lines.append(
            f"| {r['name']} | {r['peak_rss_bytes'] / GIB:.2f} GiB | {history[0] / GIB:.2f} -> {history[-1] / GIB:.2f} GiB "
            f"| {r['tokens_per_second']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--dev-limit", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step, every run")
    parser.add_argument("--data", default=DATA, help="training data (an `adaptserve train --data` source)")
    parser.add_argument("--dev", default=DEV, help="dev data for loss and accuracy (same forms)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results/training")
    parser.add_argument("--only", nargs="*", default=None, help="rerun only these runs (the rest is kept from results.json)")
    parser.add_argument("--worker", choices=["bare", "dev"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker == "bare":
        sys.stdout.write(json.dumps(bare_loop(args.data, args.batch_size, args.steps, rank=16, threads=args.threads)) + "\n")
        return
    if args.worker == "dev":
        sys.stdout.write(json.dumps(dev_metrics(args.run_dir, args.method, args.dev, args.dev_limit, args.threads)) + "\n")
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    done = {r["name"] for r in results.get("methods", []) + results.get("memory", [])}
    done |= {"bare"} if results.get("throughput", {}).get("bare") else set()

    def wanted(name: str) -> bool:
        """--only NAME... reruns those; otherwise whatever results.json does not hold yet runs."""
        return name in args.only if args.only is not None else name not in done

    def worker(*flags: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, *flags, "--steps", str(args.steps), "--dev-limit", str(args.dev_limit)]
        cmd += ["--threads", str(args.threads), "--data", args.data, "--dev", args.dev, "--batch-size", str(args.batch_size)]
        output = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        return json.loads(output.stdout.strip().splitlines()[-1])

    results["machine"] = machine_info()
    results["steps"] = args.steps
    results["threads"] = args.threads
    results["batch_size"] = args.batch_size
    results.setdefault("methods", [])
    results.setdefault("memory", [])

    def record(kind: str, run: dict[str, Any]) -> None:
        """Saved after every run, so that a failed or interrupted benchmark keeps what it measured."""
        results[kind] = [r for r in results[kind] if r["name"] != run["name"]] + [run]
        saved.write_text(json.dumps(results, indent=2) + "\n")

    for name, flags in VARIANTS.items():
        if wanted(name):
            run = run_train(name, flags, args, args.steps, out)
            run |= worker("--worker", "dev", "--run-dir", run["dir"], "--method", run["method"])
            log.info("%s: %s", name, {k: v for k, v in run.items() if k != "memory_history"})
            record("methods", run)
    if wanted("bare"):
        results["throughput"] = {"bare": worker("--worker", "bare")}
        saved.write_text(json.dumps(results, indent=2) + "\n")
    if "throughput" in results:
        results["throughput"]["ours"] = next(m for m in results["methods"] if m["name"] == "lora-r16")
    for name, flags in MEMORY.items():
        if wanted(name):
            record("memory", run_train(name, flags, args, args.memory_steps, out))
    order = list(VARIANTS) + list(MEMORY)
    for kind in ("methods", "memory"):
        results[kind].sort(key=lambda r: order.index(r["name"]))
    saved.write_text(json.dumps(results, indent=2) + "\n")
    (out / "training.md").write_text(markdown(results))
    if results["memory"]:
        plot_memory(results["memory"], out / "memory.png")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
