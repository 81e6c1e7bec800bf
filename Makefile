# The two commands of the README: `make run` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT ?= 8000

.PHONY: run test install browser space

run: install ## serve the embedded default model (OpenAI-compatible API + UI at /ui)
	$(VENV)/bin/adaptserve serve --host 0.0.0.0 --port $(PORT)

test: install browser ## run the test suite against the real model, server and browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -ra

install: $(STAMP)

# llama-cpp-python compiles from source the first time (~6 min on 2 cores); pip caches the wheel after that.
# torch is pinned to the CPU build where pip's index or wheel directory has it; unpinned, pip pulls multi-GB CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# Debian's Chromium drives the UI test; Playwright's own browser download needs the internet.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install Debian's chromium package to run the browser test"; fi; }

# A self-contained folder to upload as a Hugging Face Space: app.py and README.md beside a copy of the package, and
# requirements.txt written from pyproject's dependencies (the one list). SPACE=DIR builds it elsewhere.
SPACE ?= space
space:
	@if [ "$(SPACE)" != space ]; then rm -rf "$(SPACE)" && mkdir -p "$(SPACE)" && cp space/app.py space/README.md "$(SPACE)"/; fi
	rm -rf "$(SPACE)/adaptserve" && cp -r adaptserve "$(SPACE)/adaptserve"
	find "$(SPACE)/adaptserve" -name __pycache__ -prune -exec rm -rf {} +
	python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
	  > "$(SPACE)/requirements.txt"
	@echo "$(SPACE)/ is ready to push to a Hugging Face Space (sdk: gradio)"
