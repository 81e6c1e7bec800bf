#!/usr/bin/env bash
# The committed CPU run of `adaptserve bench` (benchmarks/results/bench-cpu/): base vs adapted on this machine class
# (2 cores, no GPU), FinQA test.json's first 50 questions, 2 llama.cpp threads (nothing else runs meanwhile), greedy
# answers (the answering modes side by side are benchmarks/finqa_accuracy.py's, in benchmarks/results/finqa-modes).
# Perplexity is measured on the report text of FinQA test.json (pre_text and post_text of each distinct page, no
# questions or answers): the adapter's domain, from the split held out from training (~205k SmolLM2 tokens, 401
# chunks of 512); the first 40 chunks (20k tokens, ~1.5 min per variant) are evaluated.
# PYTHON, FINQA and OUT override the interpreter, the FinQA file and the results folder; arguments go to both runs
# (later flags win: `--limit 1 --requests 1` makes a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
FINQA="${FINQA:-../shared/data/finqa/test.json}"
OUT="${OUT:-benchmarks/results/bench-cpu}"
mkdir -p runs
"$PYTHON" -c '
import json, sys
records = json.load(open(sys.argv[1], encoding="utf-8"))
pages = dict.fromkeys(" ".join(r["pre_text"] + r["post_text"]) for r in records)  # pages repeat across questions
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(pages) + "\n")
' "$FINQA" runs/ppl-finqa-test.txt
HF_HUB_OFFLINE=1 "$PYTHON" -m adaptserve bench --models smollm2-135m smollm2-135m-finqa \
  --finqa "$FINQA" --limit 50 --finqa-modes greedy \
  --ppl runs/ppl-finqa-test.txt --ppl-chunks 40 \
  --concurrency 1 2 4 8 --requests 16 --max-tokens 64 --threads 2 \
  --out "$OUT" "$@"
# Two model families side by side: SmolLM2-135M and Gemma 3 270M, each base with its FinQA adapter, all four in one
# server (the defaults of `adaptserve serve`, so its peak RSS is theirs), same questions, text and load, 1 and 8
# clients. Perplexity is per token of each model's own tokenizer: comparable within a family, not across.
HF_HUB_OFFLINE=1 "$PYTHON" -m adaptserve bench --models smollm2-135m smollm2-135m-finqa gemma3-270m gemma3-270m-finqa \
  --finqa "$FINQA" --limit 50 --finqa-modes greedy \
  --ppl runs/ppl-finqa-test.txt --ppl-chunks 40 \
  --concurrency 1 8 --requests 16 --max-tokens 64 --threads 2 \
  --out "$OUT/two-families" "$@"
# The quant matrix: the adapter's q8_0 export, in a server of its own (so its footprint is its own), same questions,
# text and load but 1 and 8 clients only.
HF_HUB_OFFLINE=1 "$PYTHON" -m adaptserve bench --models smollm2-135m-finqa@q8_0 \
  --finqa "$FINQA" --limit 50 --finqa-modes greedy \
  --ppl runs/ppl-finqa-test.txt --ppl-chunks 40 \
  --concurrency 1 8 --requests 16 --max-tokens 64 --threads 2 \
  --out "$OUT/q8_0" "$@"
