#!/usr/bin/env bash
# The committed CPU run of `adaptserve bench` (benchmarks/results/bench-cpu/): base vs adapted on this machine class
# (2 cores, no GPU), FinQA test.json's first 100 questions, 1 llama.cpp thread (the server's default on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
HF_HUB_OFFLINE=1 .venv/bin/adaptserve bench \
  --finqa ../shared/data/finqa/test.json --limit 100 \
  --concurrency 1 2 4 8 --requests 16 --max-tokens 64 --threads 1 \
  --out benchmarks/results/bench-cpu "$@"
