"""Export fidelity: do the exported GGUFs write the same FinQA programs as the unmerged adapter in transformers?

    .venv/bin/python benchmarks/export_fidelity.py --finqa ../shared/data/finqa/test.json --out benchmarks/results/export

For each FinQA record the adapter's own prompt (its training style) is answered greedily by the unmerged adapter
(transformers + PEFT, fp32: the reference) and by every export: the merged GGUF at each quant, and the adapter GGUF
applied by llama.cpp to the base GGUF. Same prompt token ids everywhere. Two measures say how much of a
disagreement is the export and how much the model's own near-ties: the unmerged adapter once more in bf16 (a
precision change alone, no export), and, where an output first leaves the reference's path, the reference's margin
there (its top logit minus its logit for the token the other chose). A third says which records can flip at all: the
reference's narrowest margin along its own output (top logit minus runner-up at each token), with each export's
agreement by that margin. Writes `<out>/export_fidelity.json` and `<out>/export_fidelity.md`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adaptserve import finqa
from adaptserve.export import ExportConfig, ensure_gguf, export, merge, verify
from adaptserve.export.adapter import read_adapter
from adaptserve.models import resolve
from adaptserve.models.prompt import eos_ids

log = logging.getLogger("benchmarks.export_fidelity")
MAX_TOKENS = 64  # FinQA programs run 10-40 tokens
MARGIN_BINS = (0.25, 0.5, 1.0, 2.0)  # edges of the narrowest-margin buckets in the markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="adapters/smollm2-135m-finqa")
    parser.add_argument("--finqa", default="../shared/data/finqa/test.json")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 row (on CPUs without bf16 matmuls, ~10 s a record)")
    parser.add_argument("--out", default="benchmarks/results/export")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    adapter_dir = Path(args.adapter)
    records = finqa.load_finqa(args.finqa, Path(args.finqa).stem)[: args.limit]
    style = finqa.adapter_style(adapter_dir)
    adapter = read_adapter(adapter_dir)
    base_ref = adapter.recorded_base or "smollm2-135m"
    model, location = merge.load_base(base_ref)
    tokenizer = merge.load_tokenizer(adapter, location)
    eos = eos_ids(model, tokenizer)
    prompts = verify.encode(tokenizer, [finqa.record_prompt(r, style, chat=True) for r in records])

    tick = time.perf_counter()
    peft = merge.attach(model, adapter)
    reference = verify.greedy_hf(peft, prompts, MAX_TOKENS, eos, "transformers")
    ref = _Outputs(reference, records, tokenizer)
    path_margins = _path_margins(peft, prompts, reference)
    rows: list[dict[str, Any]] = [_row("transformers + PEFT (reference)", ref, ref, tick)]

    def add(name: str, tokens: list[list[int]], tick: float) -> None:
        outputs = _Outputs(tokens, records, tokenizer)
        rows.append(_row(name, outputs, ref, tick) | {"margins": _margins(peft, prompts, reference, tokens)})

    if not args.no_bf16:
        tick = time.perf_counter()
        bf16 = copy.deepcopy(peft).to(torch.bfloat16)
        add("transformers + PEFT in bf16 (no export)", verify.greedy_hf(bf16, prompts, MAX_TOKENS, eos, "bf16"), tick)
    for quant in args.quants:
        tick = time.perf_counter()
        path = ensure_gguf(adapter_dir, quant, args.threads)
        add(f"merged GGUF {quant}", verify.greedy_gguf(path, prompts, MAX_TOKENS, eos, args.threads, progress=quant)[0], tick)
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        export(ExportConfig(adapter=str(adapter_dir), output_dir=tmp, formats=["lora-gguf"], verify_tokens=0))
        lora = next(Path(tmp).glob("*-lora.gguf"))
        base = resolve(base_ref).path
        tokens, _ = verify.greedy_gguf(base, prompts, MAX_TOKENS, eos, args.threads, lora, "lora-gguf")
        add(f"adapter GGUF on {base.name}", tokens, tick)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"adapter": str(adapter_dir), "finqa": args.finqa, "records": len(records), "max_tokens": MAX_TOKENS}
    summary |= {"path_margins": path_margins, "rows": rows}
    (out / "export_fidelity.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "export_fidelity.md").write_text(markdown(summary))
    log.info("wrote %s", out)


class _Outputs:
    """One backend's greedy tokens per record, decoded and scored once."""

    def __init__(self, tokens: list[list[int]], records: list[finqa.FinQARecord], tokenizer: Any) -> None:
        self.tokens = tokens
        self.texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        self.scored = [finqa.score_output(text, record) for text, record in zip(self.texts, records, strict=True)]


def _row(name: str, outputs: _Outputs, reference: _Outputs, tick: float) -> dict[str, Any]:
    agreement = verify.agreement(reference.tokens, outputs.tokens)
    same = [a == b for a, b in zip(outputs.texts, reference.texts, strict=True)]
    n = len(outputs.tokens)
    return {
        "export": name,
        "same": same,
        "same_program": sum(same) / n,
        "same_answer": sum(s.answer == r.answer for s, r in zip(outputs.scored, reference.scored, strict=True)) / n,
        "same_tokens": agreement.exact,
        "mean_prefix_tokens": agreement.mean_prefix,
        "execution_accuracy": sum(s.correct for s in outputs.scored) / n,
        "seconds": round(time.perf_counter() - tick, 1),
    }


@torch.inference_mode()
def _margins(model: Any, prompts: list[verify.Prompt], reference: list[list[int]], outputs: list[list[int]]) -> list[float]:
    """Where each output first differs from the reference: the reference model's top logit minus its logit for the
    token the output chose. Small margins are near-ties, which any change of arithmetic can flip."""
    margins = []
    for prompt, ref, out in zip(prompts, reference, outputs, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), None)
        if k is not None:
            logits = model(torch.tensor([prompt.ids + ref[:k]], device=model.device)).logits[0, -1].float()
            margins.append(round(float(logits[ref[k]] - logits[out[k]]), 4))
    return sorted(margins)


@torch.inference_mode()
def _path_margins(model: Any, prompts: list[verify.Prompt], reference: list[list[int]]) -> list[float]:
    """Per record, the reference's narrowest choice along its own output, the stop included: at each position its
    top logit minus the runner-up, the smallest. A record whose path has no near-tie has nothing to flip."""
    margins = []
    for prompt, ref in zip(prompts, reference, strict=True):
        logits = model(torch.tensor([prompt.ids + ref], device=model.device)).logits[0, len(prompt.ids) - 1 :].float()
        top2 = logits.topk(2, dim=-1).values
        margins.append(round(float((top2[:, 0] - top2[:, 1]).min()), 4))
    return margins


def _by_margin(summary: dict[str, Any]) -> list[str]:
    """Each export's program agreement by the reference's narrowest margin on the record's path."""
    exports = [row for row in summary["rows"] if "margins" in row]  # every row but the reference
    edges = [0.0, *MARGIN_BINS, float("inf")]
    lines = [
        "",
        "Agreement by the reference's narrowest margin along its own output (top logit minus runner-up, smallest over "
        "the program's tokens and its stop): only records with a near-tie somewhere can flip.",
        "",
        "| narrowest margin | records | " + " | ".join(row["export"] for row in exports) + " |",
        "|---|---|" + "---|" * len(exports),
    ]
    for low, high in itertools.pairwise(edges):
        members = [i for i, m in enumerate(summary["path_margins"]) if low <= m < high]
        if not members:
            continue
        cells = [f"{100 * sum(row['same'][i] for i in members) / len(members):.0f}%" for row in exports]
        label = f">= {low:g}" if high == float("inf") else f"{low:g} - {high:g}"
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Adapter `{summary['adapter']}` on {summary['records']} records of `{summary['finqa']}`, greedy, up to "
        f"{summary['max_tokens']} tokens. Agreement is with the unmerged adapter in transformers (fp32). Margin at "
        "divergence: where an output first differs from the reference, the reference's top logit minus its logit "
        "for the token the output chose (median and largest over the differing records).",
        "",
        "| export | same program | same executed answer | mean agreeing prefix (tokens) | execution accuracy "
        "| margin at divergence: median / max |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        margins = row.get("margins")
        spread = f"{statistics.median(margins):.2f} / {max(margins):.2f}" if margins else "-"
        lines.append(
            f"| {row['export']} | {100 * row['same_program']:.1f}% | {100 * row['same_answer']:.1f}% "
            f"| {row['mean_prefix_tokens']:.1f} | {100 * row['execution_accuracy']:.1f}% | {spread} |"
        )
    if "path_margins" in summary:
        lines += _by_margin(summary)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
