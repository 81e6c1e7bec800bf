"""Speed of the portable llama.cpp build the Dockerfile installs against a native one, on this host.

The Dockerfile builds llama-cpp-python with every x86-64 CPU variant of ggml's CPU backend, one picked at run time
(GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS), rather than for the building host's CPU (-march=native). The same build
with pip, outside Docker (an hour or more on 2 cores; --no-cache-dir, or pip reuses a cached native wheel):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" .venv/bin/pip wheel --no-deps \\
        --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 -w .whl/portable
    python3 -m venv /work/portable-venv
    /work/portable-venv/bin/pip install .whl/portable/llama_cpp_python-*.whl -e .  # the wheel meets adaptserve's pin

then, with nothing else heavy running:

    .venv/bin/python benchmarks/portable_build.py --native .venv/bin/python --portable /work/portable-venv/bin/python

Each round runs a child process under each interpreter in turn (native, portable, native, ...), which measures
`adaptserve.bench.speed.llama_bench` (llama-bench style pp512 and tg128, the server's K/V cache) on smollm2-135m and
reports which ggml CPU backend library it loaded. The medians over rounds per build, and portable/native, go to
`<out>/results.json` and `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.portable_build")
MODEL = "smollm2-135m"
BUILDS = ("native", "portable")
HOST_FLAGS = ("avx2", "avx512f", "amx_tile")  # of /proc/cpuinfo's flags: what decides the variant ggml picks
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"  # the portable build's, as in the Dockerfile


def child(threads: int, repeats: int, pp: int, tg: int) -> dict[str, Any]:
    """In this interpreter: llama_bench on MODEL, and the ggml CPU backend library the process loaded."""
    import llama_cpp

    from adaptserve.bench.speed import llama_bench
    from adaptserve.models import resolve
    from adaptserve.serve.kvslots import DEFAULT_KV_CACHE

    speed = llama_bench(MODEL, resolve(MODEL), threads, pp, tg, repeats, DEFAULT_KV_CACHE)
    return {
        "python": sys.executable,
        "llama_cpp_python": llama_cpp.__version__,
        "kv_cache": DEFAULT_KV_CACHE,
        "cpu_backend": _cpu_backend_libraries(),
        "speed": dataclasses.asdict(speed),
    }


def _cpu_backend_libraries() -> list[str]:
    """The libggml-cpu*.so files mapped into this process: libggml-cpu.so for a native build, the one variant ggml
    picked (libggml-cpu-<variant>.so) for a portable one; it unloads the others after scoring them."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith("libggml-cpu")})


def variant(libraries: list[str]) -> str:
    """`haswell` for libggml-cpu-haswell.so; `built in` for a native build's libggml-cpu.so."""
    names = [re.match(r"libggml-cpu(?:-([\w-]+))?\.so", Path(lib).name) for lib in libraries]
    return ", ".join((m and m[1]) or "built in" for m in names) or "none"


def run_child(python: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [python, __file__, "--child", "--threads", str(args.threads), "--repeats", str(args.repeats)]
    command += ["--pp", str(args.pp), "--tg", str(args.tg)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{python} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def host() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "flags": sorted(flags.intersection(HOST_FLAGS))}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    builds = {}
    for build, results in runs.items():
        speeds = [r["speed"] for r in results]
        builds[build] = {
            "python": results[0]["python"],
            "llama_cpp_python": results[0]["llama_cpp_python"],
            "cpu_backend": results[0]["cpu_backend"],
            "variant": variant(results[0]["cpu_backend"]),
            "pp_median": round(statistics.median(s["pp_tokens_per_second"] for s in speeds), 1),
            "tg_median": round(statistics.median(s["tg_tokens_per_second"] for s in speeds), 1),
            "rounds": speeds,
        }
    native, portable = builds["native"], builds["portable"]
    ratio = {k: round(portable[f"{k}_median"] / native[f"{k}_median"], 3) for k in ("pp", "tg")}
    return {"builds": builds, "ratio_portable_over_native": ratio}


def markdown(summary: dict[str, Any]) -> str:
    pp, tg, builds, ratio = summary["pp"], summary["tg"], summary["builds"], summary["ratio_portable_over_native"]
    h = summary["host"]
    lines = [
        f'Portable llama.cpp build (`CMAKE_ARGS="{summary["portable_cmake_args"]}"`, as the Dockerfile\'s) against a native '
        f"one (-march=native), llama-cpp-python {builds['native']['llama_cpp_python']}: `llama_bench` on {summary['model']}, "
        f"{summary['threads']} threads, K/V cache {summary['kv_cache']}, tokens/s (each round the mean of "
        f"{summary['repeats']} repeats), median of {summary['rounds']} rounds alternating the builds.",
        "",
        f"Host: {h['cpu']}, {h['cores']} cores, flags {' '.join(h['flags']) or 'none'} (of {', '.join(HOST_FLAGS)}). "
        f"Load average {summary['load_before'][0]:.2f} before, {summary['load_after'][0]:.2f} after. "
        f"Commit {summary['git_commit']}{' (working tree with uncommitted changes)' if summary['git_dirty'] else ''}.",
        "",
        f"| build | CPU backend loaded | pp{pp} | tg{tg} | pp{pp} rounds | tg{tg} rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in builds.items():
        pps = ", ".join(f"{s['pp_tokens_per_second']:.0f}" for s in b["rounds"])
        tgs = ", ".join(f"{s['tg_tokens_per_second']:.0f}" for s in b["rounds"])
        lines.append(f"| {name} | {b['variant']} | {b['pp_median']:.1f} | {b['tg_median']:.1f} | {pps} | {tgs} |")
    lines.append(f"| portable / native | | {ratio['pp']:.3f} | {ratio['tg']:.3f} | | |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", help="python of the venv with the native llama-cpp-python build")
    parser.add_argument("--portable", help="python of the venv with the portable build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="of pp and tg within each child")
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "portable-build")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child and not (args.native and args.portable):
        parser.error("--native and --portable are required")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        sys.stdout.write(json.dumps(child(args.threads, args.repeats, args.pp, args.tg)) + "\n")
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {build: [] for build in BUILDS}
    for round_ in range(args.rounds):
        for build in BUILDS:
            runs[build].append(run_child(getattr(args, build), args))
            s = runs[build][-1]["speed"]
            log.info(
                "round %d %s (%s): pp%d %.1f tg%d %.1f tokens/s",
                round_ + 1,
                build,
                variant(runs[build][-1]["cpu_backend"]),
                args.pp,
                s["pp_tokens_per_second"],
                args.tg,
                s["tg_tokens_per_second"],
            )
    summary = {
        "model": MODEL,
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "pp": args.pp,
        "tg": args.tg,
        "kv_cache": runs["native"][0]["kv_cache"],
        "portable_cmake_args": CMAKE_ARGS,
        "host": host(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        **summarize(runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(summary))
    log.info("portable/native: %s; wrote %s", summary["ratio_portable_over_native"], args.out / "results.md")


if __name__ == "__main__":
    main()
