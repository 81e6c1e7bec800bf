"""Server memory against batching settings: peak RSS of `adaptserve serve` (base + adapted) per slots x context.

    .venv/bin/python benchmarks/footprint.py --out benchmarks/results/footprint

Each setting starts a fresh server (without the UI, except the defaults rows: `adaptserve serve` as it runs), answers
one request per model, opens the UI where it is on (the server imports gradio only then), and reads the kernel's
high-water mark of its resident set (VmHWM).
llama.cpp clears the KV cache it allocates, so every cell counts whether used or not: a model costs n_slots x n_ctx
cells (for SmolLM2-135M about 12 KiB each with the default q8_0 cache, 22.5 KiB with `--kv-cache f16`) on top of its
weights and the process.
Writes `<out>/footprint.json` and `<out>/footprint.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import httpx

from adaptserve.bench.load import free_port, launch
from adaptserve.models import default_models
from adaptserve.serve.engine import DEFAULT_CTX, DEFAULT_SLOTS
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE

log = logging.getLogger("benchmarks.footprint")
# (n_slots, n_ctx, kv_cache, ui)
SETTINGS = [(1, 4096, "f16", False), (2, 2048, "f16", False), (4, 1024, "f16", False), (4, 1536, "f16", False)]
SETTINGS += [(4, 2048, "f16", False), (4, 4096, "f16", False), (DEFAULT_SLOTS, DEFAULT_CTX, "f16", True)]
SETTINGS += [(4, 2048, "q8_0", False), (4, 4096, "q8_0", False), (DEFAULT_SLOTS, DEFAULT_CTX, "q8_0", True)]


def measure(
    models: list[str], slots: int, n_ctx: int, kv_cache: str, ui: bool, threads: int, log_dir: Path
) -> dict[str, float | int | bool | str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "adaptserve", "serve", "--port", str(port), "--n-threads", str(threads),
        "--n-slots", str(slots), "--n-ctx", str(n_ctx), "--kv-cache", kv_cache, *([] if ui else ["--no-ui"]),
        "--models", *models,
    ]  # fmt: skip
    server = launch(cmd, f"http://127.0.0.1:{port}", models[0], log_dir / f"server-{slots}x{n_ctx}-{kv_cache}.log")
    try:
        for model in models[1:]:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        if ui:
            httpx.get(f"{server.url}/ui/", timeout=120).raise_for_status()
        peak = server.peak_rss_bytes() or 0
    finally:
        server.stop()
    cells = slots * n_ctx
    return {
        "slots": slots,
        "n_ctx": n_ctx,
        "kv_cache": kv_cache,
        "ui": ui,
        "cells_per_model": cells,
        "peak_rss_mib": round(peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=default_models())
    parser.add_argument("--limit", type=int, default=None, help="measure the first N settings only (smoke runs)")
    parser.add_argument(
        "--defaults-only", action="store_true", help="only the server's default slots, context and K/V cache, UI off and on"
    )
    parser.add_argument("--target-mb", type=float, default=600, help="the peak RSS each row is checked against")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/footprint"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="footprint-"))  # server logs, kept out of the results
    settings = SETTINGS[: args.limit]
    if args.defaults_only:
        settings = [(DEFAULT_SLOTS, DEFAULT_CTX, DEFAULT_KV_CACHE, ui) for ui in (False, True)]
    rows = [measure(args.models, *setting, args.threads, logs) for setting in settings]
    (args.out / "footprint.json").write_text(json.dumps({"models": args.models, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Peak RSS of `adaptserve serve` with {' + '.join(args.models)}, after one request each and, where the UI "
        "is on, after /ui was opened (until then such a server has not imported gradio and weighs what it does without "
        f"the UI). Defaults: --n-slots {DEFAULT_SLOTS} --n-ctx {DEFAULT_CTX} --kv-cache {DEFAULT_KV_CACHE}, UI on.",
        "",
        f"| --n-slots | --n-ctx (per slot) | --kv-cache | UI | KV cells per model | peak RSS | within {args.target_mb:.0f} MB |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['slots']} | {r['n_ctx']} | {r['kv_cache']} | {'on' if r['ui'] else 'off'} | {r['cells_per_model']} | {r['peak_rss_mib']} MiB | "
            f"{'yes' if r['peak_rss_mib'] * 2**20 <= args.target_mb * 1e6 else 'no'} |"
            for r in rows
        ),
    ]
    (args.out / "footprint.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out / "footprint.md")


if __name__ == "__main__":
    main()
