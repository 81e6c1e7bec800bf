"""`adaptserve bench`: what the adaptation bought (accuracy, perplexity, overlap with reference answers) and what serving
costs (latency, throughput).

    from adaptserve.bench import BenchConfig, bench
    results = bench(BenchConfig(finqa="sample@test", concurrency=[1, 4], out="runs/bench"))

Writes results.json (every number, plus machine info), report.md, accuracy.png, latency.png and per-example JSONL.
"""

from __future__ import annotations

from typing import Any

from adaptserve.bench.config import BenchConfig, BenchError

__all__ = ["BenchConfig", "BenchError", "bench"]


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run `config`; see adaptserve.bench.run.bench."""
    from adaptserve.bench.run import bench as run

    return run(config)
