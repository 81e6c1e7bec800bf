"""report.md and the plots of a bench run, from its results dict (the same data as results.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptserve.bench.config import variant


def write(results: dict[str, Any], out: Path) -> None:
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    plots(results, out)


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# adaptserve bench",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.0f} GiB, GPU: {machine['gpu'] or 'none'}; "
        f"commit {str(machine['git_commit'])[:10]}; llama.cpp K/V cache {results['config'].get('kv_cache', 'f16')}.",
    ]
    if results["accuracy"]:
        lines += ["", "## FinQA execution accuracy", "", *accuracy_lines(results["accuracy"])]
    if results["perplexity"]:
        lines += _perplexity(results["perplexity"], results["config"]["ppl"])
    lines += [
        "",
        "## Evaluation prompts",
        "",
        "| model | prompts | expected answer found | mean output tokens | with reference | ROUGE-L F1 (mean) | BLEU (corpus) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["prompts"]:
        lines.append(
            f"| {variant(p['model'], p['backend'])} | {p['prompts']} | {p['expected_found']}/{p['expected_checked']} | {p['mean_completion_tokens']:.0f} "
            f"| {p['referenced']} | {_maybe(p['rouge_l'], '.3f')} | {_maybe(p['bleu'], '.1f')} |"
        )
    if not any(p["referenced"] for p in results["prompts"]):
        lines += ["", "No prompt has a reference answer, so ROUGE-L and BLEU were not measured."]
    lines += [
        "",
        "## Latency and throughput (streamed chat over HTTP)",
        "",
        "| model | clients | requests | errors | output tokens/s | requests/s | TTFT p50/p95 (s) | per-token p50 (ms) | end-to-end p50/p95 (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["load"]:
        ttft, tpot, e2e = row["ttft"], row["tpot"], row["e2e"]
        lines.append(
            f"| {variant(row['model'], row['backend'])} | {row['concurrency']} | {row['requests']} | {row['errors']} | {row['tokens_per_second']:.1f} "
            f"| {row['requests_per_second']:.2f} | {ttft.get('p50', 0):.3f} / {ttft.get('p95', 0):.3f} "
            f"| {1000 * tpot.get('p50', 0):.1f} | {e2e.get('p50', 0):.2f} / {e2e.get('p95', 0):.2f} |"
        )
    lines += [
        "",
        "## Engine speed without HTTP, and what HTTP costs",
        "",
        "pp/tg: llama-bench style, random tokens. Direct chat: llama-cpp-python's own streamed chat completion of "
        "the single-client level's conversations, timed per token after the first as the HTTP client times ours, "
        "in pairs: each conversation directly, then at once through the server, so that both see the same host. "
        "HTTP / direct is the server's single-client decode rate over direct chat; HTTP / tg, over bare decoding. "
        "Same text: pairs whose two replies were identical (so both generated the same tokens).",
        "",
        "| model | GGUF | pp tokens/s | tg tokens/s | direct chat tokens/s | HTTP single-client tokens/s "
        "| HTTP / direct | HTTP / tg | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    overhead = {row["model"]: row for row in results["overhead"]}
    for s in results["speed"]:
        o = overhead.get(s["model"], {})
        lines.append(
            f"| {s['model']} | {s['gguf']} | pp{s['pp_tokens']}: {s['pp_tokens_per_second']:.0f} ± {s['pp_std']:.0f} "
            f"| tg{s['tg_tokens']}: {s['tg_tokens_per_second']:.1f} ± {s['tg_std']:.1f} "
            f"| {_maybe(o.get('direct_chat_tokens_per_second', 0), '.1f')} "
            f"| {_maybe(o.get('http_decode_tokens_per_second', 0), '.1f')} "
            f"| {_maybe(o.get('ratio', 0), '.2f')} | {_maybe(o.get('ratio_tg', 0), '.2f')} "
            f"| {o.get('same_text', 0)} of {o.get('pairs', 0)} |"
        )
    if results.get("training"):
        lines += _training(results["training"])
    if results["skipped"]:
        lines += [
            "",
            "Skipped: " + "; ".join(f"{s['model']} on {s['backend']} ({s['reason']})" for s in results["skipped"]) + ".",
        ]
    for failed in results["failed"]:
        lines += ["", f"Failed: the {failed['backend']} server at {failed['url']} stopped answering ({failed['reason']})."]
    for server in results["servers"]:
        rss = server["peak_rss_bytes"]
        memory = f", peak RSS {rss / 2**20:.0f} MiB" if rss else ""
        lines += ["", f"Server ({server['backend']}, all models): cold start {server['cold_start_seconds']:.1f} s{memory}."]
    return "\n".join(lines) + "\n"


def _label(row: dict[str, Any]) -> str:
    """A FinQA accuracy row's name: the variant, its mode, and whether its input was normalized."""
    name = variant(row["model"], row.get("backend", "llama.cpp"))
    return f"{name} {row['mode']}{'' if row['normalize'] else ' (raw input)'}"


def accuracy_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The FinQA accuracy table with each mode's cost per question, then the vote modes' confidence tables."""
    lines = [
        "Latency per question: the prompt's prefill, timed once, plus the mode's decoding with the prompt cached.",
        "",
        "| model | mode | data | n | accuracy (95% CI) | program exact | executable | prompt tokens | output tokens / q "
        "| latency p50 / mean (s) | of which decoding p50 (s) | decoding tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        low, high = a["ci95"]
        name = variant(a["model"], a.get("backend", "llama.cpp"))
        mode = a["mode"] + ("" if a["normalize"] else ", not normalized")
        lines.append(
            f"| {name} | {mode} | {a['data']} | {a['count']} | {100 * a['execution_accuracy']:.1f}% ({100 * low:.1f}-{100 * high:.1f}%) "
            f"| {100 * a['program_exact_match']:.1f}% | {100 * a['executable_programs']:.0f}% | {a['mean_prompt_tokens']:.0f} "
            f"| {a['mean_completion_tokens']:.1f} | {a['latency_p50']:.2f} / {a['latency_mean']:.2f} | {a['decode_p50']:.2f} "
            f"| {a['output_tokens_per_second']:.1f} |"
        )
    for a in (a for a in rows if a["buckets"]):
        lines += ["", f"Vote share as a confidence, {_label(a)} on {a['data']}:", ""]
        lines += ["| vote share | questions | right |", "|---|---|---|"]
        for b in a["buckets"]:
            closing = "]" if b["high"] == 1.0 else ")"
            right = "n/a" if b["accuracy"] is None else f"{100 * b['accuracy']:.1f}%"
            lines.append(f"| [{b['low']:.1f}, {b['high']:.1f}{closing} | {b['count']} | {right} |")
        if at := next((c for c in reversed(a["coverage"]) if c["threshold"] >= 0.5), None):
            lines += [
                "",
                f"Answering only at vote share >= {at['threshold']:.2f}: {100 * at['accuracy']:.1f}% right on "
                f"{100 * at['coverage']:.1f}% of the questions.",
            ]
    return lines


def confidence_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy by vote-share bucket, and the accuracy-coverage curve against the same model's greedy accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voted = [a for a in rows if a["buckets"]]
    if not voted:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(voted)
    for i, a in enumerate(voted):
        xs = [j + i * width for j in range(len(a["buckets"]))]
        bars = left.bar(xs, [100 * (b["accuracy"] or 0) for b in a["buckets"]], width, label=_label(a))
        left.bar_label(bars, labels=[f"n={b['count']}" for b in a["buckets"]], fontsize=6)
        right.plot(
            [100 * c["coverage"] for c in a["coverage"]],
            [100 * c["accuracy"] for c in a["coverage"]],
            marker=".",
            label=_label(a),
        )
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(voted[0]["buckets"]))])
    left.set_xticklabels([f"{b['low']:.1f}-{b['high']:.1f}" for b in voted[0]["buckets"]])
    left.set(xlabel="vote share of the chosen answer", ylabel="right (%)", title="accuracy by confidence")
    for a in rows:
        if a["mode"] == "greedy" and any(v["model"] == a["model"] and v["data"] == a["data"] for v in voted):
            right.axhline(100 * a["execution_accuracy"], linestyle="--", linewidth=1, color="grey")
            right.annotate(f"{_label(a)}", (100, 100 * a["execution_accuracy"]), fontsize=6, ha="right", va="bottom")
    right.set(xlabel="questions answered (%)", ylabel="right among answered (%)", title="accuracy vs coverage")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _perplexity(rows: list[dict[str, Any]], source: str) -> list[str]:
    lines = [
        "",
        "## Perplexity (llama.cpp's llama-perplexity method)",
        "",
        f"On `{source}`: non-overlapping chunks of n_ctx tokens, the second half of each scored; ± is llama.cpp's "
        "uncertainty (the standard error of the mean token NLL, through exp).",
        "",
        "| model | GGUF | PPL | chunks x n_ctx | tokens scored | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gguf']} | {r['ppl']:.4f} ± {r['error']:.5f} | {r['chunks']} x {r['n_ctx']} "
            f"| {r['tokens_scored']} | {r['seconds']:.1f} |"
        )
    return lines


def _training(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Training cost (each adapter's train_report.json)",
        "",
        "Time is the training loop's, over all resumed runs; peak memory is CUDA's allocator peak on a GPU, the "
        "process's peak RSS on a CPU.",
        "",
        "| model | device | host CPU (flags) | precision | steps | tokens | tokens/s | time | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        host = f"{r['host_cpu']} ({', '.join(r['cpu_flags'])})" if r["host_cpu"] else "not recorded"
        lines.append(
            f"| {r['model']} | {r['device']} | {host} | {r['precision']} | {r['steps']} | {r['train_tokens']} "
            f"| {r['tokens_per_second']:.0f} | {r['train_seconds'] / 60:.1f} min | {r['peak_memory_bytes'] / 2**30:.1f} GiB |"
        )
    return lines


def _maybe(value: float | None, spec: str) -> str:
    """A score, or n/a where there was nothing to score (never a stand-in 0)."""
    return "n/a" if value is None else format(value, spec)


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["accuracy"]:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results["accuracy"])), 3.8))
        rows = results["accuracy"]
        values = [100 * a["execution_accuracy"] for a in rows]
        errors = [
            [100 * (a["execution_accuracy"] - a["ci95"][0]) for a in rows],
            [100 * (a["ci95"][1] - a["execution_accuracy"]) for a in rows],
        ]
        ax.bar([_label(a) for a in rows], values, yerr=errors, capsize=6, color="tab:blue")
        ax.set(ylabel="execution accuracy (%)", title="FinQA execution accuracy (95% CI)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
        confidence_plot(rows, out / "finqa_confidence.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for model in dict.fromkeys(variant(row["model"], row["backend"]) for row in results["load"]):
        rows = [r for r in results["load"] if variant(r["model"], r["backend"]) == model]
        levels = [r["concurrency"] for r in rows]
        (line,) = left.plot(levels, [r["tokens_per_second"] for r in rows], marker="o", label=model)
        color = line.get_color()
        right.plot(levels, [r["ttft"].get("p50", 0) for r in rows], marker="o", color=color, label=f"{model} p50")
        right.plot(levels, [r["ttft"].get("p95", 0) for r in rows], marker="x", linestyle="--", color=color, label=f"{model} p95")
    left.set(xlabel="concurrent clients", ylabel="output tokens/s (all clients)", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="seconds", title="time to first token")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
