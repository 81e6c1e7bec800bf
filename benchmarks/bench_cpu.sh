#!/usr/bin/env bash
# The committed CPU run of `adaptserve bench` (benchmarks/results/bench-cpu/): base vs adapted on this machine class
# (2 cores, no GPU), FinQA test.json's first 50 questions, 2 llama.cpp threads (nothing else runs meanwhile).
set -euo pipefail
cd "$(dirname "$0")/.."
HF_HUB_OFFLINE=1 .venv/bin/adaptserve bench \
  --finqa ../shared/data/finqa/test.json --limit 50 \
  --concurrency 1 2 4 8 --requests 16 --max-tokens 64 --threads 2 \
  --out benchmarks/results/bench-cpu "$@"
