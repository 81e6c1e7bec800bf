"""One bench run: perplexity and FinQA accuracy per variant (in process), the prompt set and the load levels over
HTTP, then the results, report and plots. The HTTP side talks to `config.url` or to a server this run starts and
stops itself."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from adaptserve import finqa
from adaptserve.bench import report
from adaptserve.bench.accuracy import evaluate_finqa, mode_options, runnable_modes
from adaptserve.bench.config import GPU_BACKENDS, LLAMA_CPP, PRECISION, BenchConfig, BenchError, variant
from adaptserve.bench.load import Message, ServerGone, run_level, start_server
from adaptserve.bench.perplexity import Perplexity, perplexity
from adaptserve.bench.prompts import EvalPrompt, answer_all, load_prompts, summarize
from adaptserve.bench.speed import Speed, http_vs_direct, llama_bench, served_model
from adaptserve.host import cpu_info
from adaptserve.models import UnknownModelError, resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.metrics import Metrics
from adaptserve.serve.pool import ModelPool

log = logging.getLogger(__name__)
ACCURACY_CTX = 4096


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run every measurement of `config`; writes results.json, report.md, PNGs and per-example JSONL to config.out."""
    config.validate()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the progress
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(config.prompts)
    backends, skipped = _backends(config)
    gguf = LLAMA_CPP in backends
    results: dict[str, Any] = {"machine": machine_info(), "config": dataclasses.asdict(config), "started": time.time()}
    # first: a text too short for the context fails here, not after the accuracy run
    results["perplexity"] = [dataclasses.asdict(p) for p in _perplexity(config, config.ppl)] if config.ppl and gguf else []
    records = _finqa_records(config) if config.accuracy else []
    results["accuracy"] = [row for b in backends for row in _accuracy(config, records, out, b)] if config.accuracy else []
    chats = [[{"role": "user", "content": p.prompt}] for p in prompts]
    results["speed"] = [dataclasses.asdict(s) for s in _speed(config)] if gguf else []
    results["training"] = training_costs(config.models)
    results["skipped"] = skipped
    results["prompts"], results["overhead"], results["load"], results["servers"], results["failed"] = [], [], [], [], []
    for backend in ["url"] if config.url else backends:
        _over_http(config, backend, prompts, chats, out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, out)
    log.info("bench results in %s", out)
    return results


def _backends(config: BenchConfig) -> tuple[list[str], list[dict[str, str]]]:
    """The backends to run, and the variants left out with the reason (said out loud rather than dropped)."""
    if config.backends != ["auto"]:
        return list(dict.fromkeys(config.backends)), []
    if _gpu() is not None:
        return [LLAMA_CPP, *GPU_BACKENDS], []
    reason = "no CUDA GPU on this machine"
    return [LLAMA_CPP], [{"model": m, "backend": b, "reason": reason} for m in config.models for b in GPU_BACKENDS]


def _over_http(
    config: BenchConfig, backend: str, prompts: list[EvalPrompt], chats: list[list[Message]], out: Path, results: dict[str, Any]
) -> None:
    """The prompt set, HTTP / direct (llama.cpp) and the load levels for every model on one backend: `config.url`,
    or a server of our own."""
    if backend in (LLAMA_CPP, "url"):
        options = ["--kv-cache", config.kv_cache]
    else:
        options = ["--backend", "transformers", "--precision", PRECISION[backend]]
    log_path = out / ("server.log" if backend == LLAMA_CPP else f"server-{backend}.log")
    server = None if config.url else start_server(config.models, config.threads, log_path, options)
    url = config.url or server.url  # type: ignore[union-attr]
    try:
        _measure_http(config, backend, url, prompts, chats, out, results)
    except (httpx.TransportError, ServerGone) as err:  # the server went away: report it, keep what was measured
        log.error("the %s server at %s stopped answering: %s", backend, url, err)
        results["failed"].append({"backend": backend, "url": url, "reason": f"{type(err).__name__}: {err}"})
    finally:
        if server is not None:
            results["servers"].append(
                {
                    "backend": backend,
                    "url": url,
                    "cold_start_seconds": round(server.cold_start_seconds, 2),
                    "peak_rss_bytes": server.peak_rss_bytes(),
                }
            )
            server.stop()


def _measure_http(
    config: BenchConfig,
    backend: str,
    url: str,
    prompts: list[EvalPrompt],
    chats: list[list[Message]],
    out: Path,
    results: dict[str, Any],
) -> None:
    """The prompt set, HTTP / direct and the load levels for every model, against the server at `url`."""
    for model in config.models:
        answers = answer_all(url, model, prompts, config.max_tokens)  # also the warm-up of the load levels
        _write_jsonl(out / f"prompts-{variant(model, backend)}.jsonl", answers)
        results["prompts"].append({**summarize(model, answers), "backend": backend})
        if backend in (LLAMA_CPP, "url") and results["speed"]:
            results["overhead"].append(_overhead(config, url, model, chats, results["speed"]))
        for level in config.concurrency:
            requests = max(config.requests, level)
            result, _ = asyncio.run(run_level(url, model, chats, level, requests, config.max_tokens))
            log.info(
                "%s on %s x%d: %.1f tokens/s, p95 TTFT %.3fs",
                model,
                backend,
                level,
                result.tokens_per_second,
                result.ttft.get("p95", 0),
            )
            results["load"].append({**dataclasses.asdict(result), "backend": backend})


def training_costs(models: list[str]) -> list[dict[str, Any]]:
    """What each adapter among `models` cost to train, from the train_report.json it carries (bases have none)."""
    rows = []
    for model in models:
        try:
            spec = resolve(model)
        except UnknownModelError:  # a model only the --url server knows
            continue
        path = spec.path / "train_report.json" if spec.format == "adapter" else None
        if path is None or not path.is_file():
            continue
        report = json.loads(path.read_text())
        host = report.get("host") or {}  # older reports predate the host record
        rows.append(
            {
                "model": model,
                "device": report["device"],
                "host_cpu": host.get("cpu"),
                "cpu_flags": host.get("cpu_flags"),
                "precision": report["precision"],
                "steps": report["steps"],
                "train_tokens": report["train_tokens"],
                "tokens_per_second": report["tokens_per_second"],
                "train_seconds": report["train_seconds"],
                "peak_memory_bytes": report["peak_memory_bytes"],
                "peak_memory_kind": report["peak_memory_kind"],
            }
        )
    return rows


def _finqa_records(config: BenchConfig) -> list[finqa.FinQARecord]:
    source, _, split = config.finqa.partition("@")
    try:
        return finqa.load_finqa(None if source == "sample" else source, split or Path(source).stem)[: config.limit]
    except finqa.FinQADataError as err:
        raise BenchError(f"finqa {config.finqa}: {err}") from err


def _accuracy(config: BenchConfig, records: list[finqa.FinQARecord], out: Path, backend: str) -> list[dict[str, Any]]:
    # One question at a time (a vote's programs decode together, a slot each), in a window wide enough for every
    # FinQA prompt (2-shot base prompts reach ~2100 tokens): outputs do not depend on the slot sizing.
    slots = max(mode_options(m).samples for m in config.finqa_modes)
    serving = ServeConfig(
        models=config.models, n_threads=config.threads, ui=False, n_slots=slots, n_ctx=ACCURACY_CTX, kv_cache=config.kv_cache
    )
    if backend != LLAMA_CPP:
        serving = dataclasses.replace(serving, backend="transformers", precision=PRECISION[backend])
    pool = ModelPool([resolve(m) for m in config.models], serving, Metrics())
    pool.load()
    rows = []
    try:
        for name in pool.names:
            style = pool.finqa_style(name)
            engine = pool.engines[name]
            modes = runnable_modes(engine, config.finqa_modes)
            if skipped := sorted(set(config.finqa_modes) - set(modes)):
                log.warning("%s on %s: skipping FinQA modes %s (the engine cannot enforce a grammar)", name, backend, skipped)
            reports, predictions = evaluate_finqa(engine, records, style, modes, config.normalize)
            _write_jsonl(out / f"finqa-{variant(name, backend)}.jsonl", predictions)
            style_row = dataclasses.asdict(style)
            rows += [{"data": config.finqa, "backend": backend, "style": style_row, **r.as_dict()} for r in reports]
    finally:
        pool.close()
    return rows


def _perplexity(config: BenchConfig, source: str) -> list[Perplexity]:
    try:
        text = Path(source).read_bytes()  # as llama.cpp reads it: bytes to the tokenizer, no decoding on our side
    except OSError as err:
        raise BenchError(f"ppl {source}: {err}") from err
    rows = []
    for model in config.models:
        spec = served_model(model, ServeConfig.adapter_quant, config.threads, config.models)
        rows.append(perplexity(model, spec, text, config.ppl_ctx, config.threads, config.ppl_chunks, config.kv_cache))
        log.info("%s: PPL = %.4f +/- %.5f over %d tokens", model, rows[-1].ppl, rows[-1].error, rows[-1].tokens_scored)
    return rows


def _speed(config: BenchConfig) -> list[Speed]:
    rows = []
    for model in tqdm(config.models, desc="pp/tg", unit="model"):
        spec = served_model(model, ServeConfig.adapter_quant, config.threads, config.models)
        speed = llama_bench(model, spec, config.threads, config.pp, config.tg, config.repeats, config.kv_cache)
        rows.append(speed)
        log.info(
            "%s: pp%d %.0f tokens/s, tg%d %.1f tokens/s",
            model,
            speed.pp_tokens,
            speed.pp_tokens_per_second,
            speed.tg_tokens,
            speed.tg_tokens_per_second,
        )
    return rows


def _overhead(
    config: BenchConfig, url: str, model: str, chats: list[list[Message]], speed: list[dict[str, Any]]
) -> dict[str, Any]:
    """Single-client decode rate through HTTP against llama-cpp-python's own streamed chat completion of the same
    conversations (`ratio`: what the server costs over the library used directly), paired request by request, and
    against bare decoding without sampling, tg (`ratio_tg`), on the same GGUF and threads; the rates and ratios are
    None where no conversation was answered in two or more tokens."""
    single_client = [chats[i % len(chats)] for i in range(config.requests)]  # what the 1-client level sends
    spec = served_model(model, ServeConfig.adapter_quant, config.threads, config.models)
    n_ctx = ServeConfig.n_ctx
    paired = http_vs_direct(url, model, spec, config.threads, single_client, config.max_tokens, n_ctx, config.kv_cache)
    tg = next(s["tg_tokens_per_second"] for s in speed if s["model"] == model)
    http = paired.http_decode_tokens_per_second
    if http is None:
        log.warning("%s: HTTP / direct unavailable: no conversation was answered in two or more tokens", model)
    else:
        log.info(
            "%s: HTTP %.1f tokens/s, direct %.1f, ratio %.3f", model, http, paired.direct_chat_tokens_per_second, paired.ratio
        )
    ratio_tg = None if http is None else round(http / tg, 3)
    return {**dataclasses.asdict(paired), "direct_tg_tokens_per_second": tg, "ratio_tg": ratio_tg}


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows), encoding="utf-8")


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("adaptserve", "llama-cpp-python", "fastapi", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return cpu_info() | {
        "gpu": _gpu(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def short_commit(machine: dict[str, Any]) -> str:
    """`machine_info()`'s commit as results cite it: 7 hex digits, or "" outside a git checkout."""
    return (machine["git_commit"] or "")[:7]


def _gpu() -> str | None:
    return _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])


def _git_commit() -> str | None:
    return _output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent)


def _output(cmd: list[str], cwd: Path | None = None) -> str | None:
    """A command's stripped output, or None where it is missing, fails or says nothing."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
