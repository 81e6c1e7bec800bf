"""Our server against llama-cpp-python's own (`python -m llama_cpp.server`): same GGUF, threads, prompts and load.

    .venv/bin/python benchmarks/peer.py --out benchmarks/results/peer      # ~10 min on 2 cores; nothing else running

Both servers are started the same way (a fresh process on a loopback port, timed to its first answer; the peer with
llama.cpp's extra buffer types off, as adaptserve loads models, see `PEER`) and measured
by the same `adaptserve bench --url` run: streamed chat at each concurrency level, and the llama-bench style direct
speed of the GGUF for the HTTP/direct ratio. Also recorded: peak RSS of each server process, and the status each
answers to a malformed JSON body (a client error should be a 4xx, not a 500). Needs the `peer` extra
(`pip install 'adaptserve[peer]'`: llama-cpp-python's server dependencies). Writes `<out>/peer.json`, `<out>/peer.md`
and each side's bench output under `<out>/ours/` and `<out>/llama-cpp-server/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx

from adaptserve.bench import BenchConfig, bench
from adaptserve.bench.load import Server, free_port, launch, start_server
from adaptserve.models import resolve
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE

log = logging.getLogger("benchmarks.peer")
MODEL = "smollm2-135m"


# llama_cpp.server constructs its Llama itself: run it in a process that imported adaptserve's loader, which keeps
# llama.cpp's extra buffer types off for every Llama there (docs/cpus.md: the AMX one crashes on Xeons that have it).
PEER = "import adaptserve.llama_thread, runpy; runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"


def start_peer(threads: int, log_path: Path, interrupt: bool) -> Server:
    port = free_port()
    cmd = [
        sys.executable, "-c", PEER, "--model", str(resolve(MODEL).path), "--model_alias", MODEL,
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
        "--host", "127.0.0.1", "--port", str(port),
        # Its default (True) ends the running stream early whenever another request arrives (benchmarks/serving.md).
        # Off, requests wait their turn, which is what a fair comparison needs.
        "--interrupt_requests", str(interrupt),
    ]  # fmt: skip
    return launch(cmd, f"http://127.0.0.1:{port}", MODEL, log_path)


def measure(name: str, server: Server, args: argparse.Namespace, kv_cache: str) -> dict[str, Any]:
    """The bench load against `server`, its malformed-JSON status, cold start and peak RSS; stops the server.
    `kv_cache` is the server's K/V cache type, which the direct side of HTTP / direct decodes with too."""
    try:
        config = BenchConfig(
            models=[MODEL],
            url=server.url,
            accuracy=False,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            threads=args.threads,
            repeats=args.repeats,
            pp=args.pp,
            tg=args.tg,
            kv_cache=kv_cache,
            out=str(args.out / name),
        )
        results = bench(config)
        malformed = httpx.post(
            f"{server.url}/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}
        )
        return {
            "server": name,
            "cold_start_seconds": round(server.cold_start_seconds, 2),
            "peak_rss_bytes": server.peak_rss_bytes(),
            "malformed_json_status": malformed.status_code,
            "load": results["load"],
            "overhead": results["overhead"],
        }
    finally:
        server.stop()


def markdown(rows: list[dict[str, Any]], threads: int, peer_interrupts: bool, kv_cache: str) -> str:
    ours, peer = rows
    lines = [
        f"`{MODEL}` (Q4_1 GGUF), {threads} llama.cpp threads, streamed chat, same prompts and load for both; our "
        f"server with `--kv-cache {kv_cache}`, llama_cpp.server with llama.cpp's f16 cache. "
        f"llama_cpp.server ran with `--interrupt_requests {peer_interrupts}`"
        + (" (its default: a new request cuts the running stream short)." if peer_interrupts else " (requests wait their turn)."),
        "",
        "| clients | ours: output tokens/s | llama_cpp.server: output tokens/s | ratio | ours: p95 TTFT | peer: p95 TTFT "
        "| errors (ours / peer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(ours["load"], peer["load"], strict=True):
        ratio = a["tokens_per_second"] / b["tokens_per_second"] if b["tokens_per_second"] else float("nan")
        lines.append(
            f"| {a['concurrency']} | {a['tokens_per_second']:.1f} | {b['tokens_per_second']:.1f} | {ratio:.2f}x "
            f"| {a['ttft'].get('p95', float('nan')):.2f} s | {b['ttft'].get('p95', float('nan')):.2f} s "
            f"| {a['errors']} / {b['errors']} |"
        )
    lines += ["", "| | ours | llama_cpp.server |", "|---|---|---|"]
    for label, key, unit in (
        ("cold start (process start to first answer)", "cold_start_seconds", " s"),
        ("peak RSS", "peak_rss_bytes", ""),
        ("status for a malformed JSON body", "malformed_json_status", ""),
    ):
        value = [r[key] for r in rows]
        if key == "peak_rss_bytes":
            value = [f"{v / 2**20:.0f} MiB" if v else "n/a" for v in value]
        lines.append(f"| {label} | {value[0]}{unit} | {value[1]}{unit} |")
    shares = [
        f"{o['ratio']:.2f} ({o['http_decode_tokens_per_second']:.1f} vs {o['direct_chat_tokens_per_second']:.1f} tokens/s)"
        if o["ratio"] is not None
        else "n/a (no conversation answered in two or more tokens)"
        for o in (r["overhead"][0] for r in rows)
    ]
    lines.append(f"| single-client HTTP decoding, share of llama-cpp-python's direct chat (paired) | {shares[0]} | {shares[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peer"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens of the direct prompt-processing test")
    parser.add_argument("--tg", type=int, default=128, help="tokens of the direct generation test")
    parser.add_argument("--kv-cache", default=DEFAULT_KV_CACHE, help="our server's --kv-cache (the peer keeps llama.cpp's f16)")
    parser.add_argument(
        "--peer-interrupts", action="store_true", help="keep the peer's default: a new request cuts the running stream short"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    ours = measure(
        "ours",
        start_server([MODEL], args.threads, args.out / "ours-server.log", ["--kv-cache", args.kv_cache]),
        args,
        args.kv_cache,
    )
    ours["kv_cache"] = args.kv_cache
    try:
        peer = measure(
            "llama-cpp-server", start_peer(args.threads, args.out / "llama-cpp-server.log", args.peer_interrupts), args, "f16"
        )
    except (RuntimeError, httpx.HTTPError) as err:  # it did not start, or it went away mid-run: say so, keep ours
        log.error("llama_cpp.server failed: %s", err)
        peer = {"server": "llama-cpp-server", "failed": str(err)}
    rows = [ours, peer]
    (args.out / "peer.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = (
        markdown(rows, args.threads, args.peer_interrupts, args.kv_cache)
        if "failed" not in peer
        else (f"llama_cpp.server failed: {peer['failed']}\n")
    )
    (args.out / "peer.md").write_text(text)
    log.info("wrote %s", args.out / "peer.md")


if __name__ == "__main__":
    main()
